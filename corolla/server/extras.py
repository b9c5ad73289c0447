"""Checking a request's fine-tuning extras (deep prompts, the client's LoRA weights, a hosted adapter's name) and
turning them into plain tensors for the backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from corolla.errors import BadRequestError
from corolla.models.lora import BlockLora, LoraDelta, linear_layers
from corolla.net.messages import LoraWeights
from corolla.net.wire import WireTensor
from corolla.server.backend import BlockBackend

MAX_LORA_RANK = 256
MAX_PRE_SEQ_LEN = 1024


@dataclass
class HostedAdapters:
    """LoRA adapters a server hosts: name -> deltas of its blocks (on its device)."""

    adapters: dict[str, dict[int, BlockLora]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted(self.adapters)

    def get(self, name: str) -> dict[int, BlockLora]:
        deltas = self.adapters.get(name)
        if deltas is None:
            hosted = ", ".join(self.names) or "none"
            raise BadRequestError(f"adapter {name!r} is not hosted by this server (it hosts: {hosted})")
        return deltas


def parse_prompts(tensor: WireTensor | None, blocks: int, batch: int, hidden_size: int) -> torch.Tensor | None:
    if tensor is None:
        return None
    if not tensor.is_float:
        raise BadRequestError(f"prompts: dtype must be a float type, not {tensor.dtype}")
    shape = tuple(tensor.shape)
    if len(shape) != 4 or shape[0] != blocks or shape[1] != batch or shape[3] != hidden_size:
        raise BadRequestError(f"prompts: expected shape [{blocks} blocks, {batch} batch, pre_seq_len, {hidden_size}], "
                              f"got {list(shape)}")
    if not 1 <= shape[2] <= MAX_PRE_SEQ_LEN:
        raise BadRequestError(f"prompts: pre_seq_len must be 1..{MAX_PRE_SEQ_LEN}, got {shape[2]}")
    return tensor.to_torch("prompts")


def parse_lora(weights: LoraWeights | None, backend: BlockBackend, start: int, end: int) -> dict[int, BlockLora] | None:
    """The client's LoRA weights for blocks [start, end), checked against the blocks' linear layers."""
    if weights is None:
        return None
    count = (end - start) * len(weights.targets)
    if len(weights.a) != count or len(weights.b) != count:
        raise BadRequestError(f"lora: expected {count} A and {count} B tensors ({end - start} blocks x "
                              f"{len(weights.targets)} targets), got {len(weights.a)} and {len(weights.b)}")
    shapes = linear_layers(backend.blocks[0])
    unknown = [t for t in weights.targets if t not in shapes]
    if unknown:
        raise BadRequestError(f"lora.targets: {unknown} are not linear layers of this model's blocks "
                              f"(they are: {', '.join(sorted(shapes))})")
    deltas: dict[int, BlockLora] = {}
    index = 0
    for block in range(start, end):
        deltas[block] = {}
        for target in weights.targets:
            a = _lora_tensor(weights.a[index], f"lora.a[{index}]")
            b = _lora_tensor(weights.b[index], f"lora.b[{index}]")
            in_features, out_features = shapes[target]
            rank = a.shape[0]
            if not 1 <= rank <= MAX_LORA_RANK or a.shape != (rank, in_features) or b.shape != (out_features, rank):
                raise BadRequestError(f"lora: {target} of block {block} needs A [r, {in_features}] and B "
                                      f"[{out_features}, r] with 1 <= r <= {MAX_LORA_RANK}, got A {list(a.shape)} "
                                      f"and B {list(b.shape)}")
            # On the server's device once (a session reuses them every step); the dtype stays as sent, the hook
            # computes in the activations' dtype.
            deltas[block][target] = LoraDelta(a=a.to(backend.device), b=b.to(backend.device), scale=weights.scale)
            index += 1
    return deltas


def _lora_tensor(tensor: WireTensor, name: str) -> torch.Tensor:
    if not tensor.is_float or len(tensor.shape) != 2:
        raise BadRequestError(f"{name}: expected a 2-dimensional float tensor, got {tensor.dtype} {list(tensor.shape)}")
    return tensor.to_torch(name)


def parse_extras(adapters: HostedAdapters, adapter: str | None, lora: LoraWeights | None, backend: BlockBackend,
                 start: int, end: int) -> dict[int, BlockLora] | None:
    """The LoRA deltas a request runs with: a hosted adapter's, the client's own, or none (not both)."""
    if adapter is not None and lora is not None:
        raise BadRequestError("give either adapter (hosted by the server) or lora (your own weights), not both")
    if adapter is not None:
        return adapters.get(adapter)
    return parse_lora(lora, backend, start, end)
