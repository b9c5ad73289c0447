"""Reading a local Hugging Face-format model directory: config, identity, and only the tensors asked for.

Blocks and client parts are transformers' own modules, taken from the family's *ForCausalLM built on the meta
device (no memory), and filled by transformers' own loader with only their tensors. That loader also applies
transformers' checkpoint conversions (e.g. per-expert MoE tensors fused into one, legacy names), so a module
is filled exactly as `from_pretrained` would fill it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

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
    spec = family_for(config)  # fails early, with the list of supported families
    spec.check_config(config)
    # Pin the attention implementation transformers picks for this family, so every peer computes the same way.
    config._attn_implementation = spec.attn_implementation
    return config


def model_id(config: PretrainedConfig, name: str) -> str:
    """`name` plus a short hash of the config, so two different checkpoints with one name never mix in the DHT."""
    items = {k: v for k, v in config.to_dict().items() if k not in _IDENTITY_IGNORED_KEYS}
    digest = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:10]
    safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"
    return f"{safe_name}-{digest}"


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    """The checkpoint's dtype from config.json (`dtype`, or the older `torch_dtype`); float32 when it names none."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype.removeprefix("torch."))
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


class Checkpoint:
    """Index of which safetensors file holds which tensor; reads only requested tensors.

    With `model.safetensors.index.json` (a sharded save) no weight file is opened until a tensor is read, and a
    read opens only the shards that hold the requested tensors."""

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

    def names_with_prefix(self, *prefixes: str) -> list[str]:
        return [name for name in self.file_of if name.startswith(prefixes)]

    def numel(self, names: list[str]) -> int:
        """Total elements of these tensors, from the files' headers (no tensor data is read)."""
        total = 0
        for file in {self.file_of[name] for name in names}:
            with safe_open(file, framework="pt") as f:
                total += sum(math.prod(f.get_slice(name).get_shape()) for name in names if self.file_of[name] == file)
        return total

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


def checkpoint_names(checkpoint: Checkpoint, causal_lm_class: type, paths: list[str]) -> list[str]:
    """Names of the checkpoint tensors of the modules at `paths` (e.g. `spec.block_path(i)`), before any conversion.

    Checkpoints saved from the base model (e.g. GPT-2's own: "h.0.attn...", not "transformer.h.0.attn...") lack the
    base model prefix; those names count too (transformers' loader adds the prefix back)."""
    prefixes = tuple(path + "." for path in paths)
    base = causal_lm_class.base_model_prefix + "."
    bare = tuple(prefix[len(base):] for prefix in prefixes if prefix.startswith(base))
    return checkpoint.names_with_prefix(*prefixes, *bare)


def meta_model(spec: FamilySpec, config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The family's whole *ForCausalLM on the meta device: module structure and names, no memory.

    Built from a copy of the config: transformers' constructor resolves implementation choices (attention, MoE
    experts) into the config it is given, and the caller's config must stay as loaded."""
    with torch.device("meta"):
        model = spec.causal_lm_class(copy.deepcopy(config))
    return model.to(dtype=dtype).eval()


@contextlib.contextmanager
def no_progress_bars():
    """transformers' own progress bars off for a while (they would fill server logs), restored after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def fill_modules(model: PreTrainedModel, paths: list[str], checkpoint: Checkpoint, device, dtype,
                 ties: dict[str, str] | None = None) -> dict[str, nn.Module]:
    """Fill the submodules at `paths` of a meta `model` with their tensors (and only theirs), through transformers'
    own loader and conversion mapping; move them to device/dtype. `ties` maps a parameter the checkpoint may lack
    to the parameter it then shares (a tied LM head)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    prefixes = tuple(path + "." for path in paths)
    tensors = checkpoint.read(checkpoint_names(checkpoint, type(model), paths))
    load_config = LoadStateDictConfig(device_map={"": "cpu"}, weight_mapping=get_model_conversion_mapping(model))
    with no_progress_bars():
        info, _ = convert_and_load_state_dict_in_model(model, tensors, load_config)
    del tensors
    if info.mismatched_keys:
        name, got, want = sorted(info.mismatched_keys)[0]
        raise NotAModelError(f"checkpoint tensor {name} has shape {tuple(got)}, the model expects {tuple(want)}")
    ties = ties or {}
    for target, source in ties.items():
        if model.get_parameter(target).is_meta:
            module_path, _, name = target.rpartition(".")
            setattr(model.get_submodule(module_path), name, model.get_parameter(source))
    missing = sorted(k for k in info.missing_keys if k.startswith(prefixes) and k not in ties)
    if missing:
        raise NotAModelError(f"checkpoint {checkpoint.path} lacks tensors: {', '.join(missing[:5])}"
                             + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""))
    modules = {}
    for path in paths:
        module = model.get_submodule(path)
        _initialize_buffers(model, module)
        module.to(device=device, dtype=dtype)
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if tensor.is_meta:
                raise NotAModelError(f"{path}: tensor {name} was not initialized from the checkpoint")
        modules[path] = module.eval().requires_grad_(False)
    return modules


def _initialize_buffers(model: PreTrainedModel, module: nn.Module) -> None:
    """Non-persistent buffers (e.g. Gemma's embedding scale) are not in checkpoints: compute them with transformers'
    own `_init_weights`, which leaves the loaded tensors alone (they carry `_is_hf_initialized`)."""
    for submodule in module.modules():
        meta_buffers = [name for name, buffer in submodule.named_buffers(recurse=False) if buffer.is_meta]
        if not meta_buffers:
            continue
        for name in meta_buffers:
            submodule._buffers[name] = torch.empty_like(submodule._buffers[name], device="cpu")
        with torch.no_grad():
            model._init_weights(submodule)


def load_blocks(model_dir: str | Path, config: PretrainedConfig, start: int, end: int,
                device: torch.device | str, dtype: torch.dtype, progress: bool = False) -> list[nn.Module]:
    """transformers' own decoder layers [start, end), filled with only their tensors."""
    from tqdm import tqdm

    spec = family_for(config)
    checkpoint = Checkpoint(model_dir)
    model = meta_model(spec, config, dtype)
    blocks = []
    indices = tqdm(range(start, end), desc=f"Loading blocks {start}:{end}", unit="block", disable=not progress,
                   mininterval=0.5)
    for index in indices:  # one block at a time: at most one block's tensors are in flight
        block = fill_modules(model, [spec.block_path(index)], checkpoint, device, dtype)[spec.block_path(index)]
        if not isinstance(block, spec.block_class):
            raise NotAModelError(f"{spec.block_path(index)} is a {type(block).__name__}, "
                                 f"expected {spec.block_class.__name__}")
        blocks.append(block)
    return blocks


def make_span_helpers(spec: FamilySpec, config: PretrainedConfig, device, dtype) -> dict[str, nn.Module]:
    # Helpers (e.g. rotary embeddings) hold no checkpoint weights, only buffers computed from the config.
    return {name: module.to(device) for name, module in spec.make_span_helpers(config).items()}


def load_client_parts(model_dir: str | Path, config: PretrainedConfig, dtype: torch.dtype) -> dict[str, nn.Module]:
    """The modules a client keeps (embeddings, final norm, LM head, and family extras such as learned positions),
    transformers' own, filled with only their tensors. The LM head shares the embeddings when tied."""
    spec = family_for(config)
    checkpoint = Checkpoint(model_dir)
    model = meta_model(spec, config, dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    ties = {f"{spec.lm_head_path}.weight": f"{spec.embeddings_path}.weight"} if tied else {}
    return fill_modules(model, list(spec.client_paths), checkpoint, "cpu", dtype, ties=ties)
