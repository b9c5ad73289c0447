"""Inference sessions held by a server.

Counter model: a session's `length` is the number of tokens in its cache. A step with `start` <= length first
drops cached tokens at positions >= start (rollback or replay), then appends its new tokens: length = start + new.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from transformers.cache_utils import Cache

from corolla.server.cache import Allocation


@dataclass
class Session:
    start_block: int
    end_block: int
    max_length: int
    batch_size: int
    cache: Cache
    cache_wait: float  # seconds a step may wait for cache pages before failing
    peer_id: str  # the client that opened it
    lora: dict | None = None  # LoRA deltas per block for every step (a hosted adapter's or the client's own)
    length: int = 0
    # Secret: whoever knows it (the client, and the servers it tells) may push steps into this session.
    session_id: str = field(default_factory=lambda: secrets.token_hex(16))
    last_active: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # steps from the client and from pushes, in order
    push_streams: dict = field(default_factory=dict)  # next server's peer id -> open push stream
    allocation: Allocation = field(default_factory=Allocation)  # cache pages held

    @property
    def name(self) -> str:
        """Short, non-secret name for logs."""
        return self.session_id[:6]

    def rewind(self, start: int) -> None:
        """Drop cached tokens at positions >= start."""
        if start < self.length:
            self.cache.crop(start - self.length)
            self.length = start
