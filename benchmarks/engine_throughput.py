"""Aggregate decode tokens/s at 1, 8, 32 and 64 concurrent sessions on one GPU: the server's engine alone (no
network: every block of the model in one engine, steps submitted as a server's handlers submit them) against
transformers' own continuous batching (`generate_batch`: paged cache, its scheduler) in the same process, on the
same weights.

Model: the Llama-3-8B shape (hidden 4096, 32 layers, 32 heads / 8 KV heads, FFN 14336, vocab 128256), random
weights, bfloat16. Each session: a 128-token prompt, then --new-tokens decode steps.
- transformers: decode tokens/s = N * (NEW - 1) / (T(NEW) - T(1)) (the prefill cancels out), as
  shared/gpu/continuous_batching_one_process.py measures it. Its figure includes the embeddings and the LM head
  (about 6% of the weights read per step); the engine's does not (those run on the client).
- engine: sessions are prefilled, then every session submits its decode step and awaits it, NEW times;
  tokens/s = N * NEW / (time of the decode phase). With CUDA graphs (the server's default) and without.

    python3 benchmarks/engine_throughput.py                       # on a GPU
    python3 benchmarks/engine_throughput.py --preset tiny --device cpu --sessions 1 4   # checks the script
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's corolla, not an installed one
from transformers import ContinuousBatchingConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from corolla.models.checkpoint import make_span_helpers  # noqa: E402
from corolla.models.spec import SpanInputs, family_for  # noqa: E402
from corolla.server.backend import BlockBackend  # noqa: E402
from corolla.server.cache import CacheManager  # noqa: E402
from corolla.server.engine import Engine, Step  # noqa: E402

PRESETS = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048, rope_theta=10000.0),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def transformers_rate(model, sessions: int, prompt: int, new: int, device, cuda_graphs: bool = False) -> float:
    """cuda_graphs: force transformers' CUDA graphs on (with sdpa, which needs a mask, it leaves them off by
    default)."""
    prompts = [torch.randint(0, model.config.vocab_size - 1, (prompt,)).tolist() for _ in range(sessions)]

    def run(tokens: int) -> float:
        config = GenerationConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        sync(device)
        began = time.perf_counter()
        batching = ContinuousBatchingConfig(use_cuda_graph=True) if cuda_graphs else None
        outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching,
                                       progress_bar=False)
        sync(device)
        generated = sum(len(output.generated_tokens) for output in outputs.values())
        if generated != sessions * tokens:
            raise RuntimeError(f"generate_batch made {generated} tokens, not {sessions} x {tokens}")
        return time.perf_counter() - began

    run(4)  # warm-up
    first, whole = run(1), run(new)
    return sessions * (new - 1) / max(whole - first, 1e-9)


def engine_rate(engine: Engine, sessions: int, prompt: int, new: int, hidden_size: int, dtype) -> float:
    async def main() -> float:
        states = [engine.open(0, engine.backend.end, 1, prompt + new) for _ in range(sessions)]
        for state in states:
            await engine.reserve(state, prompt + new, timeout=0)

        def step(state, start, tokens):
            hidden = torch.randn(1, tokens, hidden_size, dtype=dtype)
            return engine.step(Step(state, start, SpanInputs(hidden, torch.arange(start, start + tokens)[None],
                                                             None, None)))

        await asyncio.gather(*(step(state, 0, prompt) for state in states))
        began = time.perf_counter()
        for index in range(new):
            await asyncio.gather(*(step(state, prompt + index, 1) for state in states))
        seconds = time.perf_counter() - began
        for state in states:
            await engine.close(state)
        return sessions * new / seconds

    asyncio.run(main())  # warm-up: captures this size's graphs
    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--json", default=None, help="default: $OUT/engine_throughput.json where $OUT is set")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(**PRESETS[args.preset])
    with device:
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.eval()
    spec = family_for(config)
    helpers = make_span_helpers(spec, config, str(device), dtype)
    results = {"preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": []}
    budget = max(args.sessions) * (args.prompt_tokens + args.new_tokens + 64)
    engines = {}
    for graphs in ((True, False) if device.type == "cuda" else (False,)):
        backend = BlockBackend(config, spec, list(model.model.layers), helpers, 0, device, dtype, cuda_graphs=graphs)
        engines["engine" + ("" if graphs else " (no graphs)")] = Engine(backend, CacheManager(budget, 64))
    for sessions in args.sessions:
        row = {"sessions": sessions}
        for name, engine in engines.items():
            row[name] = engine_rate(engine, sessions, args.prompt_tokens, args.new_tokens, config.hidden_size, dtype)
        for graphs in ((False, True) if device.type == "cuda" else (False,)) if not args.skip_transformers else ():
            name = "transformers generate_batch" + (" (CUDA graphs)" if graphs else "")
            try:
                row[name] = transformers_rate(model, sessions, args.prompt_tokens, args.new_tokens, device, graphs)
            except Exception as error:  # report, keep measuring the rest
                row[name] = f"failed: {error!r}"[:200]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    for engine in engines.values():
        engine.shutdown()
    names = [name for name in results["rows"][0] if name != "sessions"]
    print("\n| sessions | " + " | ".join(f"{name} tokens/s" for name in names)
          + " | engine / best transformers |")
    print("|---" * (len(names) + 2) + "|")
    for row in results["rows"]:
        cells = [f"{row[n]:.0f}" if isinstance(row[n], float) else str(row[n]) for n in names]
        bases = [row[n] for n in names if n.startswith("transformers") and isinstance(row[n], float)]
        ratio = f"{row['engine'] / max(bases):.2f}x" if bases and "engine" in row else "-"
        print(f"| {row['sessions']} | " + " | ".join(cells) + f" | {ratio} |")
    out = args.json or (os.path.join(os.environ["OUT"], "engine_throughput.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
