"""Fine-tune SmolLM2-135M-Instruct with LoRA through a local Corolla swarm, on the small dataset in examples/data.

The dataset teaches a fixed answer format about an invented atlas ("Answer: <x>. (source: Corolla atlas)"). The
script starts a private swarm on 127.0.0.1 (or joins one with --initial-peers), trains LoRA weights that live on
this client while the servers compute the gradients, prints the loss as it falls and the model's answers to
held-out questions before and after, saves the adapter in PEFT format, and checks that plain peft + transformers
load it with the same logits as the swarm gives.

    .venv/bin/python examples/finetune_smollm2.py [--steps 60] [--output tuned-smollm2] [--push alice/atlas]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.launch import LocalSwarm, split_blocks
from corolla.models.embedded import ensure_embedded_model
from corolla.models.lora import LoraSettings

DATA = Path(__file__).parent / "data"
FORMAT_END = "(source: Corolla atlas)"


def load_examples(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def encode(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """Chat-formatted ids, and labels that count only the answer (and its end-of-turn token)."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": example["prompt"]}],
                                           add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example["response"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def collate(tokenizer, examples: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch: ids, attention mask, labels."""
    encoded = [encode(tokenizer, e) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in encoded])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in encoded])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in encoded])
    return ids, mask, labels


def answer(model, tokenizer, question: str, max_new_tokens: int = 24) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    output = model.generate(prompt["input_ids"], max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def evaluate(model, tokenizer, examples: list[dict], label: str) -> float:
    """Share of held-out questions answered in the taught format; prints the first few answers."""
    hits = 0
    for index, example in enumerate(examples):
        reply = answer(model, tokenizer, example["prompt"])
        hits += reply.startswith("Answer:") and reply.endswith(FORMAT_END)
        if index < 3:
            print(f"  [{label}] {example['prompt']}\n      -> {reply!r}")
    share = hits / len(examples)
    print(f"  [{label}] {hits}/{len(examples)} held-out answers in the taught format")
    return share


def check_with_plain_peft(model_dir: Path, adapter_dir: Path, model, tokenizer, question: str) -> tuple[float, float]:
    """Max logit difference between plain peft + transformers with the saved adapter and the swarm; and, to show
    the comparison can tell them apart, between the base model without the adapter and the swarm."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    plain = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        swarm = model(ids).logits
        tuned = (plain(ids).logits - swarm).abs().max().item()
        with plain.disable_adapter():
            untuned = (plain(ids).logits - swarm).abs().max().item()
    return tuned, untuned


def train(model, tokenizer, examples: list[dict], steps: int, batch_size: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.tuning.parameters(), lr=lr, weight_decay=0.0)
    order = random.Random(0)
    losses, began = [], time.perf_counter()
    for step in range(1, steps + 1):
        ids, mask, labels = collate(tokenizer, order.sample(examples, batch_size))
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step == 1 or step % 10 == 0 or step == steps:
            recent = losses[-10:]
            print(f"  step {step:>4}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                  f"({(time.perf_counter() - began) / step:.2f} s/step)", flush=True)
    return losses


def run(args, initial_peers: list[str], model_dir: Path) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    settings = LoraSettings(r=args.rank, alpha=2 * args.rank, target_modules=tuple(args.targets))
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=initial_peers, dtype="float32",
                                                            tuning_mode="lora", lora=settings, seed=0)
    try:
        train_set, test_set = load_examples("train.jsonl"), load_examples("test.jsonl")[:args.eval]
        print("Before training:")
        before = evaluate(model, tokenizer, test_set, "before")
        print(f"Training LoRA (r={args.rank} on {', '.join(args.targets)}) through the swarm: {args.steps} steps of "
              f"{args.batch_size} examples")
        losses = train(model, tokenizer, train_set, args.steps, args.batch_size, args.lr)
        print("After training:")
        after = evaluate(model, tokenizer, test_set, "after")
        adapter_dir = model.tuning.save_pretrained(args.output)
        print(f"Saved the adapter in PEFT format to {adapter_dir}")
        if args.push:
            snapshot = model.tuning.push_to_hub(args.push, args.hub_dir)
            print(f"Pushed it to the offline hub as {args.push}: {snapshot}")
        difference, without = check_with_plain_peft(model_dir, adapter_dir, model, tokenizer, test_set[0]["prompt"])
        window = max(1, min(10, len(losses) // 2))  # mean loss of the first and of the last steps
        first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
        print(f"\nloss {first:.3f} -> {last:.3f}; answers in the taught format {before:.0%} -> {after:.0%}; "
              f"plain peft vs swarm logits: max difference {difference:.2e} (base model without the adapter: "
              f"{without:.2e})")
        return 0 if difference < 1e-3 < without else 1
    finally:
        model.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--eval", type=int, default=10, help="held-out questions to answer before and after")
    parser.add_argument("--output", default="tuned-smollm2", help="directory for the PEFT adapter")
    parser.add_argument("--push", default=None, help="also push the adapter to the offline hub as OWNER/NAME")
    parser.add_argument("--hub-dir", default=None)
    parser.add_argument("--servers", type=int, default=2, help="servers of the local swarm")
    parser.add_argument("--initial-peers", nargs="*", default=None, help="join this swarm instead of starting one")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    args = parser.parse_args()

    model_dir = Path(args.model) if args.model else ensure_embedded_model()
    if args.initial_peers:
        return run(args, args.initial_peers, model_dir)
    with LocalSwarm(Path(tempfile.mkdtemp(prefix="corolla-finetune-"))) as swarm:
        print(f"Starting a private swarm on 127.0.0.1 ({args.servers} servers; logs in {swarm.workdir})", flush=True)
        swarm.start_dht()
        num_blocks = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        swarm.start_servers(model_dir, split_blocks(num_blocks, args.servers), ["--num-threads", "1",
                                                                                "--dtype", "float32"])
        return run(args, swarm.initial_peers, model_dir)


if __name__ == "__main__":
    sys.exit(main())
