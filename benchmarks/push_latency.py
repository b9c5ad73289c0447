"""Decode step latency over a 3-server chain with and without server-to-server push, with 0 and 20 ms of
emulated one-way link latency (every server adds it to each message it receives and each reply it sends:
a step costs 2 x latency per hop without push, (hops + 1) x latency with push).

    .venv/bin/python benchmarks/push_latency.py [--delays 0 20] [--runs 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from swarm_latency import TimingStreamer, make_model  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.client.config import ClientConfig  # noqa: E402
from corolla.launch import LocalSwarm, split_blocks  # noqa: E402


def decode_ms(model, input_ids, new_tokens: int, runs: int) -> tuple[float, list[int]]:
    def once(n):
        streamer = TimingStreamer()
        out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        return 1000 * statistics.mean(b - a for a, b in zip(streamer.times, streamer.times[1:])), out[0].tolist()

    once(3)
    results = [once(new_tokens) for _ in range(runs)]
    return statistics.median(r[0] for r in results), results[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 20.0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="corolla-push-"))
    model_dir = make_model(workdir / "tiny-llama")
    input_ids = torch.randint(3, 32000, (1, 20), generator=torch.Generator().manual_seed(1))
    rows = []
    for delay in args.delays:
        with LocalSwarm(workdir / f"swarm-{delay:g}") as swarm:
            swarm.start_dht()
            swarm.start_servers(model_dir, split_blocks(8, 3), ["--num-threads", "1", "--debug-delay-ms", str(delay)])
            measured = {}
            for use_push in (False, True):
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    model_dir, initial_peers=swarm.initial_peers, client_config=ClientConfig(use_push=use_push))
                try:
                    measured[use_push] = decode_ms(model, input_ids, args.new_tokens, args.runs)
                finally:
                    model.close()
        (off, tokens_off), (on, tokens_on) = measured[False], measured[True]
        rows.append((delay, off, on, tokens_off == tokens_on))
    print(f"\n3 servers x (8 blocks / 3) of tiny-llama (hidden 512), CPU, loopback; {args.new_tokens} new tokens, "
          f"median of {args.runs}")
    print(f"{'one-way link latency':>21} {'no push ms/token':>17} {'push ms/token':>14} {'speed-up':>9} {'same tokens':>12}")
    for delay, off, on, same in rows:
        print(f"{delay:>19g}ms {off:>17.2f} {on:>14.2f} {off / on:>8.2f}x {str(same):>12}")


if __name__ == "__main__":
    main()
