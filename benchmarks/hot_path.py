"""Fixed costs of the decode hot path, measured piece by piece (issue 8; results in docs/benchmarks.md,
"Hot-path cuts"). Each figure is the median over rounds of the median (or min) of many repetitions, so short
bursts of other load on the machine change it little.

    .venv/bin/python benchmarks/hot_path.py            # micro-benchmarks, one process, no network (~2 min)
    .venv/bin/python benchmarks/hot_path.py --swarm    # also: CPU per token of each client thread and each
                                                       # swarm process (tiny-llama, 2 servers, 128 tokens)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import socket
import statistics
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corolla.models.rotary import cached_layer_types, layer_types  # noqa: E402
from corolla.models.spec import SpanInputs  # noqa: E402
from corolla.server.cache import CacheManager  # noqa: E402
from corolla.server.engine import Engine, SpanRequest  # noqa: E402


def frames() -> None:
    """One 2400-byte frame sent and received over a socketpair: header and payload written separately and read
    under asyncio.wait_for (before) against one write and asyncio.timeout (now)."""

    async def run():
        a, b = socket.socketpair()
        _, writer = streams_a = await asyncio.open_connection(sock=a)  # noqa: F841 (both ends must stay referenced)
        reader, _ = streams_b = await asyncio.open_connection(sock=b)  # noqa: F841
        payload = b"x" * 2400

        async def before():
            writer.write(b"abcd")
            writer.write(payload)
            await writer.drain()
            return await asyncio.wait_for(reader.readexactly(2404), 10)

        async def now():
            writer.write(b"abcd" + payload)
            await writer.drain()
            async with asyncio.timeout(10):
                return await reader.readexactly(2404)

        results = {"before": [], "now": []}
        for _ in range(5):
            for name, one in (("before", before), ("now", now)):
                times = []
                for _ in range(2000):
                    began = time.perf_counter()
                    await one()
                    times.append(time.perf_counter() - began)
                results[name].append(statistics.median(times))
        for name, values in results.items():
            print(f"frame send+receive, {name:6}: {statistics.median(values) * 1e6:6.1f} us")

    asyncio.run(run())


def layer_type_lookup() -> None:
    config = LlamaConfig(hidden_size=512, num_hidden_layers=8)
    for name, function in (("layer_types", layer_types), ("cached_layer_types", cached_layer_types)):
        best = min(timeit.repeat(lambda: function(config), number=2000, repeat=5)) / 2000
        print(f"{name:18} per step: {best * 1e6:8.2f} us")


def history() -> None:
    """Keeping a hop's input history at 84 tokens of hidden 512, on a thread other than the main one (as on the
    client's network thread): concatenating it (before) against writing the new token into a buffer (now); and the
    CPU time that the process's other threads (OpenMP workers) burn meanwhile."""
    past, x = torch.randn(1, 83, 512), torch.randn(1, 1, 512)
    buffer = torch.empty(1, 128, 512)

    def before():
        torch.cat([past, x], dim=1)

    def now():
        buffer[:, 83:84] = x

    def run_in_thread(function, n=2000):
        # As on the client: tensor work on a thread other than the one that first used torch.
        result = {}

        def body():
            function()
            began = time.perf_counter()
            for _ in range(n):
                function()
            result["seconds"] = (time.perf_counter() - began) / n
            cpu, own = time.process_time(), time.thread_time()
            for _ in range(n):
                function()
                time.sleep(0.0002)  # as between decode steps: other threads' spinning shows in the process's CPU
            result["others"] = ((time.process_time() - cpu) - (time.thread_time() - own)) / n

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        return result

    for name, function in (("before (torch.cat)", before), ("now (buffer write)", now)):
        result = run_in_thread(function)
        print(f"history update, {name}: {result['seconds'] * 1e6:6.1f} us per step; with 0.2 ms pauses, "
              f"CPU of other threads meanwhile {result['others'] * 1e6:6.1f} us per step")


def thread_hops() -> None:
    """Measured, not changed: the server's hand-off to its engine's compute thread and the client's to its network
    thread."""

    class Noop:
        """A backend of one block whose stateless forward returns its input: only the engine's hand-offs remain."""

        start, end, device, cuda_graphs = 0, 1, torch.device("cpu"), False

        def run_sync(self, start, end, inputs):
            return inputs.hidden

    async def engine_round_trip():
        engine = Engine(Noop(), CacheManager(64, 64))
        request = SpanRequest(0, 1, SpanInputs(torch.zeros(1, 1, 8), torch.zeros(1, 1, dtype=torch.long), None, None))
        times = []
        for _ in range(2000):
            began = time.perf_counter()
            await engine.forward(request)
            times.append(time.perf_counter() - began)
        engine.shutdown()
        return statistics.median(times[200:])

    print(f"server: asyncio loop -> compute thread -> loop: {asyncio.run(engine_round_trip()) * 1e6:6.1f} us")

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def noop():
        return None

    times = []
    for _ in range(3000):
        began = time.perf_counter()
        asyncio.run_coroutine_threadsafe(noop(), loop).result()
        times.append(time.perf_counter() - began)
    loop.call_soon_threadsafe(loop.stop)
    print(f"client: caller thread -> network thread -> caller: {statistics.median(times[500:]) * 1e6:6.1f} us")


def swarm_cpu(new_tokens: int = 128) -> None:
    """CPU time per token of each client thread and each swarm process, during one greedy generation."""
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from swarm_latency import make_model

    from corolla import AutoDistributedModelForCausalLM
    from corolla.launch import LocalSwarm, split_blocks

    workdir = Path(tempfile.mkdtemp(prefix="corolla-hot-path-"))
    model_dir = make_model(workdir / "tiny-llama")
    torch.manual_seed(1)
    input_ids = torch.cat([torch.tensor([[1]]), torch.randint(3, 32000, (1, 19))], dim=1)

    def cpu_by_process():
        me = psutil.Process()
        result = {}
        for process in [me] + me.children(recursive=True):
            try:
                times = process.cpu_times()
                name = "client" if process.pid == me.pid else " ".join(process.cmdline()[2:4])[:40]
                result[process.pid] = (name or process.name(), times.user + times.system)
            except psutil.Error:
                pass
        return result

    with LocalSwarm(workdir / "swarm") as swarm:
        swarm.start_dht()
        swarm.start_servers(model_dir, split_blocks(8, 2), ["--num-threads", "1"])
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            model.generate(input_ids, max_new_tokens=4)
            threads_before = {t.id: t.user_time + t.system_time for t in psutil.Process().threads()}
            before = cpu_by_process()
            began = time.perf_counter()
            model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            elapsed = time.perf_counter() - began
            after = cpu_by_process()
            names = {threading.main_thread().native_id: "caller (main)", model.swarm._thread.native_id: "network"}
            print(f"swarm: {elapsed / new_tokens * 1e3:.2f} ms/token; CPU ms per token:")
            for thread in psutil.Process().threads():
                spent = thread.user_time + thread.system_time - threads_before.get(thread.id, 0.0)
                print(f"  client thread {names.get(thread.id, thread.id)!s:14} {spent / new_tokens * 1e3:6.2f}")
            for pid, (name, total) in after.items():
                if pid in before:
                    print(f"  process {name:40} {(total - before[pid][1]) / new_tokens * 1e3:6.2f}")
        finally:
            model.close()


def wire_tensors() -> None:
    """WireTensor.from_torch / to_torch of one [1, 1, 512] float32 hidden state (each decode step does ~9)."""
    from corolla.net.wire import WireTensor

    hidden = torch.randn(1, 1, 512)
    sent = WireTensor.from_torch(hidden)
    for name, function in (("from_torch", lambda: WireTensor.from_torch(hidden)), ("to_torch", sent.to_torch)):
        best = min(timeit.repeat(function, number=20000, repeat=5)) / 20000
        print(f"wire {name:10} [1, 1, 512] float32: {best * 1e6:6.2f} us")


def _tiny_llama_layers(count: int = 4):
    """`count` tiny-llama decoder layers (random weights, seed 0, SDPA attention), their config and rotary."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8,
                         num_hidden_layers=count)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layers = [LlamaDecoderLayer(config, i).eval().requires_grad_(False) for i in range(count)]
    return config, layers, LlamaRotaryEmbedding(config)


def _step_time(layers, config, rotary, evict: torch.Tensor, prompt: int, tokens: int, steps: int,
               grow: bool) -> float:
    """Median time of `steps` steps of `tokens` new tokens through `layers` after a `prompt`-token prefill, the
    weights evicted from cache before each; `grow`: each step extends the cache, else it is cropped back."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    with torch.inference_mode():
        hidden, positions = torch.randn(1, prompt, 512), torch.arange(prompt)[None]
        for layer in layers:
            hidden = layer(hidden, position_ids=positions, cache=cache, use_cache=True,
                           position_embeddings=rotary(hidden, positions))
        times = []
        for step in range(steps):
            evict.sum()
            start = prompt + (step * tokens if grow else 0)
            hidden, positions = torch.randn(1, tokens, 512), torch.arange(start, start + tokens)[None]
            embeddings = rotary(hidden, positions)
            began = time.perf_counter()
            for layer in layers:
                hidden = layer(hidden, position_ids=positions, cache=cache, use_cache=True,
                               position_embeddings=embeddings)
            times.append(time.perf_counter() - began)
            if not grow:
                cache.crop(-tokens)
    return statistics.median(times)


def weight_layouts(rounds: int = 7) -> None:
    """One-token steps with weights read from memory, not cache (a 160 MB read between calls, as the rest of the
    pipeline does between a process's steps): the 32000 x 512 float32 LM head row-major, column-major,
    column-major on two threads (the client's _two_thread_linear), and row-major through RowDotLinear; then 4
    tiny-llama decoder layers (random weights) with every linear weight row-major against the ways that
    models/layout.py measures and picks (a copy of the same layers)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch.nn.functional as F

    from corolla.client.model import _two_thread_linear
    from corolla.models.layout import RowDotLinear, choose_layouts, set_layout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a multi-threaded eviction read would leave OpenMP workers spinning meanwhile
    evict = torch.randn(40_000_000)

    def timed(function, n=20):
        times = []
        for _ in range(n):
            evict.sum()
            time.sleep(0.001)
            began = time.perf_counter()
            function()
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    head = torch.nn.Linear(512, 32000, bias=False).requires_grad_(False)
    x = torch.randn(1, 1, 512)
    pool = ThreadPoolExecutor(1)
    row_dot = RowDotLinear.over(head)
    results: dict[str, list[float]] = {"row": [], "column": [], "column, two threads": [], "rowdot": []}
    with torch.no_grad():
        for _ in range(rounds):
            set_layout(head.weight, "row")
            results["row"].append(timed(lambda: F.linear(x, head.weight)))
            set_layout(head.weight, "column")
            results["column"].append(timed(lambda: F.linear(x, head.weight)))
            results["column, two threads"].append(timed(lambda: _two_thread_linear(head, pool, x)))
            set_layout(head.weight, "row")
            results["rowdot"].append(timed(lambda: row_dot(x)))
    pool.shutdown()
    for name, values in results.items():
        print(f"LM head 32000 x 512, one token, {name:20}: {statistics.median(values) * 1e3:6.2f} ms")

    config, layers, rotary = _tiny_llama_layers()
    measured, timings = choose_layouts(copy.deepcopy(layers), "auto")
    for timing in timings:
        print(f"  layout measured: {timing.describe()}")

    def decode_step_time(layers):
        return _step_time(layers, config, rotary, evict, prompt=20, tokens=1, steps=40, grow=True)

    steps: dict[str, list[float]] = {"all row-major": [], "measured layouts": []}
    for _ in range(rounds):
        steps["all row-major"].append(decode_step_time(layers))
        steps["measured layouts"].append(decode_step_time(measured))
    for name, values in steps.items():
        print(f"4 tiny-llama layers, decode step, {name:16}: {statistics.median(values) * 1e3:6.2f} ms")
    torch.set_num_threads(threads)


def verify_steps(rounds: int = 5) -> None:
    """Steps of several tokens (speculative decoding verifying drafts) on CPU, one thread, weights read from
    memory: 4 tiny-llama decoder layers (random weights) with every linear weight row-major through `F.linear`,
    against the ways models/layout.py measures (`rowdot` taking up to its measured row count); and the client's
    32000 x 512 LM head, as plain nn.Linear against the measured ways (two threads: halves, as the client decides).
    """
    from concurrent.futures import ThreadPoolExecutor

    from corolla.client.model import _splits, _two_thread_linear
    from corolla.models.layout import choose_layouts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    evict = torch.randn(40_000_000)
    config, layers, rotary = _tiny_llama_layers()
    measured, timings = choose_layouts(copy.deepcopy(layers), "auto")
    print("  layout measured: " + "; ".join(t.describe() for t in timings))
    torch.set_num_threads(2)  # the client's head: two threads, as decoding runs it
    head = torch.nn.Linear(512, 32000, bias=False).requires_grad_(False)
    (row_dot_head,), (head_timing,) = choose_layouts([copy.deepcopy(head)], "auto", split=True)
    print(f"  LM head measured: {head_timing.describe()}")
    torch.set_num_threads(1)

    def step_time(layers, tokens: int) -> float:
        return _step_time(layers, config, rotary, evict, prompt=100, tokens=tokens, steps=20, grow=False)

    def head_time(linear, pool, tokens: int) -> float:
        x, times = torch.randn(1, tokens, 512), []
        with torch.no_grad():
            for _ in range(20):
                evict.sum()
                began = time.perf_counter()
                _two_thread_linear(linear, pool, x) if _splits(linear, x) else linear(x)  # as the client decides
                times.append(time.perf_counter() - began)
        return statistics.median(times)

    for tokens in (1, 2, 4, 8, 11):
        steps: dict[str, list[float]] = {"F.linear": [], "measured": [], "head F.linear": [], "head measured": []}
        with ThreadPoolExecutor(1) as pool:
            for _ in range(rounds):
                steps["F.linear"].append(step_time(layers, tokens))
                steps["measured"].append(step_time(measured, tokens))
                torch.set_num_threads(2)
                steps["head F.linear"].append(head_time(head, pool, tokens))
                steps["head measured"].append(head_time(row_dot_head, pool, tokens))
                torch.set_num_threads(1)
        print(f"{tokens:2} tokens: 4 tiny-llama layers " + ", ".join(
            f"{name} {statistics.median(values) * 1e3:6.2f} ms" for name, values in steps.items()))
    torch.set_num_threads(threads)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--swarm", action="store_true", help="also measure CPU per token in a local swarm")
    args = parser.parse_args()
    frames()
    layer_type_lookup()
    history()
    thread_hops()
    wire_tensors()
    weight_layouts()
    verify_steps()
    if args.swarm:
        swarm_cpu()


if __name__ == "__main__":
    main()
