"""Every layer's hidden states: one request per server (`output_hidden_states=True`) against one request per block
(chaining `model.transformer.h[i]`, what a client without per-block outputs would do), on a local swarm whose
servers add an emulated one-way link delay. A plain forward (logits only) is the baseline.

    .venv/bin/python benchmarks/hidden_states.py [--runs 5] [--tokens 64] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from swarm_latency import make_model  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.launch import LocalSwarm  # noqa: E402


def median_ms(function, runs: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        function()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--delay-ms", type=float, default=25.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="corolla-hidden-"))
    model_dir = make_model(workdir / "tiny-llama")
    ids = torch.randint(3, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    with LocalSwarm(workdir / "swarm") as swarm:
        swarm.start_dht()
        swarm.start_servers(model_dir, [(0, 4), (4, 8)],
                            ["--num-threads", "1", "--debug-delay-ms", str(args.delay_ms)])
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            h = model.transformer.h

            def per_block():
                hidden, states = model.embed(ids), []
                for block in h:
                    hidden = block(hidden)
                    states.append(hidden)
                return states

            with torch.no_grad():
                one_call = model(ids, output_hidden_states=True).hidden_states
                chained = per_block()
                same = all(float((a - b).abs().max()) < 1e-5 for a, b in zip(one_call[1:-1], chained[:-1]))
                rows = [("plain forward (logits only)", median_ms(lambda: model(ids), args.runs)),
                        ("output_hidden_states=True (1 request per server)",
                         median_ms(lambda: model(ids, output_hidden_states=True), args.runs)),
                        ("h[i] chained (1 request per block)", median_ms(per_block, args.runs))]
        finally:
            model.close()
    base = rows[0][1]
    print(f"\ntiny-llama (hidden 512, 8 blocks), servers 0:4 and 4:8, CPU loopback + {args.delay_ms:g} ms one-way "
          f"delay; {args.tokens} tokens, median of {args.runs}; per-block states equal: {same}")
    for name, ms in rows:
        print(f"{name:<52} {ms:8.1f} ms  {ms / base:5.2f}x")


if __name__ == "__main__":
    main()
