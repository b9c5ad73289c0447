"""Inference sessions as the handlers see them: the stream side (inbox, push streams, the secret that lets other
servers push into it). What the session computes with (its KV memory and length) is the engine's
(server/engine.py); the handlers only read it."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from corolla.credits.book import SessionCredit
from corolla.server.engine import EngineSession


@dataclass
class Session:
    state: EngineSession
    cache_wait: float  # seconds a step may wait for cache pages before failing
    peer_id: str  # the client that opened it
    # Secret: whoever knows it (the client, and the servers it tells) may push steps into this session.
    session_id: str = field(default_factory=lambda: secrets.token_hex(16))
    last_active: float = field(default_factory=time.monotonic)
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # steps from the client and from pushes, in order
    push_streams: dict = field(default_factory=dict)  # next server's peer id -> open push stream
    credit: SessionCredit | None = None  # its place with the server's credits (None: credits off)

    @property
    def name(self) -> str:
        """Short, non-secret name for logs."""
        return self.session_id[:6]

    @property
    def start_block(self) -> int:
        return self.state.start_block

    @property
    def end_block(self) -> int:
        return self.state.end_block

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def max_length(self) -> int:
        return self.state.max_length

    @property
    def length(self) -> int:
        return self.state.length

    @property
    def lora(self) -> dict | None:
        return self.state.lora
