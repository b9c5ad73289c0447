"""Client settings; every wait is bounded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout: float = 10.0  # seconds to open a stream to a server
    step_timeout: float = 60.0  # seconds a server may take to answer one step or forward
    missing_blocks_wait: float = 30.0  # seconds to wait for servers to appear for uncovered blocks
    max_retries: int = 5  # failed attempts (over all servers) tolerated per call before giving up
    ban_seconds: float = 15.0  # a failed server is skipped this long (doubling on each further failure)
    refresh_period: float = 5.0  # seconds a fetched list of servers is reused
