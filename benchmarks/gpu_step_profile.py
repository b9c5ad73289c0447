"""Where a decode step's time goes on the GPU: our span runner against transformers' own model forward on the
same blocks (same weights), alone and with an asyncio loop in another thread (as in a server), plus a profiler
table. Diagnostic, not part of `make bench`.

    python benchmarks/gpu_step_profile.py [--preset 1b|8b-half]
"""

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM
from transformers.cache_utils import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_batching import build  # noqa: E402

from corolla.models.spec import SpanInputs  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="1b")
args = parser.parse_args()
device = torch.device("cuda")
config, backend, embed, head = build(args.preset, device, torch.bfloat16, "none")
layers = config.num_hidden_layers


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
position = [32]


def ours_step(i):
    backend.run_sync(0, backend.end, SpanInputs(x, torch.tensor([[position[0]]]), None, cache))
    position[0] += 1


ours = timed(ours_step)

# The same with an asyncio loop running in another thread, as the server's RPC loop does.
loop = asyncio.new_event_loop()
thread = threading.Thread(target=loop.run_forever, daemon=True)
thread.start()
ours_with_loop = timed(ours_step)


async def compute_via_thread():  # the server's way: the loop hands the step to a compute thread and awaits it
    future = loop.create_future()

    def work():
        ours_step(0)
        loop.call_soon_threadsafe(future.set_result, None)

    threading.Thread(target=work).start()
    await future

via_loop = timed(lambda i: asyncio.run_coroutine_threadsafe(compute_via_thread(), loop).result())
loop.call_soon_threadsafe(loop.stop)

hf = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
with torch.no_grad():
    for ours_block, theirs_block in zip(backend.blocks, hf.model.layers):
        theirs_block.load_state_dict(ours_block.state_dict())
hf_cache = DynamicCache(config=config)
with torch.inference_mode():
    hf(torch.randint(0, 32000, (1, 32), device=device), cache=hf_cache, use_cache=True)
    token = torch.tensor([[5]], device=device)
    theirs = timed(lambda i: hf.model(input_ids=token, cache=hf_cache, use_cache=True).last_hidden_state.cpu())
print(f"{args.preset} ({layers} blocks): ours {ours:.2f} ms/step; ours with an asyncio loop thread {ours_with_loop:.2f};"
      f" ours handed to a thread by the loop {via_loop:.2f}; transformers LlamaModel forward (+ .cpu()) {theirs:.2f}")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
    for i in range(5):
        ours_step(i)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
