"""Speculative decoding through the swarm (prompt-lookup drafts, transformers' own assisted generation over our
rollback-capable session): tokens per round trip and speed-up against plain greedy decoding, with 0, 10 and
50 ms of emulated one-way latency on every link (see push_latency.py), on repetitive text (code, a list).
SmolLM2-135M-Instruct over 2 servers, CPU, loopback.

    .venv/bin/python benchmarks/speculative.py [--delays 0 10 50] [--new-tokens 64] [--draft 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from transformers import AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.launch import LocalSwarm
from corolla.models.embedded import ensure_embedded_model

PROMPTS = [
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Monday: 9:00 standup, 10:00 review\nTuesday: 9:00 standup, 10:00 review\nWednesday:",
]


def run(model, ids, new_tokens: int, draft: int | None):
    extra = {"prompt_lookup_num_tokens": draft} if draft else {}
    with model.inference_session(max_length=ids.shape[1] + new_tokens + (draft or 0) + 1) as session:
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)
        seconds = time.perf_counter() - began
        steps = session._step_ids
    return out[0].tolist(), seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 10.0, 50.0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--draft", type=int, default=10)
    args = parser.parse_args()
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="corolla-spec-"))
    rows = []
    for delay in args.delays:
        with LocalSwarm(workdir / f"swarm-{delay:g}") as swarm:
            swarm.start_dht()
            swarm.start_servers(model_dir, [(0, 15), (15, 30)], ["--num-threads", "1", "--debug-delay-ms", str(delay)])
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
            try:
                for prompt in PROMPTS:
                    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                    run(model, ids, 4, None)  # warm-up
                    plain_tokens, plain_s, plain_steps = run(model, ids, args.new_tokens, None)
                    spec_tokens, spec_s, spec_steps = run(model, ids, args.new_tokens, args.draft)
                    rows.append((delay, prompt.split(":")[0][:12], plain_s, plain_steps, spec_s, spec_steps,
                                 plain_tokens == spec_tokens))
            finally:
                model.close()
    print(f"\nSmolLM2-135M-Instruct, 2 servers, CPU loopback, greedy {args.new_tokens} new tokens, "
          f"prompt lookup {args.draft} tokens")
    print(f"{'latency':>8} {'prompt':>13} {'plain s':>8} {'plain steps':>12} {'spec s':>7} {'spec steps':>11} "
          f"{'tokens/step':>12} {'speed-up':>9} {'same':>5}")
    for delay, name, plain_s, plain_steps, spec_s, spec_steps, same in rows:
        print(f"{delay:>6g}ms {name:>13} {plain_s:>8.2f} {plain_steps:>12} {spec_s:>7.2f} {spec_steps:>11} "
              f"{args.new_tokens / spec_steps:>12.2f} {plain_s / spec_s:>8.2f}x {str(same):>5}")


if __name__ == "__main__":
    main()
