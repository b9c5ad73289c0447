"""Activations on the wire: bytes per decode token per hop, and the effect on logits and greedy output, for each
client `wire_format` (native float32, float16, bfloat16, blockwise int8). SmolLM2-135M-Instruct (trained
weights) over 2 servers, CPU, loopback.

    .venv/bin/python benchmarks/wire_formats.py [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.client.remote import WIRE_FORMATS, encode_hidden
from corolla.launch import LocalSwarm
from corolla.models.embedded import ensure_embedded_model
from corolla.net.messages import Step
from corolla.net.wire import encode

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "List three uses of a paperclip.", "Explain what a CPU does in one paragraph."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model_dir = ensure_embedded_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"] for p in PROMPTS]
    results = {}
    with LocalSwarm(Path(tempfile.mkdtemp(prefix="corolla-wire-"))) as swarm:
        swarm.start_dht()
        swarm.start_servers(model_dir, [(0, 15), (15, 30)], ["--num-threads", "1"])
        for wire_format in WIRE_FORMATS:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                model_dir, initial_peers=swarm.initial_peers, client_config=ClientConfig(wire_format=wire_format))
            try:
                with torch.no_grad():
                    logits = [model(ids).logits[0, -1] for ids in prompts]
                outputs = [model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:]
                           for ids in prompts]
                hidden = torch.randn(1, 1, model.config.hidden_size)
                step_bytes = len(encode(Step(step_id=1, start=100, hidden=encode_hidden(hidden, wire_format))))
            finally:
                model.close()
            results[wire_format] = (logits, outputs, step_bytes)
    native_logits, native_outputs, _ = results["native"]
    print(f"\nSmolLM2-135M-Instruct (hidden 576), 2 servers; {len(PROMPTS)} chat prompts, greedy {args.new_tokens} tokens")
    print(f"{'wire format':>12} {'bytes/step msg':>15} {'max |dlogit|':>13} {'same top-1':>11} {'greedy tokens equal':>20} "
          f"{'until 1st diff':>15}")
    for wire_format, (logits, outputs, step_bytes) in results.items():
        diff = max(float((a - b).abs().max()) for a, b in zip(logits, native_logits))
        top1 = sum(int(a.argmax() == b.argmax()) for a, b in zip(logits, native_logits)) / len(PROMPTS)
        pairs = [(a.tolist(), b.tolist()) for a, b in zip(outputs, native_outputs)]
        equal = sum(x == y for a, b in pairs for x, y in zip(a, b)) / sum(len(b) for _, b in pairs)
        prefix = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                     for a, b in pairs) / sum(len(b) for _, b in pairs)
        print(f"{wire_format:>12} {step_bytes:>15} {diff:>13.4f} {top1:>11.2f} {equal:>20.3f} {prefix:>15.3f}")


if __name__ == "__main__":
    main()
