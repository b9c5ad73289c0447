"""Training throughput through the swarm against local training of the same model, measured side by side.

The Petals anchor's method (shared/anchors/petals): the tiny-llama shape (hidden 512, 8 blocks), random weights,
float32, CPU; a batch of 4 x 64 random tokens; one step = forward + backward + Adam step on the trainable
parameters; one warm-up step, then the median of N steps. Modes: prompt tuning (pre_seq_len 8; Petals measured
0.75 s per step swarm, 0.30 s local on this machine class), deep prompt tuning, and LoRA (r 8 on q_proj/v_proj).
Local: the same computation in one process with plain transformers (prompts through inputs_embeds) and plain peft.

    .venv/bin/python benchmarks/training.py [--steps 5] [--servers 2] [--modes ptune lora]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parent))

from swarm_latency import make_model  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.launch import LocalSwarm, split_blocks  # noqa: E402
from corolla.models.lora import LoraSettings  # noqa: E402

PRE_SEQ_LEN = 8
LORA = LoraSettings(r=8, alpha=16, target_modules=("q_proj", "v_proj"))


def time_steps(step, steps: int) -> float:
    step()  # warm-up: routes, connections, allocator
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def swarm_step(model, ids: torch.Tensor):
    optimizer = torch.optim.Adam([p for p in model.tuning.parameters() if p.requires_grad], lr=1e-3)

    def step():
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()

    return step


def local_step(local: LlamaForCausalLM, mode: str, ids: torch.Tensor):
    if mode == "lora":
        model = get_peft_model(copy.deepcopy(local), LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0,
                                                               target_modules=list(LORA.target_modules)))
        params = [p for p in model.parameters() if p.requires_grad]

        def forward():
            return model(input_ids=ids, labels=ids).loss
    else:
        model = local.requires_grad_(False)
        prompts = torch.nn.Parameter(torch.randn(PRE_SEQ_LEN, local.config.hidden_size) * 0.02)
        params = [prompts]
        deep = None
        if mode == "deep_ptune":
            deep = torch.nn.Parameter(torch.zeros(local.config.num_hidden_layers, PRE_SEQ_LEN, local.config.hidden_size))
            params.append(deep)

        def forward():
            embeds = torch.cat([prompts.expand(ids.shape[0], -1, -1), model.get_input_embeddings()(ids)], dim=1)
            handles = []
            if deep is not None:  # the same per-layer additions as the servers make
                for index, layer in enumerate(model.model.layers):
                    def hook(module, args, kwargs, index=index):
                        hidden = kwargs.get("hidden_states", args[0] if args else None)
                        hidden = torch.cat([hidden[:, :PRE_SEQ_LEN] + deep[index], hidden[:, PRE_SEQ_LEN:]], dim=1)
                        return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
                    handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            try:
                logits = model(inputs_embeds=embeds).logits[:, PRE_SEQ_LEN:].contiguous()
            finally:
                for handle in handles:
                    handle.remove()
            return model.loss_function(logits=logits, labels=ids, vocab_size=model.config.vocab_size)

    optimizer = torch.optim.Adam(params, lr=1e-3)

    def step():
        optimizer.zero_grad()
        forward().backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["ptune", "deep_ptune", "lora"])
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="corolla-train-bench-"))
    model_dir = make_model(workdir / "tiny-llama")
    ids = torch.randint(3, 32000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.length

    local = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local_times = {mode: time_steps(local_step(local, mode, ids), args.steps) for mode in args.modes}
    del local

    swarm_times = {}
    with LocalSwarm(workdir / "swarm") as swarm:
        swarm.start_dht()
        swarm.start_servers(model_dir, split_blocks(8, args.servers), ["--num-threads", "1"])
        for mode in args.modes:
            model = AutoDistributedModelForCausalLM.from_pretrained(
                model_dir, initial_peers=swarm.initial_peers, tuning_mode=mode, pre_seq_len=PRE_SEQ_LEN, lora=LORA,
                seed=0)
            try:
                model.train()
                swarm_times[mode] = time_steps(swarm_step(model, ids), args.steps)
            finally:
                model.close()

    print(f"\ntiny-llama (hidden 512, 8 blocks), float32, CPU; batch {args.batch} x {args.length} tokens; "
          f"{args.servers} servers on loopback; forward + backward + Adam step, median of {args.steps}")
    print(f"{'mode':<12} {'swarm s/step':>13} {'local s/step':>13} {'swarm tok/s':>12} {'local tok/s':>12} "
          f"{'swarm/local':>12}")
    for mode in args.modes:
        s, l = swarm_times[mode], local_times[mode]
        print(f"{mode:<12} {s:>13.3f} {l:>13.3f} {tokens / s:>12.0f} {tokens / l:>12.0f} {l / s:>11.2f}x")


if __name__ == "__main__":
    sys.exit(main())
