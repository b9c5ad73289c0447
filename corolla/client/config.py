"""Client settings; every wait is bounded."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout: float = 10.0  # seconds to open a stream to a server
    step_timeout: float = 60.0  # seconds a server may take to answer one step or forward
    call_timeout: float = 300.0  # seconds one step or forward may take in all, retries and waits included
    cache_wait: float = 10.0  # seconds a server may wait for cache room for this session before answering "full"
    missing_blocks_wait: float = 30.0  # seconds to wait for servers to appear for uncovered blocks
    max_retries: int = 5  # failed attempts (over all servers) tolerated per call before giving up
    ban_seconds: float = 15.0  # a failed server is skipped this long (doubling on each further failure)
    refresh_period: float = 5.0  # seconds a fetched list of servers is reused
    ping_timeout: float = 2.0  # seconds to wait for a ping answer; a server that does not answer is skipped
    rtt_refresh_period: float = 30.0  # seconds a measured round-trip time is reused
    wire_format: str = "native"  # activations on the wire: native (as computed), float16, bfloat16, int8 (lossy)
    use_push: bool = True  # servers pass activations straight to the next server (one client round trip a token)
    check_outputs: bool = False  # re-run a random share of steps on other servers and compare (catches liars)
    check_share: float = 0.1  # with check_outputs: the share of (step, server) outputs that are re-run
    check_tolerance: float = 1e-2  # max difference, relative to the output's magnitude, between two servers
    check_strikes: int = 2  # unconfirmed disagreements before a server is blocked (2 checkers agreeing: at once)
    max_request_tokens: int = 8192  # training: larger batches are split into requests of at most this many tokens
    allowed_servers: tuple[str, ...] | None = None  # peer ids the client may use (None = any)
    blocked_servers: tuple[str, ...] = ()  # peer ids the client must not use
    # How the LM head weight is stored and multiplied on CPU: auto (measure each way at load, keep the fastest
    # for one-token steps), row (as loaded), column (the same values with transposed strides) or rowdot (row-major,
    # one dot product per row); see models/layout.py.
    weight_layout: str = "auto"
    # Credits (docs/incentives.md): sign receipts for the work servers did for this client (after output checks).
    credits: bool = True
    delegation_file: str | None = None  # from `corolla credits delegate`: sessions count as the delegating server's
    credits_ledger: str | None = None  # SQLite file keeping the receipts signed (needed with a stable --identity)
