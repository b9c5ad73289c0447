"""Where a decode step's time goes on the GPU: one session's steps through the server's engine (server/engine.py,
its paged KV memory) against transformers' own model forward on the same blocks (same weights), alone and with an
asyncio loop in another thread (as in a server), plus a profiler table. On a GPU the engine is measured twice: with
its CUDA graphs (the server's default) and the ordinary way (no graphs), which is what the profiler table shows
kernel by kernel. Diagnostic, not part of `make bench`.

    python benchmarks/gpu_step_profile.py [--preset 1b|8b-half]
    python benchmarks/gpu_step_profile.py --preset tiny --device cpu --steps 3    # checks the script
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
from server_batching import build, sync  # noqa: E402

from corolla.models.spec import SpanInputs  # noqa: E402
from corolla.server.backend import BlockBackend  # noqa: E402
from corolla.server.cache import CacheManager  # noqa: E402
from corolla.server.engine import Engine, Step  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="1b")
parser.add_argument("--device", default="cuda")
parser.add_argument("--steps", type=int, default=30, help="timed decode steps per measurement")
args = parser.parse_args()
device = torch.device(args.device)
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
config, backend, embed, head = build(args.preset, device, dtype, "none")
layers = config.num_hidden_layers
PROMPT, WARM_UP = 32, 3
# Each measurement's steps (warm-up included) extend the session: three timed measurements and the profiled steps.
SESSION_TOKENS = PROMPT + 3 * (WARM_UP + args.steps) + 5


def timed(fn, steps=args.steps):
    for _ in range(WARM_UP):  # also captures the graph of this step's shape
        fn(0)
    sync(device)
    began = time.perf_counter()
    for i in range(steps):
        fn(i)
    sync(device)
    return (time.perf_counter() - began) / steps * 1000


class Session:
    """One session of an engine, prefilled with PROMPT tokens; each call of `run_now` / `via_loop` is a decode step
    (returning the output on the CPU, as a server's step does)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.state = engine.open(0, backend.end, 1, SESSION_TOKENS)
        engine.reserve_now(self.state, SESSION_TOKENS)
        prompt = torch.randn(1, PROMPT, config.hidden_size, dtype=dtype)
        engine.run_now(Step(self.state, 0, SpanInputs(prompt, torch.arange(PROMPT)[None], None, None)))
        self.x = torch.randn(1, 1, config.hidden_size, dtype=dtype)

    def step(self) -> Step:
        position = self.state.length
        return Step(self.state, position, SpanInputs(self.x, torch.tensor([[position]]), None, None))

    def run_now(self, i=0):
        self.engine.run_now(self.step())

    def via_loop(self, loop, i=0):
        """The server's way: a coroutine on the loop submits the step; the engine's compute thread runs it."""
        asyncio.run_coroutine_threadsafe(self.engine.step(self.step()), loop).result()


def engine_times(engine: Engine) -> tuple[float, float, float, Session]:
    session = Session(engine)
    alone = timed(session.run_now)
    # The same with an asyncio loop running in another thread, as the server's RPC loop does.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    with_loop = timed(session.run_now)
    via_loop = timed(lambda i: session.via_loop(loop))
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    return alone, with_loop, via_loop, session


variants = {}
if backend.cuda_graphs:
    variants["engine (CUDA graphs)"] = Engine(backend, CacheManager(SESSION_TOKENS + 64, 64))
eager = BlockBackend(config, backend.spec, backend.blocks, backend.helpers, 0, device, dtype, cuda_graphs=False)
variants["engine (no graphs)"] = Engine(eager, CacheManager(SESSION_TOKENS + 64, 64))
results = {name: engine_times(engine) for name, engine in variants.items()}

hf = LlamaForCausalLM(config).to(device, dtype).eval()
with torch.no_grad():
    for ours_block, theirs_block in zip(backend.blocks, hf.model.layers):
        theirs_block.load_state_dict(ours_block.state_dict())
hf_cache = DynamicCache(config=config)
with torch.inference_mode():
    hf(torch.randint(0, 32000, (1, PROMPT), device=device), cache=hf_cache, use_cache=True)
    token = torch.tensor([[5]], device=device)
    theirs = timed(lambda i: hf.model(input_ids=token, cache=hf_cache, use_cache=True).last_hidden_state.cpu())
for name, (alone, with_loop, via_loop, _) in results.items():
    print(f"{args.preset} ({layers} blocks), {name}: run_now {alone:.2f} ms/step; run_now with an asyncio loop "
          f"thread {with_loop:.2f}; submitted on the loop to the engine's compute thread {via_loop:.2f}")
print(f"{args.preset} ({layers} blocks): transformers LlamaModel forward (+ .cpu()) {theirs:.2f} ms/step")

session = results["engine (no graphs)"][3]
activities = [torch.profiler.ProfilerActivity.CPU]
if device.type == "cuda":
    activities.append(torch.profiler.ProfilerActivity.CUDA)
with torch.profiler.profile(activities=activities) as prof:
    for i in range(5):
        session.run_now(i)
    sync(device)
print("engine (no graphs), 5 decode steps:")
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
for engine in variants.values():
    engine.shutdown()
