"""The engine's KV memory: one arena per layer of keys and one of values, [kv_heads, pages x page_tokens, head_dim],
and the cache object transformers' decoder layers see while the engine runs a step.

A session's tokens live in the pages its Allocation lists (server/cache.py). A step tells the layers where to write
its new tokens and which tokens each row reads (a StepIndex: flat token indices into the arenas); the layers' own
attention then runs over the gathered rows. Nothing else holds keys or values: rewinding a session is setting its
length, a beam reorder copies rows inside the arenas, and a session's end returns its pages.

The arenas are made at the first step (their head count and width come from the first keys written) with zeros,
so that masked slots hold finite numbers: attention gives them a weight of exactly 0, and 0 x finite = 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from corolla.server.cache import PADDING_PAGE


@dataclass
class StepIndex:
    """Where one step writes and reads.

    write:  [rows * new] flat token indices the new tokens go to (row-major: row 0's tokens first).
    read:   [rows, read_length] flat token indices each row attends over, new tokens included, in position order
            (left-padded with padding-page tokens where rows hold different lengths).
    past:   read_length - new: what the layers count as cached tokens (transformers sizes its masks from it).
    """

    write: torch.Tensor
    read: torch.Tensor
    past: int


class PagedLayer(CacheLayerMixin):
    """One block's view of the arenas for the step being run (the store's current StepIndex)."""

    is_sliding = False  # sliding windows are applied by the mask: sessions keep full history (rollback, replay)
    is_compileable = False
    is_croppable = False

    def __init__(self, store: "KVStore", index: int):
        super().__init__()
        self.store, self.index = store, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = self.store.arenas(self.index, key_states)
        step = self.store.step
        rows, heads, new, width = key_states.shape
        keys.index_copy_(1, step.write, key_states.transpose(0, 1).reshape(heads, rows * new, width))
        values.index_copy_(1, step.write, value_states.transpose(0, 1).reshape(heads, rows * new, width))
        length = step.read.shape[1]
        flat = step.read.reshape(-1)
        # [heads, rows x length, width] -> [rows, heads, length, width]: contiguous for one row (a lone session)
        return (keys.index_select(1, flat).view(heads, rows, length, width).transpose(0, 1),
                values.index_select(1, flat).view(heads, rows, length, width).transpose(0, 1))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.step.past + query_length, 0

    def get_seq_length(self) -> int:
        return self.store.step.past

    def get_max_length(self) -> int:
        return -1


class KVStore:
    """The arenas of layers [start, end) on one device; `cache` is the Cache object every step runs with."""

    def __init__(self, start: int, end: int, pages: int, page_tokens: int, device: torch.device):
        self.start, self.end, self.device = start, end, device
        self.tokens = pages * page_tokens
        self.padding_token = PADDING_PAGE * page_tokens  # where rows that only pad a batch write and read
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self.step: StepIndex | None = None  # set by the engine around each run
        # Layers before the span exist so that transformers' layer indices line up; they are never used.
        self.cache = Cache(layers=[PagedLayer(self, index) for index in range(end)])

    def arenas(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self._keys.get(index)
        if keys is None:
            shape = (like.shape[1], self.tokens, like.shape[3])  # heads first: a lone row's gather is contiguous
            keys = self._keys[index] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self._values[index] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return keys, self._values[index]

    def copy_rows(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Copy the tokens at flat indices `source` to `target` in every layer (a beam reorder)."""
        for arenas in (self._keys, self._values):
            for arena in arenas.values():
                arena.index_copy_(1, target, arena.index_select(1, source))
