"""Speculative decoding through the swarm: tokens per round trip and speed-up against plain greedy decoding, with
0, 10 and 50 ms of emulated one-way latency on every link (see push_latency.py), on repetitive text (code, a
list). Drafts come from prompt lookup, Corolla's NgramDrafter (`generate(..., prompt_lookup_num_tokens=k)` on a
distributed model) and, side by side, transformers' own PromptLookupCandidateGenerator; transformers' assisted
generation verifies them over our rollback-capable session. SmolLM2-135M-Instruct over 2 servers on loopback, on
CPU (default) or with `--device cuda` on one GPU (servers and the client's embeddings and LM head).

    .venv/bin/python benchmarks/speculative.py [--delays 0 10 50] [--new-tokens 128] [--draft 6 10]
    .venv/bin/python benchmarks/speculative.py --delays 50 --draft 6 --drafters corolla --prompts list if/elif \\
        --rounds 4      # repeated, alternating plain and speculative runs
    python3 benchmarks/speculative.py --device cuda --drafters corolla    # on a GPU machine
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationMixin

from corolla import AutoDistributedModelForCausalLM
from corolla.launch import LocalSwarm
from corolla.models.embedded import ensure_embedded_model

# (label, text, whether it goes through the chat template). The completions: the model answers the first with
# prose about the functions (not code); the chat requests get code whose lines repeat with new values.
PROMPTS = [
    ("code completion", "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
     False),
    ("list", "Monday: 9:00 standup, 10:00 review\nTuesday: 9:00 standup, 10:00 review\nWednesday:", False),
    ("if/elif", "Write a Python function that converts a number from 1 to 10 into its English word using if/elif.",
     True),
    ("SQL", "Write a SQL script that creates tables users, orders and products, each with an id, a name and a "
     "created_at column.", True),
    ("HTML table", "Write an HTML table with the names and ages of five people.", True),
]


def encode(tokenizer, text: str, chat: bool):
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(text, return_tensors="pt")["input_ids"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run(model, ids, new_tokens: int, draft: int | None, transformers_drafts: bool = False):
    extra = {"prompt_lookup_num_tokens": draft} if draft else {}
    if transformers_drafts:  # the baseline: transformers' own prompt lookup instead of our override
        model._get_candidate_generator = functools.partial(GenerationMixin._get_candidate_generator, model)
    try:
        with model.inference_session(max_length=ids.shape[1] + new_tokens + (draft or 0) + 1) as session:
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 **extra)
            seconds = time.perf_counter() - began
            steps = session._step_ids
    finally:
        vars(model).pop("_get_candidate_generator", None)
    return out[0].tolist(), seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 10.0, 50.0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--draft", type=int, nargs="+", default=[6, 10], help="draft lengths to try")
    parser.add_argument("--drafters", nargs="+", default=["corolla", "transformers"],
                        choices=["corolla", "transformers"])
    parser.add_argument("--prompts", nargs="+", default=[label for label, _, _ in PROMPTS],
                        choices=[label for label, _, _ in PROMPTS])
    parser.add_argument("--rounds", type=int, default=1, help="repeat plain and speculative runs, alternating their "
                        "order (ratios per round: bursts of other load hit both alike)")
    parser.add_argument("--device", default="cpu", help="servers' and client's device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                        help="servers' and client's dtype (float32 keeps the CPU runs' text)")
    args = parser.parse_args()
    on_cpu = torch.device(args.device).type == "cpu"
    server_args = ["--num-threads", "1"] if on_cpu else ["--device", args.device]
    server_args += ["--dtype", args.dtype]
    where = "CPU" if on_cpu else torch.cuda.get_device_name(torch.device(args.device))
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    workdir = Path(tempfile.mkdtemp(prefix="corolla-spec-"))
    variants = [(drafter, draft) for draft in args.draft for drafter in args.drafters]
    rows = []
    for delay in args.delays:
        with LocalSwarm(workdir / f"swarm-{delay:g}") as swarm:
            swarm.start_dht()
            swarm.start_servers(model_dir, [(0, 15), (15, 30)], [*server_args, "--debug-delay-ms", str(delay)])
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                   dtype=DTYPES[args.dtype]).to(args.device)
            try:
                for label, text, chat in PROMPTS:
                    if label not in args.prompts:
                        continue
                    ids = encode(tokenizer, text, chat).to(args.device)
                    run(model, ids, 4, None)  # warm-up
                    runs: dict = {variant: [] for variant in [None, *variants]}
                    for round_index in range(args.rounds):
                        order = [None, *variants]
                        for variant in order if round_index % 2 == 0 else order[::-1]:
                            draft = None if variant is None else variant[1]
                            transformers_drafts = variant is not None and variant[0] == "transformers"
                            runs[variant].append(run(model, ids, args.new_tokens, draft, transformers_drafts))
                    plain = runs[None]
                    for drafter, draft in variants:
                        spec = runs[(drafter, draft)]
                        ratios = [p[1] / s[1] for p, s in zip(plain, spec)]
                        rows.append((delay, label, drafter, draft, statistics.median(p[1] for p in plain),
                                     plain[0][2], statistics.median(s[1] for s in spec), spec[0][2],
                                     statistics.median(ratios), min(ratios), max(ratios),
                                     all(s[0] == plain[0][0] for s in spec + plain)))
            finally:
                model.close()
    print(f"\nSmolLM2-135M-Instruct, 2 servers, {where} ({args.dtype}), loopback, greedy {args.new_tokens} new tokens, "
          f"{args.rounds} round(s): median seconds, median of the rounds' speed-ups (range)")
    print(f"{'latency':>8} {'prompt':>16} {'drafts':>13} {'draft':>6} {'plain s':>8} {'plain steps':>12} "
          f"{'spec s':>7} {'spec steps':>11} {'tokens/step':>12} {'speed-up':>9} {'range':>12} {'same':>5}")
    for delay, name, drafter, draft, plain_s, plain_steps, spec_s, spec_steps, ratio, low, high, same in rows:
        print(f"{delay:>6g}ms {name:>16} {drafter:>13} {draft:>6} {plain_s:>8.2f} {plain_steps:>12} {spec_s:>7.2f} "
              f"{spec_steps:>11} {args.new_tokens / spec_steps:>12.2f} {ratio:>8.2f}x {low:>5.2f}-{high:.2f}x "
              f"{str(same):>5}")


if __name__ == "__main__":
    main()
