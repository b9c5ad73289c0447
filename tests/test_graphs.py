"""Steps over a static cache (what a GPU server captures in CUDA graphs, server/graphs.py) equal the ordinary steps,
through everything a session does between them: rollbacks, steps of a few tokens (a speculative draft verified, then
rolled back to its accepted part), steps too long for graphs, growing past the capacity.

On CPU the static step runs eagerly (the bookkeeping is the same); tests/test_gpu.py replays real graphs."""

import gc

import torch

from corolla.models.checkpoint import load_blocks, load_config, make_span_helpers
from corolla.models.spec import SpanInputs, family_for
from corolla.server.backend import BlockBackend
from corolla.server.graphs import MAX_GRAPH_TOKENS, MIN_CAPACITY, DecodeGraphs


def backends(model_dir, start, end, device="cpu", capture=False, dtype=torch.float32):
    """Two backends over the same blocks: steps the ordinary way, and steps of up to MAX_GRAPH_TOKENS tokens from a
    static cache."""
    config = load_config(model_dir)
    spec = family_for(config)
    blocks = load_blocks(model_dir, config, start, end, device, dtype)
    helpers = make_span_helpers(spec, config, device, dtype)
    ordinary = BlockBackend(config, spec, blocks, helpers, start, torch.device(device), dtype, cuda_graphs=False)
    graphed = BlockBackend(config, spec, blocks, helpers, start, torch.device(device), dtype, cuda_graphs=False)
    graphed.graphs = DecodeGraphs(config, spec.static_decode, helpers, torch.device(device), dtype, capture=capture)
    return ordinary, graphed


def session_script(hidden_size: int):
    """(kind, argument) steps of one session: prefill, decode, rollback, steps of a few tokens (drafts verified,
    then rolled back to their accepted part) that grow past the static cache's first capacity, a step too long
    for graphs, decode again."""
    generator = torch.Generator().manual_seed(3)

    def step(tokens: int):
        return "step", torch.randn(1, tokens, hidden_size, generator=generator)

    script = [step(MIN_CAPACITY - 6)]  # 250 tokens cached after it
    script += [step(1) for _ in range(3)] + [("rewind", 2)] + [step(1) for _ in range(2)]  # 253
    script += [step(3), step(5), ("rewind", 3)]  # 258: the 5-token step outgrew the first capacity
    script += [step(MAX_GRAPH_TOKENS + 4), step(4), ("rewind", 1)]  # 281
    script += [step(1) for _ in range(6)]
    return script


# The static path's steps in session_script (every step of 1 to MAX_GRAPH_TOKENS tokens after the prefill), and
# the graphs captured: one per step length and capacity (256: 1 and 3 tokens; 512: 5, 4 and 1).
SCRIPT_STATIC_STEPS = 3 + 2 + 2 + 1 + 6
SCRIPT_GRAPHS = 5


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
    check_equal(want, want_cache, got, got_cache, tolerance)
    return graphed, got_cache, (script, want, want_cache)


def check_equal(want, want_cache, got, got_cache, tolerance):
    for step, (a, b) in enumerate(zip(want, got)):
        torch.testing.assert_close(b, a, atol=tolerance, rtol=tolerance, msg=lambda m: f"step {step}: {m}")
    for layer in range(1, 4):
        torch.testing.assert_close(got_cache.layers[layer].keys, want_cache.layers[layer].keys, atol=tolerance,
                                   rtol=tolerance)


def second_session(graphed, first_run, tolerance=1e-5):
    """Once the first session's cache is gone, the same script in a new session: it takes over the first one's
    static cache and graphs (its 512 tokens fit from the start) and equals the ordinary steps again."""
    script, want, want_cache = first_run
    graphs = graphed.graphs
    gc.collect()
    assert not graphs._spans  # forgotten with the first session's cache
    got, got_cache = run_script(graphed, script, 1, 4)
    check_equal(want, want_cache, got, got_cache, tolerance)
    assert graphs.reused == 1
    assert graphs._spans[got_cache][(1, 4)].capacity == 2 * MIN_CAPACITY  # it never needed another
    return got_cache


def test_static_decode_steps_equal_ordinary_steps(tiny_llama):
    graphed, cache, first_run = compare(tiny_llama)
    graphs = graphed.graphs
    assert graphs.steps == SCRIPT_STATIC_STEPS  # every step of up to MAX_GRAPH_TOKENS tokens took the static path
    assert graphs._spans[cache][(1, 4)].capacity == 2 * MIN_CAPACITY  # the session grew past the first capacity
    assert graphs.reused == 0
    del cache
    second = second_session(graphed, first_run)
    assert graphs.steps == 2 * SCRIPT_STATIC_STEPS
    del second
    gc.collect()
    assert not graphs._spans


def test_static_decode_is_refused_where_it_does_not_apply(tiny_llama):
    _, graphed = backends(tiny_llama, 1, 4)
    cache = graphed.new_cache()
    hidden = torch.randn(1, 4, graphed.config.hidden_size)
    graphed.run_sync(1, 4, SpanInputs(hidden, torch.arange(4)[None], None, cache))
    one = torch.randn(1, 1, graphed.config.hidden_size)
    assert graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, cache))
    assert graphed.graphs.eligible(1, 4, SpanInputs(hidden, torch.arange(4, 8)[None], None, cache))  # 4 tokens
    longer = torch.randn(1, MAX_GRAPH_TOKENS + 1, graphed.config.hidden_size)
    assert not graphed.graphs.eligible(1, 4, SpanInputs(longer, torch.arange(4, 5 + MAX_GRAPH_TOKENS)[None], None,
                                                        cache))
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), torch.ones(1, 5), cache))  # mask
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, None))  # stateless
    prompts = torch.zeros(3, 1, 2, graphed.config.hidden_size)
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, cache, prompts=prompts))
    assert not graphed.graphs.eligible(1, 4, SpanInputs(one, torch.tensor([[4]]), None, graphed.new_cache()))
