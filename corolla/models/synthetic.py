"""Synthetic weights, for benchmarks only: a model's blocks and client parts built from its config with random
weights, made directly on the device one block at a time.

Why: the 180B-class benchmarks (benchmarks/giant_swarm.py) cannot bring a 360 GB checkpoint to a GPU machine with a
64 GiB disk; the speed of a block depends on its shapes, not on its values. Nothing here reads a checkpoint's block
tensors, so a swarm of synthetic servers computes meaningless text. To keep such servers away from real users,
they announce under their own model name (`synthetic_name`: the name plus "+synthetic<seed>"), which only a client
that asks for that exact name (`from_pretrained(..., model_name=synthetic_name(...))`) joins.

The same (config, block index, seed) gives the same weights on the same device type, so a one-process reference
can rebuild exactly the blocks a server holds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PretrainedConfig

from corolla.errors import CorollaError
from corolla.models.checkpoint import _initialize_buffers, meta_model
from corolla.models.spec import family_for

SYNTHETIC_MARK = "+synthetic"
_BLOCK_SEED_STRIDE = 1_000_003  # a prime: block seeds of different base seeds do not collide for < 10^6 blocks


def synthetic_name(name: str, seed: int) -> str:
    """The model name that servers with synthetic weights of this seed announce (and that clients must ask for)."""
    if seed < 0:
        raise CorollaError(f"synthetic weights need a seed >= 0, got {seed}")
    return f"{name}{SYNTHETIC_MARK}{seed}"


def _fill_random(module: nn.Module, generator: torch.Generator, std: float) -> None:
    """Matrices ~ N(0, std) (transformers' own init for these families), vectors: norm scales 1, biases 0."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.ndim >= 2:
                parameter.normal_(0.0, std, generator=generator)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)


def _materialize(model: nn.Module, module: nn.Module, device: torch.device, dtype: torch.dtype,
                 generator: torch.Generator, std: float) -> nn.Module:
    module.to_empty(device=device)  # parameters allocated on the device; their values are set below
    for submodule in module.modules():  # buffers (rotary tables, scales): computed by transformers' own init
        for name, buffer in list(submodule.named_buffers(recurse=False)):
            submodule._buffers[name] = torch.empty_like(buffer, device="meta")
    _initialize_buffers(model, module)
    module.to(device=device, dtype=dtype)
    _fill_random(module, generator, std)  # after the buffers' init, which may touch parameters of their module
    return module.eval().requires_grad_(False)


def synthetic_blocks(config: PretrainedConfig, start: int, end: int, device: torch.device | str, dtype: torch.dtype,
                     seed: int, prepare=None):
    """Blocks [start, end) of `config`'s family with random weights, each made on `device` and handed to
    `prepare(block) -> block` (e.g. quantization) before the next is made: one unquantized block at a time."""
    spec = family_for(config)
    model = meta_model(spec, config, dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    device = torch.device(device)
    blocks = []
    for index in range(start, end):
        generator = torch.Generator(device=device).manual_seed(seed * _BLOCK_SEED_STRIDE + index)
        block = _materialize(model, model.get_submodule(spec.block_path(index)), device, dtype, generator, std)
        blocks.append(prepare(block) if prepare is not None else block)
        # The meta model keeps a reference to every block: drop it, the caller owns the block now.
        parent_path, _, child = spec.block_path(index).rpartition(".")
        model.get_submodule(parent_path)._modules[child] = nn.Identity()
    return blocks


def write_synthetic_checkpoint(config: PretrainedConfig, path: str | Path, seed: int,
                               dtype: torch.dtype = torch.bfloat16) -> Path:
    """A model directory holding config.json and only the client's tensors (embeddings, final norm, LM head, ...)
    with random weights: what a client loads to drive servers started with synthetic weights of the same seed."""
    spec = family_for(config)
    model = meta_model(spec, config, dtype)
    std = float(getattr(config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed * _BLOCK_SEED_STRIDE - 1)
    tensors = {}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for module_path in spec.client_paths:
        if tied and module_path == spec.lm_head_path:
            continue  # the loader ties it to the embeddings
        module = _materialize(model, model.get_submodule(module_path), torch.device("cpu"), dtype, generator, std)
        for name, tensor in module.state_dict().items():
            tensors[f"{module_path}.{name}"] = tensor.contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(path)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
