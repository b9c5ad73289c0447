"""What a request carries besides hidden states: deep prompts, the client's own LoRA weights, or the name of an
adapter the servers host; cut to each hop's blocks (and batch rows) as sent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from corolla.client.routing import Hop
from corolla.errors import CorollaError
from corolla.client.edits import edits_on_wire
from corolla.net.messages import HiddenEdit, LoraWeights
from corolla.net.wire import WireTensor


@dataclass(frozen=True)
class ClientLora:
    """The client's LoRA weights for every block: a[block][i], b[block][i] for targets[i]."""

    scale: float
    targets: tuple[str, ...]  # module paths inside a block
    a: list[list[torch.Tensor]]  # [num_blocks][targets] of [r, in_features]
    b: list[list[torch.Tensor]]  # [num_blocks][targets] of [out_features, r]

    @classmethod
    def from_flat(cls, scale: float, targets: tuple[str, ...], flat: list[torch.Tensor]) -> "ClientLora":
        """The inverse of `flat(0, num_blocks)`."""
        per_block = 2 * len(targets)
        blocks = [flat[i:i + per_block] for i in range(0, len(flat), per_block)]
        return cls(scale, tuple(targets), a=[block[0::2] for block in blocks], b=[block[1::2] for block in blocks])

    def flat(self, start: int, end: int) -> list[torch.Tensor]:
        """A and B of blocks [start, end), in the order the wire and gradients use: (a, b) per (block, target)."""
        return [t for block in range(start, end) for pair in zip(self.a[block], self.b[block]) for t in pair]


@dataclass(frozen=True)
class Extras:
    prompts: torch.Tensor | None = None  # [num_blocks, batch, pre_seq_len, hidden] deep prompts
    lora: ClientLora | None = None
    adapter: str | None = None  # hosted by the servers (routing uses only servers that announce it)
    edits: tuple = ()  # hidden-state edits (client/edits.py: Steer, Replace), checked; stateless requests only

    def __post_init__(self):
        if self.lora is not None and self.adapter is not None:
            raise CorollaError("use either your own LoRA weights or an adapter hosted by servers, not both")

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompts is None else self.prompts.shape[2]

    def prompts_for(self, hop: Hop, rows: slice = slice(None)) -> WireTensor | None:
        if self.prompts is None:
            return None
        return WireTensor.from_torch(self.prompts[hop.start:hop.end, rows])

    def edits_for(self, hop: Hop, rows: slice = slice(None)) -> list[HiddenEdit]:
        return edits_on_wire(self.edits, hop.start, hop.end, rows) if self.edits else []

    def lora_for(self, hop: Hop) -> LoraWeights | None:
        if self.lora is None:
            return None
        tensors = self.lora.flat(hop.start, hop.end)
        return LoraWeights(scale=self.lora.scale, targets=list(self.lora.targets),
                           a=[WireTensor.from_torch(t) for t in tensors[0::2]],
                           b=[WireTensor.from_torch(t) for t in tensors[1::2]])


NO_EXTRAS = Extras()
