"""LoRA over transformers' own decoder layers, without changing them.

A low-rank delta is added to the output of a block's linear layers through PyTorch forward hooks that live only
for the duration of one run (`lora_applied`): the blocks stay shared and untouched, so two sessions with
different adapters (or none) never see each other's weights. The math is PEFT's:
`y = W x + scale * B (A x)`, with A: [r, in_features], B: [out_features, r], scale = alpha / r.

Checkpoint names follow PEFT's layout, so an adapter trained here is a standard PEFT adapter directory:
`base_model.model.<block prefix><module path>.lora_A.weight`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from corolla.errors import CorollaError

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraSettings:
    """The shape of a LoRA adapter (PEFT's LoraConfig fields that matter for the math)."""

    r: int = 8  # rank
    alpha: float = 16.0  # scale = alpha / r
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # names (or paths inside a block) of linear layers

    def __post_init__(self):
        if self.r < 1:
            raise CorollaError(f"LoRA rank r must be >= 1, got {self.r}")
        if not self.target_modules:
            raise CorollaError("LoRA target_modules is empty")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


@dataclass
class LoraDelta:
    """One linear layer's adapter: y += scale * B (A x)."""

    a: torch.Tensor  # [r, in_features]
    b: torch.Tensor  # [out_features, r]
    scale: float


BlockLora = dict[str, LoraDelta]  # module path inside a block -> its delta


def linear_layers(block: nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of a block (quantized ones included): module path -> (in_features, out_features)."""
    kinds = (nn.Linear, torch.ao.nn.quantized.dynamic.Linear)  # the latter: CPU int8 servers (server/quantize.py)
    return {path: (module.in_features, module.out_features)
            for path, module in block.named_modules() if isinstance(module, kinds)}


def lora_targets(block: nn.Module, target_modules: tuple[str, ...] | list[str]) -> dict[str, tuple[int, int]]:
    """Linear layers of `block` a LoRA with these target names applies to: path -> (in_features, out_features).

    A name matches a layer whose path equals it or ends with "." + it (PEFT's rule for plain names)."""
    layers = linear_layers(block)
    found = {path: shape for path, shape in layers.items()
             if any(path == t or path.endswith("." + t) for t in target_modules)}
    if not found:
        names = sorted({path.rsplit(".", 1)[-1] for path in layers})
        raise CorollaError(f"LoRA target_modules {list(target_modules)} match no linear layer of a "
                           f"{type(block).__name__}; its linear layers are: {', '.join(names)}")
    return found


def init_delta(in_features: int, out_features: int, settings: LoraSettings,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default initialisation: A Kaiming-uniform (a=sqrt(5)), B zeros, so a new adapter changes nothing."""
    a = torch.empty(settings.r, in_features)
    bound = math.sqrt(6 / ((1 + 5) * in_features))  # kaiming_uniform_ with a=sqrt(5), fan_in = in_features
    a.uniform_(-bound, bound, generator=generator)
    return a, torch.zeros(out_features, settings.r)


def peft_key(block_prefix: str, block: int, path: str, which: str) -> str:
    """PEFT's checkpoint name of A or B of layer `path` in block `block`."""
    return f"{PEFT_PREFIX}{block_prefix.format(index=block)}{path}.lora_{which}.weight"


def _add_delta(delta: LoraDelta):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        return output + F.linear(F.linear(x, delta.a.to(x.dtype)), delta.b.to(x.dtype)) * delta.scale

    return hook


@contextlib.contextmanager
def lora_applied(blocks: list[nn.Module], deltas: list[BlockLora | None]) -> Iterator[None]:
    """Within the block, block i's linear layers add deltas[i] (None or {} = no adapter on that block)."""
    handles = []
    try:
        for block, block_deltas in zip(blocks, deltas):
            for path, delta in (block_deltas or {}).items():
                handles.append(block.get_submodule(path).register_forward_hook(_add_delta(delta)))
        yield
    finally:
        for handle in handles:
            handle.remove()
