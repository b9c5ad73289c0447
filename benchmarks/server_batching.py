"""One server's aggregate decode throughput with 1, 8 and 32 concurrent sessions (the engine's continuous
batching: the steps of concurrent sessions run as one forward over its paged KV memory), and weight quantization
(int8 / nf4) against the unquantized dtype: memory per block, decode speed and greedy agreement. Runs in one
process through the server's own engine (server/engine.py) and blocks (no network): each session reserves its
pages in the KV memory (`Engine.reserve`), then submits its steps with `Engine.step`, every one through the
engine's compute thread (never `alone`, so a lone session is not run on the loop's thread as a CPU server would).
On a GPU, decode steps are replayed from CUDA graphs as on a server (`--no-graphs`: the ordinary way); each
session count gets a short warm-up run first, so that the graphs of its batch sizes are captured before timing.

    python benchmarks/server_batching.py --device cuda --preset 1b     # a 1.1B Llama shape, bf16 (GPU)
    python benchmarks/server_batching.py --device cpu --preset tiny    # the anchor's tiny-llama shape (CPU)

Weights are random (transformers' default init); the LM head and embeddings are random too, so greedy
agreement between quantized and unquantized runs measures how often quantization flips a near-tie, a harsher
test than on a trained model, where the top token usually leads by a margin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corolla.models.spec import SpanInputs, family_for  # noqa: E402
from corolla.server.backend import BlockBackend  # noqa: E402
from corolla.server.cache import CacheManager  # noqa: E402
from corolla.server.engine import Engine, EngineStats, Step  # noqa: E402
from corolla.server.quantize import block_bytes, quantize_blocks  # noqa: E402

PRESETS = {
    # TinyLlama-1.1B's shape: 22 blocks, hidden 2048, GQA 32/4 heads.
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # Half of Llama-3-8B (16 of its 32 blocks): one server's span in benchmarks/gpu_swarm.py.
    "8b-half": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=32000),
}


PAGE_TOKENS = 64  # the server's default (CacheManager)
AGREEMENT_PROMPTS = 8  # sessions of the greedy-agreement runs


def build(preset: str, device: torch.device, dtype: torch.dtype, quant: str, seed: int = 0,
          cuda_graphs: bool = True):
    config = LlamaConfig(**PRESETS[preset], max_position_embeddings=4096, rms_norm_eps=1e-5)
    config._attn_implementation = "sdpa"
    spec = family_for(config)
    torch.manual_seed(seed)
    blocks = []
    for index in range(config.num_hidden_layers):
        with torch.device(device):  # initializing on the GPU is much faster; quantization starts from the CPU
            block = spec.block_class(config, index).to(dtype)
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.02)
        blocks.append(block.eval().requires_grad_(False).to("cpu" if quant != "none" else device))
    blocks = quantize_blocks(blocks, quant, device, dtype)
    helpers = {name: m.to(device) for name, m in spec.make_span_helpers(config).items()}
    backend = BlockBackend(config, spec, blocks, helpers, 0, device, dtype, cuda_graphs=cuda_graphs)
    embed = nn.Embedding(config.vocab_size, config.hidden_size).to(device, dtype)
    head = nn.Linear(config.hidden_size, config.vocab_size, bias=False).to(device, dtype)
    nn.init.normal_(embed.weight, std=1.0)
    nn.init.normal_(head.weight, std=0.02)
    return config, backend, embed, head


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_engine(backend, sessions: int, tokens: int) -> Engine:
    """An engine over the whole backend whose KV memory holds `sessions` sessions of `tokens` tokens at once."""
    pages = -(-tokens // PAGE_TOKENS)
    return Engine(backend, CacheManager(sessions * pages * PAGE_TOKENS, PAGE_TOKENS), max_batch=64)


async def step(engine, state, start: int, hidden: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(start, start + hidden.shape[1])[None]
    return await engine.step(Step(state, start, SpanInputs(hidden, positions, None, None)))


async def session(engine, embed, head, prompt, new_tokens, device):
    """Greedy decoding of one sequence through the engine; returns its tokens."""
    backend = engine.backend
    state = engine.open(0, backend.end, 1, prompt.shape[1] + new_tokens)
    try:
        await engine.reserve(state, prompt.shape[1] + new_tokens, timeout=0)
        with torch.inference_mode():
            hidden = embed(prompt.to(device)).cpu()
        out = await step(engine, state, 0, hidden)
        tokens = []
        for index in range(new_tokens):
            with torch.inference_mode():
                token = head(out[:, -1:].to(device)).argmax(-1)
                tokens.append(int(token))
                hidden = embed(token).cpu()
            out = await step(engine, state, prompt.shape[1] + index, hidden)
        return tokens
    finally:
        await engine.close(state)


async def timed_session(engine, prompt_len, new_tokens, barrier, go, seed):
    """Server-side load only: random activations in, so the clients' embeddings and LM head cost nothing here.
    Every session prefills first (then meets the others at the barrier); the decode phase starts at `go`."""
    backend = engine.backend
    generator = torch.Generator().manual_seed(seed)
    width = backend.config.hidden_size
    state = engine.open(0, backend.end, 1, prompt_len + new_tokens)
    try:
        await engine.reserve(state, prompt_len + new_tokens, timeout=0)
        prompt = torch.randn(1, prompt_len, width, generator=generator).to(backend.dtype)
        await step(engine, state, 0, prompt)
        steps = [torch.randn(1, 1, width, generator=generator).to(backend.dtype) for _ in range(new_tokens)]
        await barrier.wait()
        await go.wait()
        for index, hidden in enumerate(steps):
            await step(engine, state, prompt_len + index, hidden)
    finally:
        await engine.close(state)


def decode_throughput(engine, sessions: int, prompt_len: int, new_tokens: int, device):
    """Aggregate decode tokens/s of `sessions` concurrent sessions, and the engine's batching stats of the decode
    phase (the prefills, which the engine may batch too, are not counted)."""

    async def main():
        barrier, go = asyncio.Barrier(sessions + 1), asyncio.Event()
        tasks = [asyncio.ensure_future(timed_session(engine, prompt_len, new_tokens, barrier, go, i))
                 for i in range(sessions)]
        await barrier.wait()
        engine.stats = EngineStats()  # every prefill is done: from here on, decode steps only
        began = time.perf_counter()
        go.set()
        await asyncio.gather(*tasks)
        sync(device)
        return sessions * new_tokens / (time.perf_counter() - began), engine.stats

    return asyncio.run(main())


def concurrent_decode(engine, embed, head, sessions: int, prompt_len: int, new_tokens: int, device):
    prompts = [torch.randint(0, 32000, (1, prompt_len), generator=torch.Generator().manual_seed(i))
               for i in range(sessions)]

    async def main():
        engine.stats = EngineStats()
        began = time.perf_counter()
        results = await asyncio.gather(*(session(engine, embed, head, p, new_tokens, device) for p in prompts))
        sync(device)
        return results, time.perf_counter() - began, engine.stats

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--quant", nargs="*", default=None, help="quantizations to compare (default: GPU int8 nf4)")
    parser.add_argument("--no-graphs", action="store_true", help="GPU: run decode steps the ordinary way, not from "
                        "CUDA graphs (the server's default)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[
        args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    quants = args.quant if args.quant is not None else (["int8", "nf4"] if device.type == "cuda" else ["int8"])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "preset": args.preset, "dtype": str(dtype), "batching": [], "quant": []}
    graphs = not args.no_graphs
    session_tokens = args.prompt + args.new_tokens
    warm_up_tokens = min(4, args.new_tokens)

    config, backend, embed, head = build(args.preset, device, dtype, "none", cuda_graphs=graphs)
    report["cuda_graphs"] = backend.cuda_graphs
    params = sum(p.numel() for b in backend.blocks for p in b.parameters()) + 2 * 32000 * config.hidden_size
    report["params"] = params
    engine = make_engine(backend, max(*args.sessions, AGREEMENT_PROMPTS), session_tokens)
    for n in args.sessions:
        decode_throughput(engine, n, args.prompt, warm_up_tokens, device)  # warm-up (captures this size's graphs)
        rate, stats = decode_throughput(engine, n, args.prompt, args.new_tokens, device)
        report["batching"].append({"sessions": n, "tokens_per_s": rate, "largest_batch": stats.largest_batch,
                                   "forwards": stats.forwards, "batched_requests": stats.batched_requests,
                                   "graph_steps": stats.graph_steps})
        print(f"{n:>3} sessions: {rate:8.1f} decode tokens/s aggregate (largest batch {stats.largest_batch})",
              flush=True)
    reference = report["batching"][0]["tokens_per_s"]
    for row in report["batching"]:
        row["vs_1_session"] = row["tokens_per_s"] / reference

    agreement_prompts = AGREEMENT_PROMPTS
    alone, _, _ = concurrent_decode(engine, embed, head, agreement_prompts, args.prompt, args.new_tokens, device)
    base_bytes = statistics.mean(block_bytes(b) for b in backend.blocks)
    report["quant"].append({"quant": "none", "bytes_per_block": base_bytes, "tokens_per_s_1_session": reference,
                            "greedy_agreement": 1.0})
    engine.shutdown()
    del backend, engine
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for quant in quants:
        _, qbackend, _, _ = build(args.preset, device, dtype, quant, cuda_graphs=graphs)
        qengine = make_engine(qbackend, agreement_prompts, session_tokens)
        qbytes = statistics.mean(block_bytes(b) for b in qbackend.blocks)
        decode_throughput(qengine, 1, args.prompt, warm_up_tokens, device)
        qrate, _ = decode_throughput(qengine, 1, args.prompt, args.new_tokens, device)
        quantized, _, _ = concurrent_decode(qengine, embed, head, agreement_prompts, args.prompt, args.new_tokens,
                                            device)
        qengine.shutdown()
        same = sum(a == b for x, y in zip(alone, quantized) for a, b in zip(x, y))
        # Agreement until the first difference is what a user sees: after it, the texts diverge.
        prefix = statistics.mean(next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
                                 for x, y in zip(alone, quantized)) / args.new_tokens
        report["quant"].append({"quant": quant, "bytes_per_block": qbytes,
                                "tokens_per_s_1_session": qrate,
                                "greedy_agreement": same / (agreement_prompts * args.new_tokens),
                                "greedy_prefix_agreement": prefix})
        del qbackend, qengine
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{report['device']}, {args.preset} Llama ({params / 1e9:.2f} B params), {dtype}, random weights; "
          f"prompt {args.prompt}, {args.new_tokens} new tokens per session")
    print(f"{'sessions':>8} {'tokens/s':>10} {'vs 1':>6} {'largest batch':>14}")
    for row in report["batching"]:
        print(f"{row['sessions']:>8} {row['tokens_per_s']:>10.1f} {row['vs_1_session']:>5.2f}x {row['largest_batch']:>14}")
    print(f"\n{'quant':>6} {'MiB/block':>10} {'tokens/s (1 session)':>21} {'greedy agree':>13} {'agree until 1st diff':>21}")
    for row in report["quant"]:
        print(f"{row['quant']:>6} {row['bytes_per_block'] / 2**20:>10.1f} {row['tokens_per_s_1_session']:>21.1f} "
              f"{row['greedy_agreement']:>13.3f} {row.get('greedy_prefix_agreement', 1.0):>21.3f}")
    out = args.json or (os.path.join(os.environ["OUT"], "server_batching.json") if os.environ.get("OUT") else None)
    if out:
        Path(out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
