"""Choosing which servers run which blocks: pure functions over the announced records."""

from __future__ import annotations

from dataclasses import dataclass

from corolla.net.records import PeerRecord, ServerState


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run by one server."""

    peer_id: str
    start: int
    end: int


def missing_ranges(servers: list[PeerRecord], start: int, end: int, banned: set[str] = frozenset()) -> list[tuple[int, int]]:
    covered = [False] * (end - start)
    for server in _usable(servers, banned):
        for block in range(max(server.record.start_block, start), min(server.record.end_block, end)):
            covered[block - start] = True
    ranges, run_start = [], None
    for offset, is_covered in enumerate(covered + [True]):
        if not is_covered and run_start is None:
            run_start = offset
        elif is_covered and run_start is not None:
            ranges.append((start + run_start, start + offset))
            run_start = None
    return ranges


def plan_route(servers: list[PeerRecord], start: int, end: int, banned: set[str] = frozenset()) -> list[Hop] | None:
    """Fewest hops covering [start, end): at each block take the server that reaches furthest (then the fastest).
    Returns None if some block has no usable server."""
    usable = _usable(servers, banned)
    route, position = [], start
    while position < end:
        candidates = [s for s in usable if s.record.start_block <= position < s.record.end_block]
        if not candidates:
            return None
        best = max(candidates, key=lambda s: (min(s.record.end_block, end), s.record.throughput, s.peer_id))
        hop_end = min(best.record.end_block, end)
        route.append(Hop(best.peer_id, position, hop_end))
        position = hop_end
    return route


def _usable(servers: list[PeerRecord], banned: set[str]) -> list[PeerRecord]:
    return [s for s in servers if s.record.state == ServerState.ONLINE and s.peer_id not in banned]
