"""Reading a local Hugging Face-format model directory: config, identity, and only the tensors asked for."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from corolla.errors import NotAModelError
from corolla.models.spec import FamilySpec, family_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Config keys that do not change the math (where the files came from, runtime switches).
_IDENTITY_IGNORED_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                          "architectures", "_attn_implementation_autoset", "output_attentions",
                          "output_hidden_states", "return_dict"}


def load_config(model_dir: str | Path) -> PretrainedConfig:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise NotAModelError(
            f"{str(model_dir)!r} is not a model directory: expected a Hugging Face-format folder with config.json "
            f"and *.safetensors files"
        )
    config = AutoConfig.from_pretrained(path)
    family_for(config)  # fails early, with the list of supported families
    # sdpa is what transformers picks by default for these models; pin it so every peer computes the same way.
    config._attn_implementation = "sdpa"
    return config


def model_id(config: PretrainedConfig, name: str) -> str:
    """`name` plus a short hash of the config, so two different checkpoints with one name never mix in the DHT."""
    items = {k: v for k, v in config.to_dict().items() if k not in _IDENTITY_IGNORED_KEYS}
    digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:10]
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"
    return f"{safe_name}-{digest}"


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class Checkpoint:
    """Index of which safetensors file holds which tensor; reads only requested tensors."""

    def __init__(self, model_dir: str | Path):
        self.path = Path(model_dir)
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            self.file_of = {name: self.path / file for name, file in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise NotAModelError(f"{str(model_dir)!r} has no *.safetensors weights")
            self.file_of = {}
            for file in files:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        self.file_of[name] = file

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [name for name in self.file_of if name.startswith(prefix)]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in file_names:
                    tensors[name] = f.get_tensor(name)
        return tensors

    def read_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors under `prefix`, with the prefix stripped from their names."""
        names = self.names_with_prefix(prefix)
        return {name[len(prefix):]: tensor for name, tensor in self.read(names).items()}


def _load_module(module: nn.Module, state: dict[str, torch.Tensor], what: str, device, dtype) -> nn.Module:
    """Fill a module built on the meta device from a state dict; every parameter must come from the checkpoint."""
    expected = set(module.state_dict().keys())
    missing = sorted(expected - state.keys())
    if missing:
        raise NotAModelError(f"checkpoint lacks tensors for {what}: {', '.join(missing[:5])}")
    module.load_state_dict({k: state[k] for k in expected}, strict=True, assign=True)
    module.to(device=device, dtype=dtype)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.is_meta:
            raise NotAModelError(f"{what}: tensor {name} was not initialized from the checkpoint")
    return module


def load_blocks(model_dir: str | Path, config: PretrainedConfig, start: int, end: int,
                device: torch.device | str, dtype: torch.dtype) -> list[nn.Module]:
    """Build transformers' own decoder layers [start, end) and fill them with only their tensors."""
    spec = family_for(config)
    checkpoint = Checkpoint(model_dir)
    blocks = []
    for index in range(start, end):
        with torch.device("meta"):
            block = spec.block_class(config, index)
        state = checkpoint.read_prefix(spec.block_prefix.format(index=index))
        blocks.append(_load_module(block, state, f"block {index}", device, dtype).eval().requires_grad_(False))
    return blocks


def make_span_helpers(spec: FamilySpec, config: PretrainedConfig, device, dtype) -> dict[str, nn.Module]:
    # Helpers (e.g. rotary embeddings) hold no checkpoint weights, only buffers computed from the config.
    return {name: module.to(device) for name, module in spec.make_span_helpers(config).items()}


def load_client_parts(model_dir: str | Path, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The modules a client keeps (embeddings, final norm, LM head), built from transformers' own CausalLM class
    with zero decoder layers, filled with only their tensors. LM head shares the embeddings when tied."""
    spec = family_for(config)
    checkpoint = Checkpoint(model_dir)
    shallow = config.__class__.from_dict({**config.to_dict(), "num_hidden_layers": 0})
    with torch.device("meta"):
        skeleton = spec.causal_lm_class(shallow)
    parts = {}
    for path in spec.client_paths:
        module = skeleton.get_submodule(path)
        state = checkpoint.read_prefix(path + ".")
        tied = path == spec.lm_head_path and getattr(config, "tie_word_embeddings", False)
        if tied and not state:
            parts[path] = module  # weights assigned below from the embeddings
            continue
        parts[path] = _load_module(module, state, path, "cpu", dtype)
    head, embeddings = parts[spec.lm_head_path], parts[spec.embeddings_path]
    if getattr(config, "tie_word_embeddings", False) and head.weight.is_meta:
        head.weight = embeddings.weight
    for module in parts.values():
        module.requires_grad_(False)
    return parts
