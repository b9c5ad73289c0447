"""Decode steps over a static cache (what a GPU server captures in CUDA graphs, server/graphs.py) equal the ordinary
steps, through everything a session does between them: rollbacks, multi-token steps, growing past the capacity.

On CPU the static step runs eagerly (the bookkeeping is the same); tests/test_gpu.py replays real graphs."""

import torch

from corolla.models.checkpoint import load_blocks, load_config, make_span_helpers
from corolla.models.spec import SpanInputs, family_for
from corolla.server.backend import BlockBackend
from corolla.server.graphs import MIN_CAPACITY, DecodeGraphs


def backends(model_dir, start, end, device="cpu", capture=False, dtype=torch.float32):
    """Two backends over the same blocks: steps the ordinary way, and single-token steps from a static cache."""
    config = load_config(model_dir)
    spec = family_for(config)
    blocks = load_blocks(model_dir, config, start, end, device, dtype)
    helpers = make_span_helpers(spec, config, device, dtype)
    ordinary = BlockBackend(config, spec, blocks, helpers, start, torch.device(device), dtype, cuda_graphs=False)
    graphed = BlockBackend(config, spec, blocks, helpers, start, torch.device(device), dtype, cuda_graphs=False)
    graphed.graphs = DecodeGraphs(config, spec.static_decode, helpers, torch.device(device), dtype, capture=capture)
    return ordinary, graphed


def session_script(hidden_size: int):
    """(kind, argument) steps of one session: prefill, decode, rollback, a multi-token step, growing past the
    static cache's first capacity."""
    generator = torch.Generator().manual_seed(3)
    prompt = MIN_CAPACITY - 6
    script = [("step", torch.randn(1, prompt, hidden_size, generator=generator))]
    script += [("step", torch.randn(1, 1, hidden_size, generator=generator)) for _ in range(3)]
    script += [("rewind", 2)]
    script += [("step", torch.randn(1, 1, hidden_size, generator=generator)) for _ in range(2)]
    script += [("step", torch.randn(1, 3, hidden_size, generator=generator))]
    script += [("step", torch.randn(1, 1, hidden_size, generator=generator)) for _ in range(6)]
    return script


def run_script(backend, script, start, end):
    cache, length, outputs = backend.new_cache(), 0, []
    for kind, argument in script:
        if kind == "rewind":
            cache.crop(-argument)
            length -= argument
            continue
        positions = torch.arange(length, length + argument.shape[1])[None]
        outputs.append(backend.run_sync(start, end, SpanInputs(argument, positions, None, cache)))
        length += argument.shape[1]
    return outputs, cache


def compare(model_dir, device="cpu", capture=False, tolerance=1e-5):
    ordinary, graphed = backends(model_dir, 1, 4, device, capture)
    script = session_script(ordinary.config.hidden_size)
    want, want_cache = run_script(ordinary, script, 1, 4)
    got, got_cache = run_script(graphed, script, 1, 4)
    for step, (a, b) in enumerate(zip(want, got)):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance, msg=lambda m: f"step {step}: {m}")
    for layer in range(1, 4):
        torch.testing.assert_close(got_cache.layers[layer].keys, want_cache.layers[layer].keys, atol=tolerance,
                                   rtol=tolerance)
    return graphed.graphs, got_cache


def test_static_decode_steps_equal_ordinary_steps(tiny_llama):
    graphs, cache = compare(tiny_llama)
    assert graphs.steps == 3 + 2 + 6  # every single-token step took the static path
    assert graphs._spans[cache][(1, 4)].capacity == 2 * MIN_CAPACITY  # the session grew past the first capacity
    del cache
    assert not graphs._spans  # forgotten with the session's cache


def test_static_decode_is_refused_where_it_does_not_apply(tiny_llama):
    _, graphed = backends(tiny_llama, 1, 4)
    cache = graphed.new_cache()
    hidden = torch.randn(1, 4, graphed.config.hidden_size)
    graphed.run_sync(1, 4, SpanInputs(hidden, torch.arange(4)[None], None, cache))
    one = torch.randn(1, 1, graphed.config.hidden_size)
    assert graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, cache))
    assert not graphed.graphs.eligible(1, 4, SpanInputs(hidden, torch.arange(4, 8)[None], None, cache))  # 4 tokens
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), torch.ones(1, 5), cache))  # mask
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, None))  # stateless
    prompts = torch.zeros(3, 1, 2, graphed.config.hidden_size)
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, cache, prompts=prompts))
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, graphed.new_cache()))
