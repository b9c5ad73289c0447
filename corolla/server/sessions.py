"""Inference sessions held by a server and the token budget of their attention caches.

Counter model: a session's `length` is the number of tokens in its cache. A step with `start` <= length first
drops cached tokens at positions >= start (rollback or replay), then appends its new tokens: length = start + new.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from transformers.cache_utils import Cache

from corolla.errors import CacheFullError


class CacheBudget:
    """Tokens of attention cache the server may hold over all sessions (reserved per session at open)."""

    def __init__(self, total_tokens: int):
        self.total = total_tokens
        self.used = 0

    @property
    def left(self) -> int:
        return self.total - self.used

    def reserve(self, tokens: int) -> None:
        if tokens > self.left:
            raise CacheFullError(
                f"server cache full: this session needs {tokens} tokens, {self.left} of {self.total} are free"
            )
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used = max(0, self.used - tokens)


@dataclass
class Session:
    start_block: int
    end_block: int
    max_length: int
    batch_size: int
    cache: Cache
    reserved_tokens: int
    length: int = 0
    # Secret: whoever knows it (the client, and the servers it tells) may push steps into this session.
    session_id: str = field(default_factory=lambda: secrets.token_hex(16))
    last_active: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # steps from the client and from pushes, in order
    push_streams: dict = field(default_factory=dict)  # next server's peer id -> open push stream

    @property
    def name(self) -> str:
        """Short, non-secret name for logs."""
        return self.session_id[:6]

    def rewind(self, start: int) -> None:
        """Drop cached tokens at positions >= start."""
        if start < self.length:
            self.cache.crop(start - self.length)
            self.length = start
