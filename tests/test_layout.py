"""CPU weight layouts (models/layout.py) and the client's two-thread LM head: the same values and the same math as
plain transformers, whatever strides the weights get."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

from corolla.client.model import _lay_out_lm_head, _two_thread_linear
from corolla.errors import CorollaError
from corolla.models.checkpoint import load_blocks, load_client_parts, load_config
from corolla.models.layout import (FEW_ROWS, RowDotLinear, choose_layouts, column_major, layout_of, linear_weights,
                                   set_layout)
from corolla.models.spec import family_for
from tiny_models import make_tiny_llama


def test_column_major_keeps_values_and_parameter():
    linear = nn.Linear(24, 40)
    weight, before = linear.weight, linear.weight.detach().clone()
    set_layout(weight, "column")
    assert linear.weight is weight and layout_of(weight) == "column" and weight.stride() == (1, 40)
    assert torch.equal(weight.detach(), before)
    x = torch.randn(3, 24)
    assert torch.allclose(linear(x), F.linear(x, before, linear.bias), rtol=1e-6, atol=1e-6)
    set_layout(weight, "row")
    assert weight.is_contiguous() and torch.equal(weight.detach(), before)
    assert layout_of(column_major(torch.randn(5, 1))) == "row"  # one column: both layouts are the same strides


@pytest.mark.parametrize("layout", ["column", "rowdot"])
def test_blocks_in_a_layout_equal_transformers_forward_backward_and_decode(tiny_llama, layout):
    config = load_config(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    blocks = load_blocks(tiny_llama, config, 0, 2, "cpu", torch.float32)
    same, _ = choose_layouts(blocks, layout)
    assert same == blocks
    assert all(layout_of(w) == ("column" if layout == "column" else "row") for w in linear_weights(blocks))
    linears = [m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 14 and all((type(m) is RowDotLinear) == (layout == "rowdot") for m in linears)
    rotary = reference.model.rotary_emb
    hidden = torch.randn(2, 7, config.hidden_size, requires_grad=True)
    positions = torch.arange(7)[None].expand(2, -1)
    embeddings = rotary(hidden, positions)

    def through(layers, x):
        for layer in layers:
            x = layer(x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
        return x

    ours = through(blocks, hidden)
    theirs = through(reference.model.layers[:2], hidden)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    grad_ours, = torch.autograd.grad(ours.sum(), hidden)
    grad_theirs, = torch.autograd.grad(theirs.sum(), hidden)
    assert torch.allclose(grad_ours, grad_theirs, rtol=1e-5, atol=1e-5)

    # One-token steps over a cache: the products `rowdot` computes with numpy.
    from transformers import DynamicCache

    caches = DynamicCache(config=config), DynamicCache(config=config)
    with torch.inference_mode():
        for step in range(3):
            length = 5 if step == 0 else 1
            x = torch.randn(1, length, config.hidden_size)
            positions = torch.arange(length)[None] + (0 if step == 0 else 4 + step)
            embeddings = rotary(x, positions)
            outs = []
            for layers, cache in zip((blocks, reference.model.layers[:2]), caches):
                y = x
                for layer in layers:
                    y = layer(y, position_ids=positions, cache=cache, use_cache=True,
                              position_embeddings=embeddings)
                outs.append(y)
            assert torch.allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_auto_measures_every_shape_and_keeps_values(tiny_llama):
    config = load_config(tiny_llama)
    blocks = load_blocks(tiny_llama, config, 0, 2, "cpu", torch.float32)
    weights = linear_weights(blocks)
    before = [w.detach().clone() for w in weights]
    _, timings = choose_layouts(blocks, "auto")
    assert {t.shape for t in timings} == {tuple(w.shape) for w in weights}
    assert sum(t.count for t in timings) == len(weights)
    assert all(set(t.seconds) == {"row", "column", "rowdot"} and min(t.seconds.values()) > 0 for t in timings)
    best = {t.shape: t.best for t in timings}
    modules = {id(m.weight): m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)}
    for weight, old in zip(weights, before):
        way = best[tuple(weight.shape)]
        assert layout_of(weight) == ("column" if way == "column" else "row")
        assert (type(modules[id(weight)]) is RowDotLinear) == (way == "rowdot")
        assert torch.equal(weight.detach(), old)
    with pytest.raises(CorollaError, match="weight layout must be one of"):
        choose_layouts(blocks, "diagonal")


def test_auto_gives_rowdot_only_to_plain_linear_layers():
    class OwnLinear(nn.Linear):  # like Falcon's FalconLinear: a subclass with its own forward
        pass

    block = nn.Sequential(nn.Linear(512, 512, bias=False), OwnLinear(512, 512, bias=False)).requires_grad_(False)
    (same,), timings = choose_layouts([block], "auto")
    assert same is block
    (timing,) = timings
    assert timing.count == 2 and timing.best_among(("row", "column")) in ("row", "column")
    assert type(block[0]) is (RowDotLinear if timing.best == "rowdot" else nn.Linear)
    assert type(block[1]) is OwnLinear
    assert layout_of(block[1].weight) == timing.best_among(("row", "column"))


def test_tied_lm_head_stays_the_embeddings_parameter(models_dir):
    path = make_tiny_llama(models_dir / "tiny-llama-tied-layout", num_layers=2, tie=True)
    config = load_config(path)
    spec = family_for(config)
    parts = load_client_parts(path, config, torch.float32)
    table = parts[spec.embeddings_path].weight.detach().clone()
    _lay_out_lm_head(parts, spec, "column")
    embeddings, lm_head = parts[spec.embeddings_path], parts[spec.lm_head_path]
    assert lm_head.weight is embeddings.weight and layout_of(lm_head.weight) == "column"
    ids = torch.tensor([[5, 1, 319, 5]])
    assert torch.equal(embeddings(ids), table[ids])
    _lay_out_lm_head(parts, spec, "auto")  # measures a lookup in the table too; still one Parameter
    assert parts[spec.lm_head_path].weight is parts[spec.embeddings_path].weight
    _lay_out_lm_head(parts, spec, "rowdot")
    lm_head = parts[spec.lm_head_path]
    assert type(lm_head) is RowDotLinear and lm_head.weight is parts[spec.embeddings_path].weight
    assert layout_of(lm_head.weight) == "row" and torch.equal(embeddings(ids), table[ids])


@pytest.mark.parametrize("bias", [False, True])
def test_row_dot_linear_equals_linear_and_falls_back(bias):
    linear = nn.Linear(96, 1001, bias=bias)
    module = RowDotLinear.over(linear)
    assert module.weight is linear.weight and module.bias is linear.bias
    with torch.no_grad():
        for shape in ((96,), (1, 96), (1, 1, 96), (1, 3, 96), (2, 1, 96)):
            x = torch.randn(*shape)
            assert torch.allclose(module(x), linear(x), rtol=1e-5, atol=1e-5), shape
        x = torch.randn(1, 2 * 96)[:, ::2]  # strided one-token input
        assert torch.allclose(module(x), linear(x), rtol=1e-5, atol=1e-5)
        for dtype in (torch.float64, torch.bfloat16):  # numpy's dot products are used for float32 only
            other = RowDotLinear.over(nn.Linear(96, 7, bias=bias).to(dtype))
            x = torch.randn(1, 1, 96, dtype=dtype)
            assert torch.equal(other(x), F.linear(x, other.weight, other.bias))
    x = torch.randn(1, 1, 96, requires_grad=True)  # autograd: F.linear, so gradients flow
    module(x).sum().backward()
    assert linear.weight.grad is not None and torch.allclose(x.grad, linear.weight.detach().sum(0).expand(1, 1, 96),
                                                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_row_dot_linear_takes_several_rows_up_to_max_rows(bias):
    linear = nn.Linear(96, 5000, bias=bias).requires_grad_(False)  # 1.9 MB: several blocks of weight rows
    module = RowDotLinear.over(linear)
    module.max_rows = 8
    with torch.no_grad():
        for rows in (2, 5, 8, 9):
            x = torch.randn(1, rows, 96)
            got = module(x)
            assert torch.allclose(got, linear(x), rtol=1e-5, atol=1e-5), rows
            # Up to max_rows, each row's outputs are those of that row alone (a verified draft token's logits equal
            # a one-token step's); past it, F.linear.
            if rows <= 8:
                assert torch.equal(got, torch.cat([module(x[:, i:i + 1]) for i in range(rows)], dim=1)), rows
            else:
                assert torch.equal(got, F.linear(x, linear.weight, linear.bias))


def test_auto_measures_the_rows_rowdot_takes(tiny_llama):
    config = load_config(tiny_llama)
    blocks = load_blocks(tiny_llama, config, 0, 2, "cpu", torch.float32)
    _, timings = choose_layouts(blocks, "auto")
    modules = [m for block in blocks for m in block.modules() if isinstance(m, nn.Linear)]
    rows = {t.shape: t.rowdot_rows for t in timings}
    assert all(count in (1, *FEW_ROWS) for count in rows.values())
    assert all(t.rowdot_rows == 1 for t in timings if t.best != "rowdot")
    for module in modules:
        if type(module) is RowDotLinear:
            assert module.max_rows == rows[tuple(module.weight.shape)]
    (explicit,), _ = choose_layouts([nn.Linear(96, 64).requires_grad_(False)], "rowdot")
    assert type(explicit) is RowDotLinear and explicit.max_rows == 1


@pytest.mark.parametrize("layout", ["row", "column", "rowdot"])
@pytest.mark.parametrize("bias", [False, True])
def test_two_thread_lm_head_equals_the_single_call(layout, bias):
    from concurrent.futures import ThreadPoolExecutor

    linear = nn.Linear(96, 1001, bias=bias).requires_grad_(False)  # odd size: unequal halves
    (linear,), _ = choose_layouts([linear], layout)
    assert (type(linear) is RowDotLinear) == (layout == "rowdot")
    with ThreadPoolExecutor(1) as pool, torch.no_grad():
        if layout == "rowdot":
            linear.max_rows = 4  # rows past it: F.linear on each half
        for rows in (1, 2, 5):
            x = torch.randn(1, rows, 96)
            # The same products of the same rows; BLAS may block half a matrix differently (float rounding order).
            assert torch.allclose(_two_thread_linear(linear, pool, x), linear(x), rtol=1e-6, atol=1e-6)
