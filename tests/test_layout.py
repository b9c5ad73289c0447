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
from corolla.models.layout import choose_layouts, column_major, layout_of, linear_weights, set_layout
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


def test_blocks_in_column_layout_equal_transformers_forward_and_backward(tiny_llama):
    config = load_config(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    blocks = load_blocks(tiny_llama, config, 0, 2, "cpu", torch.float32)
    choose_layouts(linear_weights(blocks), "column")
    assert all(layout_of(w) == "column" for w in linear_weights(blocks))
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


def test_auto_measures_every_shape_and_keeps_values(tiny_llama):
    config = load_config(tiny_llama)
    blocks = load_blocks(tiny_llama, config, 0, 2, "cpu", torch.float32)
    weights = linear_weights(blocks)
    before = [w.detach().clone() for w in weights]
    timings = choose_layouts(weights, "auto")
    assert {t.shape for t in timings} == {tuple(w.shape) for w in weights}
    assert sum(t.count for t in timings) == len(weights) and all(t.row_s > 0 and t.column_s > 0 for t in timings)
    best = {t.shape: t.best for t in timings}
    for weight, old in zip(weights, before):
        assert layout_of(weight) == best[tuple(weight.shape)]
        assert torch.equal(weight.detach(), old)
    with pytest.raises(CorollaError, match="weight layout must be one of"):
        choose_layouts(weights, "diagonal")


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


@pytest.mark.parametrize("layout", ["row", "column"])
@pytest.mark.parametrize("bias", [False, True])
def test_two_thread_lm_head_equals_the_single_call(layout, bias):
    from concurrent.futures import ThreadPoolExecutor

    linear = nn.Linear(96, 1001, bias=bias).requires_grad_(False)  # odd size: unequal halves
    set_layout(linear.weight, layout)
    with ThreadPoolExecutor(1) as pool, torch.no_grad():
        for rows in (1, 2, 5):
            x = torch.randn(1, rows, 96)
            # The same products of the same rows; BLAS may block half a matrix differently (float rounding order).
            assert torch.allclose(_two_thread_linear(linear, pool, x), linear(x), rtol=1e-6, atol=1e-6)
