"""The remote blocks as torch modules, under Petals' names: `model.transformer.h` is every block, `h[3:7]` blocks
3..6, `h[5]` block 5. A slice runs forward (differentiable: backward goes through the servers' backward protocol)
and inference sessions over its own blocks only, through the same routing, failover, output checking, adapters and
server limits as the whole model (client/remote.py, client/training.py): a slice is only a narrower span.

What a slice carries besides hidden states: the model's hosted adapter and its own LoRA weights. Deep prompts do
not travel with slices (they belong to the prompt positions the model's forward adds); use `model(...)` for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from corolla.client.edits import Edit
from corolla.client.remote import InferenceSession
from corolla.errors import CorollaError


@dataclass(frozen=True)
class BlockRunner:
    """What the model lends its block modules (plain callables: the modules must not hold the model as a child)."""

    num_blocks: int
    hidden_size: int
    # (hidden, position_ids, attention_mask, span, edits) -> output of the span's last block
    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int], Sequence[Edit]], torch.Tensor]
    # (span, max_length, batch_size) -> a session over the span's blocks
    open_session: Callable[[tuple[int, int], int, int], InferenceSession]


class RemoteBlocks(nn.Module):
    """Blocks [start, end) of the model, run by the swarm. `len()`, slicing, indexing and iteration give narrower
    RemoteBlocks; calling one runs its blocks."""

    def __init__(self, runner: BlockRunner, start: int = 0, end: int | None = None):
        super().__init__()
        self._runner = runner
        self.start, self.end = start, runner.num_blocks if end is None else end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, index: int | slice) -> "RemoteBlocks":
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise CorollaError(f"remote blocks are sliced with step 1 only (a contiguous span), got step {step}")
            if stop <= start:
                raise CorollaError(f"the slice [{index.start}:{index.stop}] of blocks {self.start}..{self.end - 1} "
                                   f"holds no block")
            return RemoteBlocks(self._runner, self.start + start, self.start + stop)
        position = range(self.start, self.end)[index]  # IndexError past the end, as a list would
        return RemoteBlocks(self._runner, position, position + 1)

    def __iter__(self) -> Iterator["RemoteBlocks"]:
        return (self[i] for i in range(len(self)))

    def extra_repr(self) -> str:
        return f"blocks {self.start}..{self.end - 1} of {self._runner.num_blocks}, remote"

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, edits: Sequence[Edit] = ()) -> torch.Tensor:
        """hidden_states [batch, tokens, hidden] entering block `start` -> those leaving block `end - 1`.
        position_ids [batch, tokens] default 0..tokens-1; attention_mask [batch, tokens] (0 = padding);
        edits: client/edits.py (their layers among this module's blocks)."""
        self._check_hidden(hidden_states)
        batch, tokens, _ = hidden_states.shape
        if tokens == 0:  # nothing for the servers to compute (as an empty inference step)
            return hidden_states.clone()
        if position_ids is None:
            position_ids = torch.arange(tokens).unsqueeze(0).expand(batch, -1)
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        return self._runner.run(hidden_states, position_ids, mask, (self.start, self.end), edits)

    def inference_session(self, max_length: int, batch_size: int = 1) -> InferenceSession:
        """A session over these blocks only: `session.step(hidden)` [batch, new tokens, hidden] returns what leaves
        block `end - 1` (an empty step returns an empty tensor and contacts no server). Close it, or use `with`."""
        return self._runner.open_session((self.start, self.end), max_length, batch_size)

    def _check_hidden(self, hidden: torch.Tensor) -> None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[-1] != self._runner.hidden_size:
            shape = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise CorollaError(f"remote blocks take hidden states [batch, tokens, {self._runner.hidden_size}], "
                               f"got {shape}")


class TransformerParts(nn.Module):
    """Petals' `model.transformer`: the client's embeddings and final norm, and the remote blocks `h`. The same
    module objects as the model's own (not registered twice)."""

    def __init__(self, word_embeddings: nn.Module, word_embeddings_layernorm: nn.Module, h: RemoteBlocks,
                 ln_f: nn.Module):
        super().__init__()
        self.word_embeddings, self.word_embeddings_layernorm, self.h, self.ln_f = (
            word_embeddings, word_embeddings_layernorm, h, ln_f)
