"""Choosing which blocks a server should serve: pure functions over the announced records."""

from __future__ import annotations

from collections.abc import Iterable

from corolla.net.records import PeerRecord, ServerState


def coverage(servers: Iterable[PeerRecord], num_blocks: int) -> list[float]:
    """Announced throughput per block, summed over online (and joining) servers."""
    per_block = [0.0] * num_blocks
    for server in servers:
        if server.record.state == ServerState.OFFLINE:
            continue
        for block in range(server.record.start_block, min(server.record.end_block, num_blocks)):
            per_block[block] += max(server.record.throughput, 1e-3)
    return per_block


def choose_span(servers: Iterable[PeerRecord], num_blocks: int, span_length: int) -> tuple[int, int]:
    """The window of `span_length` blocks whose weakest block has the least throughput (earliest on ties)."""
    span_length = max(1, min(span_length, num_blocks))
    per_block = coverage(servers, num_blocks)
    best_start, best_key = 0, None
    for start in range(num_blocks - span_length + 1):
        window = per_block[start:start + span_length]
        key = (min(window), sum(window))
        if best_key is None or key < best_key:
            best_start, best_key = start, key
    return best_start, best_start + span_length
