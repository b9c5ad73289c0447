"""Per-family exactness in one process: transformers' own layers, split over spans, equal the full model."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.errors import NotAModelError, UnsupportedModelError
from corolla.models.checkpoint import (Checkpoint, config_dtype, load_blocks, load_client_parts, load_config,
                                       make_span_helpers)
from corolla.models.spec import SpanInputs, family_for


def run_split(model_dir, input_ids, spans, step_ids=None):
    config = load_config(model_dir)
    spec = family_for(config)
    parts = load_client_parts(model_dir, config, torch.float32)
    loaded = [(load_blocks(model_dir, config, a, b, "cpu", torch.float32),
               make_span_helpers(spec, config, "cpu", torch.float32), spec.make_cache(config), a)
              for a, b in spans]

    def through(ids, offset):
        positions = torch.arange(offset, offset + ids.shape[1])[None]
        hidden = spec.embed(config, parts, spec, ids, None, positions)
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
    with pytest.raises(UnsupportedModelError, match="'bert' is not supported; supported: bloom, falcon, gemma2, "
                                                    "gemma3_text, gpt2, llama, mistral, mixtral, phi3, qwen2, qwen3, "
                                                    "qwen3_moe"):
        load_config(tmp_path)


def test_sharded_checkpoint_opens_only_the_shards_of_the_requested_blocks(models_dir, monkeypatch):
    import corolla.models.checkpoint as checkpoint_module
    from tiny_models import make_tiny_llama

    path = models_dir / "tiny-sharded"
    if not (path / "config.json").is_file():
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(models_dir / "tiny-llama-for-shards", 5, seed=3))
        model.save_pretrained(path, max_shard_size="100KB")  # ~150 KB per block: about one shard per block
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(index.values())
    assert len(shards) >= 5
    wanted = {file for name, file in index.items() if name.startswith(("model.layers.2.", "model.layers.3."))}

    opened = []
    original = checkpoint_module.safe_open

    def spy(file, *args, **kwargs):
        opened.append(Path(file).name)
        return original(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "safe_open", spy)
    config = load_config(path)
    load_blocks(path, config, 2, 4, "cpu", torch.float32)
    assert set(opened) == wanted and len(wanted) < len(shards)
    monkeypatch.undo()

    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 320, (1, 7))
    logits, _ = run_split(path, ids, [(0, 2), (2, 5)])
    with torch.no_grad():
        assert (logits - reference(ids).logits).abs().max() < 1e-5


def test_checkpoint_dtype_from_config_unless_overridden(models_dir):
    from tiny_models import make_tiny_llama

    source = make_tiny_llama(models_dir / "tiny-llama-for-bf16", num_layers=2, seed=4)
    path = models_dir / "tiny-bf16"
    if not (path / "config.json").is_file():
        AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(path)
    config = load_config(path)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert config_dtype(config) == torch.bfloat16
    (block,) = load_blocks(path, config, 1, 2, "cpu", config_dtype(config))
    assert {p.dtype for p in block.parameters()} == {torch.bfloat16}
    (block,) = load_blocks(path, config, 1, 2, "cpu", torch.float32)  # an explicit dtype wins
    assert {p.dtype for p in block.parameters()} == {torch.float32}
    # Older checkpoints name it torch_dtype.
    legacy = json.loads((path / "config.json").read_text())
    legacy.pop("dtype")
    legacy["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(legacy))
    assert config_dtype(load_config(path)) == torch.float16
