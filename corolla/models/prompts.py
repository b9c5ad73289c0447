"""Deep prompt tuning: trainable prompts added to the hidden states entering each block, at the prompt positions.

The client prepends `pre_seq_len` prompt positions to every sequence; before block i runs, the hidden states at
positions [0, pre_seq_len) get block i's prompt added. Applied through forward pre-hooks that live for one run,
so the shared blocks are never changed.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _add_prompt(prompt: torch.Tensor, start: int):
    """prompt: [batch, pre_seq_len, hidden]; the run's first new token is at position `start`."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        add = prompt[:, start:start + hidden.shape[1]]  # the prompt positions among this run's tokens
        if add.shape[1] == 0:
            return None
        width = add.shape[1]
        hidden = torch.cat([hidden[:, :width] + add.to(hidden.dtype), hidden[:, width:]], dim=1)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return hook


@contextlib.contextmanager
def prompts_applied(blocks: list[nn.Module], prompts: torch.Tensor | None, start: int) -> Iterator[None]:
    """prompts: [len(blocks), batch, pre_seq_len, hidden] or None; `start` = position of the run's first token."""
    handles = []
    try:
        if prompts is not None:
            for block, prompt in zip(blocks, prompts):
                handles.append(block.register_forward_pre_hook(_add_prompt(prompt, start), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
