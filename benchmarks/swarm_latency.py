"""Decode latency per token: a Corolla swarm on loopback against the same model run locally with plain
transformers, measured side by side in one run (the method of shared/anchors/petals: greedy, a 20-token prompt,
64 new tokens, a streamer timestamps each token; ms/token = mean gap between tokens 2..64; median of 5 runs
after one warm-up).

Model: the anchor's tiny-llama shape (hidden 512, 8 blocks, 8 heads, FFN 1376, vocab 32000), random weights.

    .venv/bin/python benchmarks/swarm_latency.py [--runs 5] [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

from corolla import AutoDistributedModelForCausalLM
from corolla.launch import LocalSwarm, split_blocks

PETALS_TINY_MS_PER_TOKEN = 28.4  # shared/anchors/petals/results/petals-tiny-summary.json, same machine class


class TimingStreamer(BaseStreamer):
    def __init__(self):
        self.times: list[float] = []
        self.first = True

    def put(self, value):
        if self.first:  # generate() first hands the prompt to the streamer
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def make_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                             rms_norm_eps=1e-6, rope_theta=1e4, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def time_generation(model, input_ids, new_tokens: int, runs: int) -> tuple[float, float, list[int]]:
    def once(n):
        streamer = TimingStreamer()
        began = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        gaps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
        return 1000 * statistics.mean(gaps), streamer.times[0] - began, out[0].tolist()

    once(4)  # warm-up: routes, connections, allocator
    results = [once(new_tokens) for _ in range(runs)]
    return (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="corolla-bench-"))
    model_dir = make_model(workdir / "tiny-llama")
    torch.manual_seed(1)
    input_ids = torch.cat([torch.tensor([[1]]), torch.randint(3, 32000, (1, 19))], dim=1)

    # The swarm client runs first, in a process that has done no other torch work, as a user's would: running the
    # local model first changed the client's OpenMP thread state and hid a worker thread spinning in it.
    swarm_results = []
    for servers in args.servers:
        with LocalSwarm(workdir / f"swarm-{servers}") as swarm:
            swarm.start_dht()
            swarm.start_servers(model_dir, split_blocks(8, servers), ["--num-threads", "1"])
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
            try:
                swarm_results.append((servers, *time_generation(model, input_ids, args.new_tokens, args.runs)))
            finally:
                model.close()

    local = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local_ms, local_first, local_tokens = time_generation(local, input_ids, args.new_tokens, args.runs)
    del local
    rows = [("local transformers, 1 process", local_ms, local_first, True)]
    rows += [(f"Corolla swarm, {servers} servers (loopback)", ms, first, tokens == local_tokens)
             for servers, ms, first, tokens in swarm_results]

    print(f"\ntiny-llama (hidden 512, 8 blocks), float32, CPU ({torch.get_num_threads()} torch threads in client), "
          f"prompt 20, {args.new_tokens} new tokens, median of {args.runs}")
    print(f"{'setup':<42} {'ms/token':>9} {'first token':>12} {'vs local':>9} {'vs Petals':>10} {'tokens == local':>16}")
    for name, ms, first, same in rows:
        print(f"{name:<42} {ms:>9.2f} {first * 1000:>10.1f}ms {ms / local_ms:>8.2f}x "
              f"{ms / PETALS_TINY_MS_PER_TOKEN:>9.2f}x {str(same):>16}")
    print(f"(Petals 2.2 figure {PETALS_TINY_MS_PER_TOKEN} ms/token is the anchor's recorded run on this machine class; "
          f"`make bench-petals` measures Petals in the same run)")
    if args.json:
        Path(args.json).write_text(json.dumps([dict(zip(["setup", "ms_per_token", "first_token_s", "tokens_equal"], r))
                                               for r in rows], indent=1))


if __name__ == "__main__":
    sys.exit(main())
