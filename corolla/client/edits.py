"""Interventions without shipping code to servers: typed edits of the hidden states between blocks.

    model(input_ids, edits=[Steer(layer=2, vector=v), Replace(layer=1, positions=[3], values=h)])

`Steer` adds a vector [hidden] to the output of block `layer` at all or the listed token positions (activation
steering); `Replace` overwrites that output at the listed positions with values [batch, positions, hidden]. Each is
applied by the server holding the block, before the next block runs, exactly as a forward hook on transformers'
own layer that does the same (`layer.register_forward_hook`). Positions count from the request's first token.
Anything else (a nonlinear change, a probe that decides): run `model.transformer.h[:L + 1]`, change the hidden
states on the client, and continue with `h[L + 1:]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from corolla.errors import EditError
from corolla.net.messages import HiddenEdit
from corolla.net.wire import WireTensor


def _positions(positions: Sequence[int] | torch.Tensor | None) -> tuple[int, ...] | None:
    if positions is None:
        return None
    values = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
    return tuple(int(p) for p in values)


def _listed(positions) -> list[int] | None:
    positions = _positions(positions)
    return None if positions is None else list(positions)


@dataclass(frozen=True)
class Steer:
    """Add `vector` [hidden] to the output of block `layer` at `positions` (None: every token) of every row."""

    layer: int
    vector: torch.Tensor
    positions: Sequence[int] | torch.Tensor | None = None

    kind = "steer"

    def values_for(self, rows: slice) -> torch.Tensor:
        return self.vector

    def expected_shape(self, batch: int, hidden: int) -> tuple[int, ...]:
        return (hidden,)


@dataclass(frozen=True)
class Replace:
    """Overwrite the output of block `layer` at `positions` with `values` [batch, len(positions), hidden]."""

    layer: int
    positions: Sequence[int] | torch.Tensor
    values: torch.Tensor

    kind = "replace"

    def values_for(self, rows: slice) -> torch.Tensor:
        return self.values[rows]

    def expected_shape(self, batch: int, hidden: int) -> tuple[int, ...]:
        return (batch, len(_positions(self.positions)), hidden)


Edit = Steer | Replace


def check_edits(edits: Sequence[Edit], start: int, end: int, batch: int, tokens: int,
                hidden: int) -> tuple[Edit, ...]:
    """The edits of a run of blocks [start, end) on [batch, tokens, hidden] inputs, checked (EditError names the
    edit and what is wrong); returned as a tuple."""
    for i, edit in enumerate(edits):
        name = f"edits[{i}] ({type(edit).__name__})"
        if not isinstance(edit, (Steer, Replace)):
            raise EditError(f"edits[{i}]: expected Steer or Replace, got {type(edit).__name__}")
        if not start <= edit.layer < end:
            raise EditError(f"{name}: layer {edit.layer} is not among the blocks run, {start}..{end - 1}")
        positions = _positions(edit.positions)
        if positions is None and isinstance(edit, Replace):
            raise EditError(f"{name}: positions are required")
        if positions is not None and (len(set(positions)) != len(positions)
                                      or not all(0 <= p < tokens for p in positions)):
            raise EditError(f"{name}: positions must be distinct token indices in [0, {tokens}), got "
                            f"{list(positions)}")
        values = edit.vector if isinstance(edit, Steer) else edit.values
        expected = edit.expected_shape(batch, hidden)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or tuple(values.shape) != expected:
            got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise EditError(f"{name}: values must be a float tensor of shape {list(expected)}, got {got}")
        if not bool(torch.isfinite(values).all()):
            raise EditError(f"{name}: values contain NaN or Inf")
    return tuple(edits)


def edits_on_wire(edits: Sequence[Edit], start: int, end: int, rows: slice = slice(None)) -> list[HiddenEdit]:
    """The edits of blocks [start, end) as a request carries them (`rows`: the batch rows of this request)."""
    return [HiddenEdit(kind=edit.kind, block=edit.layer, positions=_listed(edit.positions),
                       values=WireTensor.from_torch(edit.values_for(rows).detach().cpu().contiguous()))
            for edit in edits if start <= edit.layer < end]
