"""Research access on a server: hidden-state edits between blocks, and each block's output recorded.

An edit changes the hidden states leaving one block before the next block sees them: `steer` adds a vector at all
or some token positions (activation steering), `replace` overwrites the hidden states at some positions. Both are
forward hooks that live for one run, as a researcher's `register_forward_hook` on transformers' own layer would
be, so the shared blocks are never changed and the result equals that hook's. Recording (for
`output_hidden_states`) is the same hook, reading the output after the edits.

Positions count from the request's first token; a run in chunks (long prefills) sees each chunk's share.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


@dataclass(frozen=True)
class BlockEdit:
    """One validated edit (the wire's HiddenEdit, parsed by the server's handlers)."""

    block: int  # index in the whole model of the block whose output is edited
    positions: torch.Tensor | None  # [P] int64 distinct token indices; None = every token (steer only)
    add: torch.Tensor | None = None  # steer: [hidden] added at the positions
    values: torch.Tensor | None = None  # replace: [batch, P, hidden] written at the positions

    def apply(self, hidden: torch.Tensor, offset: int) -> torch.Tensor:
        """`hidden` [batch, tokens, hidden] holds tokens offset..offset + tokens - 1; returns the edited copy."""
        tokens = hidden.shape[1]
        if self.positions is None:
            return hidden + self.add.to(hidden.device, hidden.dtype)
        local = self.positions.to(hidden.device) - offset
        inside = (local >= 0) & (local < tokens)
        if not bool(inside.any()):
            return hidden
        index = local[inside]
        edited = hidden.clone()
        if self.add is not None:
            edited[:, index] = hidden[:, index] + self.add.to(hidden.device, hidden.dtype)
        else:
            edited[:, index] = self.values[:, inside.to(self.values.device)].to(hidden.device, hidden.dtype)
        return edited


def _after_block(edits: list[BlockEdit], offset: int, recorded: list[torch.Tensor] | None):
    def hook(module: nn.Module, args: tuple, output):
        hidden = output[0] if isinstance(output, tuple) else output
        for edit in edits:
            hidden = edit.apply(hidden, offset)
        if recorded is not None:
            recorded.append(hidden.detach())
        if not edits:
            return None
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


@contextlib.contextmanager
def edits_applied(blocks: list[nn.Module], start_block: int, edits: tuple[BlockEdit, ...], offset: int,
                  recorded: list[list[torch.Tensor]] | None = None) -> Iterator[None]:
    """Hook `edits` onto `blocks` (block `start_block` first) for one run whose first token is token `offset` of the
    request; with `recorded` (one list per block), append every block's output after its edits."""
    handles = []
    try:
        for i, block in enumerate(blocks):
            mine = [edit for edit in edits if edit.block == start_block + i]
            if mine or recorded is not None:
                handles.append(block.register_forward_hook(
                    _after_block(mine, offset, None if recorded is None else recorded[i])))
        yield
    finally:
        for handle in handles:
            handle.remove()
