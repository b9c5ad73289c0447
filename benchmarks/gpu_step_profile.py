"""Where a decode step's time goes on the GPU: our span runner against transformers' own model forward on the
same blocks (same weights), plus a profiler table. Diagnostic, not part of `make bench`.

    python benchmarks/gpu_step_profile.py
"""

import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_batching import build  # noqa: E402

from corolla.models.spec import SpanInputs  # noqa: E402

device = torch.device("cuda")
config, backend, embed, head = build("1b", device, torch.bfloat16, "none")


def timed(fn, steps=30):
    for _ in range(3):
        fn(0)
    torch.cuda.synchronize()
    began = time.perf_counter()
    for i in range(steps):
        fn(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / steps * 1000


cache = backend.new_cache()
prompt = torch.randn(1, 32, config.hidden_size, dtype=torch.bfloat16)
backend.run_sync(0, backend.end, SpanInputs(prompt, torch.arange(32)[None], None, cache))
x = torch.randn(1, 1, config.hidden_size, dtype=torch.bfloat16)
ours = timed(lambda i: backend.run_sync(0, backend.end, SpanInputs(x, torch.tensor([[32 + i]]), None, cache)))

hf = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
hf_cache = DynamicCache(config=config)
with torch.inference_mode():
    hf(torch.randint(0, 32000, (1, 32), device=device), cache=hf_cache, use_cache=True)
    token = torch.tensor([[5]], device=device)
    theirs = timed(lambda i: hf.model(input_ids=token, cache=hf_cache, use_cache=True))
    layer = hf.model.layers[0]
    h = torch.randn(1, 1, config.hidden_size, device=device, dtype=torch.bfloat16)
    pe = hf.model.rotary_emb(h, torch.tensor([[40]], device=device))
    one_layer = timed(lambda i: layer(h, position_embeddings=pe, position_ids=torch.tensor([[40]], device=device)))
print(f"ours: {ours:.2f} ms/step; transformers LlamaModel forward: {theirs:.2f} ms/step; one layer no cache: "
      f"{one_layer:.3f} ms")
from corolla.models.rotary import span_masks, layer_types  # noqa: E402
inputs = SpanInputs(x.to(device), torch.tensor([[60]], device=device), None, cache)
print("our mask:", {k: (None if v is None else (type(v).__name__, tuple(v.shape), v.dtype)) for k, v in
                    span_masks(config, inputs, 0, layer_types(config)[:22]).items()})
print("cache layers:", type(cache).__name__, len(cache.layers), type(cache.layers[0]).__name__,
      cache.layers[0].keys.shape, cache.layers[0].keys.is_contiguous(), cache.layers[0].keys.stride())
print("hf cache layers:", len(hf_cache.layers), type(hf_cache.layers[0]).__name__, hf_cache.layers[0].keys.shape,
      hf_cache.layers[0].keys.stride())
cache2 = DynamicCache(config=config)
backend.run_sync(0, backend.end, SpanInputs(prompt, torch.arange(32)[None], None, cache2))
with_config = timed(lambda i: backend.run_sync(0, backend.end, SpanInputs(x, torch.tensor([[32 + i]]), None, cache2)))
print(f"ours with DynamicCache(config): {with_config:.2f} ms/step")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for i in range(5):
        backend.run_sync(0, backend.end, SpanInputs(x, torch.tensor([[70 + i]]), None, cache))
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=8))
