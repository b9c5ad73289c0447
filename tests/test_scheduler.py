"""The compute thread batches decode steps of concurrent sessions without changing any session's results."""

import asyncio

import torch

from corolla.models.checkpoint import load_blocks, load_config, make_span_helpers
from corolla.models.spec import SpanInputs, family_for
from corolla.server.backend import BlockBackend
from corolla.server.scheduler import Scheduler


def make_backend(model_dir, start, end):
    config = load_config(model_dir)
    spec = family_for(config)
    blocks = load_blocks(model_dir, config, start, end, "cpu", torch.float32)
    return BlockBackend(config, spec, blocks, make_span_helpers(spec, config, "cpu", torch.float32), start,
                        torch.device("cpu"), torch.float32)


def session_inputs(config, seed, prompt_length, steps):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(1, prompt_length, config.hidden_size, generator=generator)
    decode = [torch.randn(1, 1, config.hidden_size, generator=generator) for _ in range(steps)]
    return prompt, decode


async def run_session(scheduler, backend, prompt, decode):
    cache = backend.new_cache()
    outputs = [await scheduler.run(1, 4, SpanInputs(prompt, torch.arange(prompt.shape[1])[None], None, cache), True)]
    for step, hidden in enumerate(decode):
        position = torch.tensor([[prompt.shape[1] + step]])
        outputs.append(await scheduler.run(1, 4, SpanInputs(hidden, position, None, cache), True))
    return outputs


def test_batched_decode_equals_each_session_alone(tiny_llama):
    backend = make_backend(tiny_llama, 1, 4)
    sessions = [session_inputs(backend.config, seed, length, 6) for seed, length in enumerate([3, 9, 5, 14, 1])]

    async def alone():
        scheduler = Scheduler(backend)
        try:
            return [await run_session(scheduler, backend, *s) for s in sessions]
        finally:
            scheduler.shutdown()

    async def together():
        scheduler = Scheduler(backend)
        try:
            return await asyncio.gather(*(run_session(scheduler, backend, *s) for s in sessions)), scheduler.stats
        finally:
            scheduler.shutdown()

    expected = asyncio.run(alone())
    got, stats = asyncio.run(together())
    assert stats.largest_batch >= 3, stats  # decode steps of different sessions really shared forwards
    for want_steps, got_steps in zip(expected, got):
        for want, have in zip(want_steps, got_steps):
            assert (want - have).abs().max() < 1e-5


def test_inference_runs_before_forward(tiny_llama):
    backend = make_backend(tiny_llama, 1, 4)
    order = []

    async def main():
        scheduler = Scheduler(backend)
        hidden = torch.randn(1, 4, backend.config.hidden_size)
        positions = torch.arange(4)[None]
        blocker = asyncio.ensure_future(scheduler.run(1, 4, SpanInputs(torch.randn(1, 256, backend.config.hidden_size),
                                                                       torch.arange(256)[None], None, None), False))
        await asyncio.sleep(0)  # the compute thread takes the blocker; the next two wait in the queues

        async def tagged(name, inference, cache):
            await scheduler.run(1, 4, SpanInputs(hidden, positions, None, cache), inference)
            order.append(name)

        await asyncio.gather(tagged("forward", False, None), tagged("inference", True, backend.new_cache()))
        await blocker
        scheduler.shutdown()

    asyncio.run(main())
    assert order == ["inference", "forward"]


def test_a_lone_sessions_decode_steps_run_on_the_loop_thread(tiny_llama, monkeypatch):
    """alone=True: decode steps run on the calling (event loop) thread while the compute thread is idle and the
    last decode step was fast, with the same results; a prefill, the first decode step (its time unknown), a step
    that arrives while the compute thread is busy, and steps of a slow span still go through the thread."""
    import threading

    backend = make_backend(tiny_llama, 1, 4)
    prompt, decode = session_inputs(backend.config, 3, 6, 4)
    threads = []
    run_sync = backend.run_sync

    def recording_run_sync(*args):
        threads.append(threading.current_thread().name)
        return run_sync(*args)

    async def session(alone):
        scheduler = Scheduler(backend)
        try:
            cache = backend.new_cache()
            outputs = [await scheduler.run(1, 4, SpanInputs(prompt, torch.arange(6)[None], None, cache), True,
                                           alone=alone)]
            for step, hidden in enumerate(decode):
                if step == len(decode) - 1:  # the compute thread busy with a long forward meanwhile
                    long = torch.randn(1, 256, backend.config.hidden_size)
                    blocker = asyncio.ensure_future(
                        scheduler.run(1, 4, SpanInputs(long, torch.arange(256)[None], None, None), False))
                    for _ in range(5000):  # bounded: 5 s
                        if scheduler._computing:
                            break
                        await asyncio.sleep(0.001)
                outputs.append(await scheduler.run(1, 4, SpanInputs(hidden, torch.tensor([[6 + step]]), None, cache),
                                                   True, alone=alone))
            await blocker
            return outputs
        finally:
            scheduler.shutdown()

    expected = asyncio.run(session(alone=False))
    backend.run_sync = recording_run_sync
    got = asyncio.run(session(alone=True))
    assert threads == ["corolla-compute"] * 2 + ["MainThread"] * 2 + ["corolla-compute"] * 2
    for want, have in zip(expected, got):
        assert torch.allclose(want, have, rtol=1e-6, atol=1e-6)

    import corolla.server.scheduler as scheduler_module

    threads.clear()
    monkeypatch.setattr(scheduler_module, "_INLINE_MAX_S", 0.0)  # every span counts as slow
    asyncio.run(session(alone=True))
    assert threads == ["corolla-compute"] * 6
