"""The engine (server/engine.py) owns every session's KV memory: whatever mix of prefills, decode steps, batched
steps, multi-token steps, rollbacks, beam reorders, sessions ending and new ones reusing their pages, each session
gets what plain transformers' layers give its own inputs run from scratch.

The graph bookkeeping (server/graphs.py: static index buffers, row and read buckets, padding rows) runs eagerly
here (capture=False); tests/test_gpu.py replays real graphs."""

import asyncio
import random

import pytest
import torch
from transformers import AutoConfig

from corolla.errors import BadRequestError, CacheFullError
from corolla.models.checkpoint import load_blocks, load_config, make_span_helpers
from corolla.models.spec import SpanInputs, family_for
from corolla.server.backend import BlockBackend
from corolla.server.cache import CacheManager
from corolla.server.engine import Engine, SpanRequest, Step
from corolla.server.graphs import BatchGraphs
from corolla.server.quantize import quantize_blocks
from tiny_models import FAMILY_CONFIGS, make_family, make_tiny_llama

TOLERANCE = 1e-5


def make_engine(model_dir, start, end, graphs=False, total_tokens=480, page_tokens=8, thread=False, device="cpu",
                dtype=torch.float32, capture=False, quant="none"):
    """An engine over blocks [start, end); graphs=True: steps go through the graph path (captured with capture=True
    on a GPU, else run eagerly from the graphs' buffers); quant: the blocks quantized as a server does."""
    config = load_config(model_dir)
    spec = family_for(config)
    blocks = load_blocks(model_dir, config, start, end, device if quant == "none" else "cpu", dtype)
    blocks = quantize_blocks(blocks, quant, torch.device(device), dtype)
    backend = BlockBackend(config, spec, blocks, make_span_helpers(spec, config, device, dtype), start,
                           torch.device(device), dtype, cuda_graphs=False)
    engine = Engine(backend, CacheManager(total_tokens, page_tokens), thread=thread)
    if graphs:
        engine.graphs = BatchGraphs(backend, engine.kv, capture=capture)
    return engine


def expected(engine, start_block, end_block, history, start):
    """The span's output for the tokens from `start` on, computed from scratch over the whole history."""
    positions = torch.arange(history.shape[1]).expand(history.shape[0], -1)
    output = engine.backend.run_sync(start_block, end_block, SpanInputs(history, positions, None, None))
    return output[:, start:]


async def run_together(engine, steps):
    """Submit the steps at once (one per session), run the queue, return their outputs in order."""
    tasks = [asyncio.ensure_future(engine.step(step)) for step in steps]
    for _ in range(3):
        await asyncio.sleep(0)
    engine.drain()
    return await asyncio.gather(*tasks)


def new_step(session, start, hidden, reorder=None):
    positions = torch.arange(start, start + hidden.shape[1]).expand(hidden.shape[0], -1)
    return Step(session, start, SpanInputs(hidden, positions, None, None), reorder)


def check_reproduction(engine, tolerance=TOLERANCE):
    """Four sessions prefill 20 tokens; one decode step planned as the batch [A, B], then as [C, D] (equal lengths:
    the graph path), then one more step each alone; each equals its own inputs run from scratch."""
    generator = torch.Generator().manual_seed(0)
    hidden_size, dtype = engine.backend.config.hidden_size, engine.backend.dtype
    prompts = {name: torch.randn(1, 20, hidden_size, generator=generator).to(dtype) for name in "ABCD"}
    decode = {name: [torch.randn(1, 1, hidden_size, generator=generator).to(dtype) for _ in range(2)]
              for name in "ABCD"}

    async def main():
        sessions = {name: engine.open(1, 4, 1, 64) for name in "ABCD"}
        for name, session in sessions.items():
            await engine.reserve(session, 22, timeout=0)
            await run_together(engine, [new_step(session, 0, prompts[name])])
        got = {name: [] for name in "ABCD"}
        for group in ("AB", "CD"):
            outputs = await run_together(engine, [new_step(sessions[n], 20, decode[n][0]) for n in group])
            for name, output in zip(group, outputs):
                got[name].append(output)
        for name in "ABCD":
            got[name] += await run_together(engine, [new_step(sessions[name], 21, decode[name][1])])
        for session in sessions.values():
            await engine.close(session)
        return got

    got = asyncio.run(main())
    assert engine.stats.largest_batch >= 2 and engine.graphs.replays >= 6
    for name in "ABCD":
        history = torch.cat([prompts[name], *decode[name]], dim=1)
        want = expected(engine, 1, 4, history, 20)
        for step in range(2):
            assert (got[name][step] - want[:, step:step + 1]).abs().max() < tolerance, (name, step)


def test_batched_steps_do_not_overwrite_each_others_memory(models_dir):
    """The reproduction of the aliasing bug: before the engine, the second batch's static cache overwrote A's and
    B's keys (3e-2 off) while C and D were exact."""
    model = make_tiny_llama(models_dir / "tiny-llama-5", num_layers=5)
    check_reproduction(make_engine(model, 1, 4, graphs=True))


class Schedule:
    """One random schedule: sessions open, step (alone and together), roll back, reorder beams and close."""

    def __init__(self, engine, seed, spans, max_live=5, tolerance=TOLERANCE):
        self.engine, self.rng, self.spans, self.max_live = engine, random.Random(seed), spans, max_live
        self.tolerance = tolerance
        self.torch_rng = torch.Generator().manual_seed(seed)
        self.hidden_size = engine.backend.config.hidden_size
        self.live = []  # [session, history of inputs [batch, length, hidden]]
        self.checked = 0

    def _hidden(self, batch, tokens):
        return torch.randn(batch, tokens, self.hidden_size, generator=self.torch_rng).to(self.engine.backend.dtype)

    def _choose_step(self, entry):
        session, history = entry
        rng = self.rng
        if session.length == 0:
            start, tokens = 0, rng.randint(1, 24)  # prefill: sometimes longer than a graph takes
        else:
            kind = rng.random()
            if kind < 0.45:
                start, tokens = session.length, 1
            elif kind < 0.65:
                start, tokens = session.length, rng.randint(2, 6)  # a draft being verified
            elif kind < 0.9:
                start, tokens = rng.randint(0, session.length), rng.randint(1, 4)  # rollback (start 0: a replay)
            else:
                start, tokens = session.length, rng.randint(7, 20)
        reorder = None
        if session.batch_size > 1 and start > 0 and rng.random() < 0.3:
            reorder = torch.tensor([rng.randrange(session.batch_size) for _ in range(session.batch_size)])
        return start, self._hidden(session.batch_size, tokens), reorder

    async def round(self):
        rng, engine = self.rng, self.engine
        for entry in list(self.live):
            if rng.random() < 0.12:
                await engine.close(entry[0])
                self.live.remove(entry)
        while len(self.live) < self.max_live and rng.random() < 0.5:
            start, end = rng.choice(self.spans)
            batch = rng.choice([1, 1, 2])
            self.live.append([engine.open(start, end, batch, 100), None])
        chosen = [entry for entry in self.live if rng.random() < 0.7]
        steps, planned = [], []
        for entry in chosen:
            start, hidden, reorder = self._choose_step(entry)
            if start + hidden.shape[1] > entry[0].max_length:
                continue
            try:
                await engine.reserve(entry[0], start + hidden.shape[1], timeout=0)
            except CacheFullError:
                continue
            steps.append(new_step(entry[0], start, hidden, reorder))
            planned.append((entry, start, hidden, reorder))
        outputs = await run_together(engine, steps)
        for (entry, start, hidden, reorder), output in zip(planned, outputs):
            session, history = entry
            past = history[:, :start] if history is not None else hidden[:, :0]
            if reorder is not None:
                past = past[reorder]
            entry[1] = history = torch.cat([past, hidden], dim=1)
            want = expected(engine, session.start_block, session.end_block, history, start)
            difference = (output - want).abs().max().item()
            assert difference < self.tolerance, (session.number, start, hidden.shape, reorder, difference)
            assert session.length == history.shape[1]
            self.checked += 1


def run_schedules(engine, seeds, spans, rounds=10, tolerance=TOLERANCE):
    checked = 0
    for seed in seeds:
        schedule = Schedule(engine, seed, spans, tolerance=tolerance)

        async def main():
            for _ in range(rounds):
                await schedule.round()
            for session, _ in schedule.live:
                await engine.close(session)

        asyncio.run(main())
        checked += schedule.checked
        assert engine.pages.free_pages == engine.pages.total_pages  # every page came back
    return checked


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-bookkeeping"])
def test_random_schedules_equal_each_session_alone(models_dir, graphs):
    """Hundreds of random schedules (80 per mode, 10 rounds each) on a tiny Llama; sessions over two spans."""
    model = make_tiny_llama(models_dir / "tiny-llama-5", num_layers=5)
    engine = make_engine(model, 1, 4, graphs=graphs)
    checked = run_schedules(engine, range(80), [(1, 4), (2, 4)])
    assert checked > 1500
    assert engine.stats.batched_requests > 250  # steps really shared forwards
    if graphs:
        assert engine.graphs.replays > 400


@pytest.mark.parametrize("family", [family for family in FAMILY_CONFIGS if family != "llama"])
def test_random_schedules_for_every_family(models_dir, family):
    """Sliding windows and mixed layers (Mistral, Gemma 2 and 3), ALiBi (BLOOM, Falcon-RW), learned positions
    (GPT-2), MoE (Mixtral), ...: the same differential test, 8 schedules each."""
    engine = make_engine(make_family(family, models_dir), 1, 4)
    checked = run_schedules(engine, range(8), [(1, 4), (1, 3)])
    assert checked > 100
    assert engine.stats.batched_requests > 15


@pytest.mark.parametrize("family", [family for family in FAMILY_CONFIGS if family != "llama"])
def test_graph_path_for_every_family_that_has_one(models_dir, family):
    """Families whose spec has a static decode (rotary ones with full attention, rotary Falcon) through the graphs'
    bookkeeping: 4 random schedules each; the others must say they have none."""
    model = make_family(family, models_dir)
    config = AutoConfig.from_pretrained(model)
    static = family_for(config).static_decode
    if static is None or not static.supports(config, 1, 4):
        pytest.skip(f"{family}: steps run the ordinary way (no static decode for this span)")
    engine = make_engine(model, 1, 4, graphs=True)
    checked = run_schedules(engine, range(4), [(1, 4), (1, 3)])
    assert checked > 50 and engine.graphs.replays > 20


def test_admission_and_bad_steps(tiny_llama):
    engine = make_engine(tiny_llama, 0, 5, total_tokens=256, page_tokens=64)
    with pytest.raises(CacheFullError, match=r"max_length=10{12} x batch 1 could never fit this server's 256 tokens "
                                             r"\(at most max_length=256 at this batch size\)"):
        engine.open(0, 5, 1, 10**12)
    with pytest.raises(CacheFullError, match="at most max_length=128"):
        engine.open(0, 5, 2, 200)
    with pytest.raises(BadRequestError, match="blocks 3:7 are not inside this server's span 0:5"):
        engine.open(3, 7, 1, 10)
    session = engine.open(0, 5, 1, 100)

    async def main():
        await engine.reserve(session, 4, timeout=0)
        hidden = torch.randn(1, 4, engine.backend.config.hidden_size)
        with pytest.raises(BadRequestError, match="start=2 is past the session's 0 cached tokens"):
            await engine.step(new_step(session, 2, hidden[:, :2]))
        await run_together(engine, [new_step(session, 0, hidden)])
        with pytest.raises(CacheFullError, match="before its cache room was reserved"):
            await engine.step(new_step(session, 4, torch.randn(1, 70, hidden.shape[2])))
        await engine.close(session)

    asyncio.run(main())
    assert engine.pages.free_pages == engine.pages.total_pages


def test_non_finite_outputs_are_an_error_and_leave_the_session_as_it_was(tiny_llama):
    engine = make_engine(tiny_llama, 0, 5)
    session = engine.open(0, 5, 1, 100)
    hidden = torch.randn(1, 3, engine.backend.config.hidden_size)

    async def main():
        await engine.reserve(session, 6, timeout=0)
        await run_together(engine, [new_step(session, 0, hidden)])
        broken = engine.backend.blocks[2].register_forward_hook(lambda module, args, output: output * float("nan"))
        try:  # a faulty device: finite inputs, NaN out
            with pytest.raises(RuntimeError, match="non-finite hidden states"):
                await run_together(engine, [new_step(session, 3, hidden[:, :1])])
        finally:
            broken.remove()
        assert session.length == 3
        return (await run_together(engine, [new_step(session, 3, hidden[:, :1])]))[0]

    got = asyncio.run(main())
    want = expected(engine, 0, 5, torch.cat([hidden, hidden[:, :1]], dim=1), 3)
    assert (got - want).abs().max() < TOLERANCE


def test_stateless_forward_and_backward_go_through_the_same_queue(tiny_llama):
    engine = make_engine(tiny_llama, 0, 5, thread=True)
    try:
        hidden = torch.randn(2, 5, engine.backend.config.hidden_size)
        inputs = SpanInputs(hidden, torch.arange(5).expand(2, -1), None, None)

        async def main():
            output = await engine.forward(SpanRequest(0, 5, inputs))
            grads = await engine.forward(SpanRequest(0, 5, inputs, grad_output=torch.ones_like(hidden)))
            return output, grads

        output, grads = asyncio.run(main())
        assert (output - engine.backend.run_sync(0, 5, inputs)).abs().max() < TOLERANCE
        assert grads.hidden.shape == hidden.shape
    finally:
        engine.shutdown()


def test_inference_steps_run_before_forward_requests(tiny_llama):
    engine = make_engine(tiny_llama, 1, 4, thread=True)
    order = []

    async def main():
        hidden = torch.randn(1, 4, engine.backend.config.hidden_size)
        positions = torch.arange(4)[None]
        blocker = asyncio.ensure_future(engine.forward(SpanRequest(1, 4, SpanInputs(
            torch.randn(1, 256, hidden.shape[2]), torch.arange(256)[None], None, None))))
        await asyncio.sleep(0)  # the compute thread takes the blocker; the next two wait in the queues
        session = engine.open(1, 4, 1, 10)
        await engine.reserve(session, 4, timeout=0)

        async def tagged(name, request):
            await (engine.step(request) if name == "inference" else engine.forward(request))
            order.append(name)

        await asyncio.gather(tagged("forward", SpanRequest(1, 4, SpanInputs(hidden, positions, None, None))),
                             tagged("inference", new_step(session, 0, hidden)))
        await blocker

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert order == ["inference", "forward"]


def test_a_lone_sessions_decode_steps_run_on_the_loop_thread(tiny_llama, monkeypatch):
    """alone=True: decode steps run on the calling (event loop) thread while the compute thread is idle and the
    last decode step was fast, with the same results; a prefill, the first decode step (its time unknown), a step
    that arrives while the compute thread is busy, and steps of a slow span still go through the thread."""
    import threading

    import corolla.server.engine as engine_module

    generator = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 6, 64, generator=generator)
    decode = [torch.randn(1, 1, 64, generator=generator) for _ in range(4)]

    def session(alone):
        engine = make_engine(tiny_llama, 1, 4, thread=True)
        threads = []
        run_steps = engine._run_steps

        def recording(steps):
            threads.append(threading.current_thread().name)
            return run_steps(steps)

        engine._run_steps = recording

        async def main():
            state = engine.open(1, 4, 1, 20)
            await engine.reserve(state, 10, timeout=0)
            outputs = [await engine.step(new_step(state, 0, prompt), alone=alone)]
            for step, hidden in enumerate(decode):
                if step == len(decode) - 1:  # the compute thread busy with a long forward meanwhile
                    long = SpanInputs(torch.randn(1, 256, 64), torch.arange(256)[None], None, None)
                    blocker = asyncio.ensure_future(engine.forward(SpanRequest(1, 4, long)))
                    for _ in range(5000):  # bounded: 5 s
                        if engine._computing:
                            break
                        await asyncio.sleep(0.001)
                outputs.append(await engine.step(new_step(state, 6 + step, hidden), alone=alone))
            await blocker
            return outputs

        try:
            return asyncio.run(main()), threads
        finally:
            engine.shutdown()

    expected_outputs, _ = session(alone=False)
    got, threads = session(alone=True)
    assert threads == ["corolla-compute"] * 2 + ["MainThread"] * 2 + ["corolla-compute"]
    for want, have in zip(expected_outputs, got):
        assert torch.allclose(want, have, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(engine_module, "_INLINE_MAX_S", 0.0)  # every span counts as slow
    _, threads = session(alone=True)
    assert threads == ["corolla-compute"] * 5


def test_graphs_take_the_steps_they_can_hold(tiny_llama):
    """Steps of 1 to 16 new tokens of plain sessions, up to 64 rows, reading up to 64 x 4096 bucket tokens."""
    engine = make_engine(tiny_llama, 1, 4, graphs=True)
    session = engine.open(1, 4, 1, 100)

    def step(start, rows=1, tokens=1, **extras):
        return Step(session, start, SpanInputs(torch.zeros(rows, tokens, 64), torch.zeros(rows, tokens,
                                                                                           dtype=torch.long),
                                               None, None, **extras))

    assert engine.graphs.eligible([step(100)]) and engine.graphs.eligible([step(100, tokens=16)])
    assert engine.graphs.eligible([step(4000, rows=64)])  # 64 rows x a read bucket of 4096
    assert not engine.graphs.eligible([step(4096, rows=64)])  # a read bucket of 8192: the ordinary way
    assert not engine.graphs.eligible([step(100, tokens=17)])
    assert not engine.graphs.eligible([step(100, rows=65)])
    assert not engine.graphs.eligible([step(100, prompts=torch.zeros(3, 1, 1, 64))])
