"""Per-family exactness in one process: transformers' own layers, split over spans, equal the full model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.errors import NotAModelError, UnsupportedModelError
from corolla.models.checkpoint import Checkpoint, load_blocks, load_client_parts, load_config, make_span_helpers
from corolla.models.spec import SpanInputs, family_for


def run_split(model_dir, input_ids, spans, step_ids=None):
    config = load_config(model_dir)
    spec = family_for(config)
    parts = load_client_parts(model_dir, config, torch.float32)
    loaded = [(load_blocks(model_dir, config, a, b, "cpu", torch.float32),
               make_span_helpers(spec, config, "cpu", torch.float32), spec.make_cache(config), a)
              for a, b in spans]

    def through(ids, offset):
        hidden = spec.embed(config, parts, spec, ids, None, None)
        positions = torch.arange(offset, offset + ids.shape[1])[None]
        for blocks, helpers, cache, first in loaded:
            hidden = spec.run_span(config, helpers, blocks, first, SpanInputs(hidden, positions, None, cache))
        return spec.head(config, parts, spec, hidden)

    with torch.inference_mode():
        logits = through(input_ids, 0)
        step_logits = through(step_ids, input_ids.shape[1]) if step_ids is not None else None
    return logits, step_logits


def test_split_llama_equals_transformers(tiny_llama):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids, nxt = torch.randint(3, 320, (2, 9)), torch.randint(3, 320, (2, 1))
    logits, step_logits = run_split(tiny_llama, ids, [(0, 2), (2, 3), (3, 5)], nxt)
    with torch.no_grad():
        want = reference(torch.cat([ids, nxt], dim=1)).logits
    assert (logits - want[:, :-1]).abs().max() < 1e-5
    assert (step_logits - want[:, -1:]).abs().max() < 1e-5


def test_tied_embeddings(models_dir):
    from tiny_models import make_tiny_llama

    path = make_tiny_llama(models_dir / "tiny-tied", num_layers=2, tie=True)
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 320, (1, 6))
    logits, _ = run_split(path, ids, [(0, 1), (1, 2)])
    with torch.no_grad():
        assert (logits - reference(ids).logits).abs().max() < 1e-5


def test_server_loads_only_its_blocks(tiny_llama):
    config = load_config(tiny_llama)
    checkpoint = Checkpoint(tiny_llama)
    read_names = []
    original_read = Checkpoint.read

    def spy(self, names):
        read_names.extend(names)
        return original_read(self, names)

    Checkpoint.read = spy
    try:
        blocks = load_blocks(tiny_llama, config, 2, 4, "cpu", torch.float32)
    finally:
        Checkpoint.read = original_read
    assert read_names and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in read_names)
    loaded = sum(p.numel() for block in blocks for p in block.parameters())
    in_span = sum(checkpoint.read([n]).popitem()[1].numel() for n in read_names)
    total = sum(t.numel() for t in checkpoint.read(list(checkpoint.file_of)).values())
    assert loaded == in_span and loaded < total / 2


def test_not_a_model_and_unsupported_family(tmp_path):
    with pytest.raises(NotAModelError, match="is not a model directory"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported; supported: llama"):
        load_config(tmp_path)
