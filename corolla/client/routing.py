"""Choosing which servers run which blocks: pure functions over the announced records and measured round trips.

Inference (`plan_fastest_route`): the chain with the lowest expected step latency, found by a shortest-path search
over block boundaries. A hop from block p to the end of server s's span costs one round trip to s plus s's
compute time for those blocks (its announced throughput is decode tokens/s for its whole span).
Training/forward (`plan_balanced_route`): hops drawn at random, weighted by throughput, to spread the load.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from corolla.net.records import PeerRecord, ServerState

UNMEASURED_RTT = 0.05  # seconds assumed for a server not pinged yet
HOP_OVERHEAD = 0.0005  # seconds of fixed cost per hop (framing, a copy), favours fewer hops on ties


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) run by one server."""

    peer_id: str
    start: int
    end: int


@dataclass(frozen=True)
class RouteFilter:
    """Which servers a route may use."""

    banned: frozenset[str] = frozenset()
    allowed: frozenset[str] | None = None  # None = any server
    min_cache_tokens: int = 0  # servers with less announced cache room are skipped

    def usable(self, servers: list[PeerRecord]) -> list[PeerRecord]:
        return [s for s in servers
                if s.record.state == ServerState.ONLINE and s.peer_id not in self.banned
                and (self.allowed is None or s.peer_id in self.allowed)
                and s.record.cache_tokens_left >= self.min_cache_tokens]


def missing_ranges(servers: list[PeerRecord], start: int, end: int,
                   route_filter: RouteFilter = RouteFilter()) -> list[tuple[int, int]]:
    covered = [False] * (end - start)
    for server in route_filter.usable(servers):
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


def hop_cost(server: PeerRecord, blocks: int, rtts: dict[str, float]) -> float:
    """Expected seconds for one decode step through `blocks` blocks of `server`."""
    span = max(server.record.end_block - server.record.start_block, 1)
    compute = blocks / (max(server.record.throughput, 1e-6) * span)
    return rtts.get(server.peer_id, UNMEASURED_RTT) + compute + HOP_OVERHEAD


def plan_fastest_route(servers: list[PeerRecord], start: int, end: int, rtts: dict[str, float] | None = None,
                       route_filter: RouteFilter = RouteFilter()) -> list[Hop] | None:
    """Lowest expected latency chain covering [start, end); None if some block has no usable server."""
    rtts = rtts or {}
    usable = route_filter.usable(servers)
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, tuple[int, str]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, position = heapq.heappop(queue)
        if position == end:
            break
        if cost > best.get(position, float("inf")):
            continue
        for server in usable:
            if not server.record.start_block <= position < server.record.end_block:
                continue
            hop_end = min(server.record.end_block, end)
            new_cost = cost + hop_cost(server, hop_end - position, rtts)
            if new_cost < best.get(hop_end, float("inf")):
                best[hop_end], came_from[hop_end] = new_cost, (position, server.peer_id)
                heapq.heappush(queue, (new_cost, hop_end))
    if end not in came_from and start != end:
        return None
    route, position = [], end
    while position != start:
        previous, peer_id = came_from[position]
        route.append(Hop(peer_id, previous, position))
        position = previous
    return route[::-1]


def plan_balanced_route(servers: list[PeerRecord], start: int, end: int, route_filter: RouteFilter = RouteFilter(),
                        rng: random.Random | None = None) -> list[Hop] | None:
    """A chain covering [start, end) with each hop drawn at random, weighted by throughput (spreads training load)."""
    rng = rng or random.Random()
    usable = route_filter.usable(servers)
    route, position = [], start
    while position < end:
        candidates = [s for s in usable if s.record.start_block <= position < s.record.end_block]
        if not candidates:
            return None
        weights = [max(s.record.throughput, 1e-6) * (min(s.record.end_block, end) - position) for s in candidates]
        chosen = rng.choices(candidates, weights=weights)[0]
        hop_end = min(chosen.record.end_block, end)
        route.append(Hop(chosen.peer_id, position, hop_end))
        position = hop_end
    return route
