"""Choosing which servers run which blocks: pure functions over the announced records and measured round trips.

Inference (`plan_fastest_route`): the chain with the lowest expected step latency, found by a shortest-path search
over block boundaries. A hop from block p to the end of server s's span costs one round trip to s plus s's
compute time for those blocks (its announced throughput is decode tokens/s for its whole span).
Training/forward (`plan_balanced_route`): hops drawn at random, weighted by throughput, to spread the load.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, replace

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
    adapter: str | None = None  # only servers that host this adapter

    def usable(self, servers: list[PeerRecord]) -> list[PeerRecord]:
        return [s for s in servers
                if s.record.state == ServerState.ONLINE and s.peer_id not in self.banned
                and (self.allowed is None or s.peer_id in self.allowed)
                and s.record.cache_tokens_left >= self.min_cache_tokens
                and (self.adapter is None or self.adapter in s.record.adapters)]


def largest_session(servers: list[PeerRecord], start: int, end: int,
                    route_filter: RouteFilter = RouteFilter()) -> tuple[int, int] | None:
    """(tokens, block): the most tokens a session over [start, end) could ever hold (the smallest, over the
    blocks, of the largest cache budget among the usable servers of that block) and the block that limits it; None
    when some block's servers do not announce their budget, or have none."""
    usable = [s for s in replace(route_filter, min_cache_tokens=0).usable(servers)]
    limit = None
    for block in range(start, end):
        budgets = [s.record.cache_tokens_total for s in usable if s.record.start_block <= block < s.record.end_block]
        if not budgets or 0 in budgets:
            return None
        if limit is None or max(budgets) < limit[0]:
            limit = (max(budgets), block)
    return limit


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


def compute_cost(server: PeerRecord, blocks: int) -> float:
    """Expected seconds of `server`'s compute for one decode step through `blocks` of its blocks."""
    span = max(server.record.end_block - server.record.start_block, 1)
    return blocks / (max(server.record.throughput, 1e-6) * span) + HOP_OVERHEAD


def plan_fastest_route(servers: list[PeerRecord], start: int, end: int, rtts: dict[str, float] | None = None,
                       route_filter: RouteFilter = RouteFilter(), push: bool = False,
                       server_rtts: dict[tuple[str, str], float] | None = None) -> list[Hop] | None:
    """Lowest expected latency chain covering [start, end); None if some block has no usable server.

    Without push every hop costs a client round trip. With push, activations go client -> s1 -> s2 -> ... ->
    client: each link costs half a round trip, between servers as they measured it (`server_rtts[(a, b)]`,
    announced in their records) or else estimated as going through the client."""
    rtts, server_rtts = rtts or {}, server_rtts or {}
    usable = route_filter.usable(servers)

    def link(previous: str | None, peer: str) -> float:
        to_peer = rtts.get(peer, UNMEASURED_RTT)
        if not push:
            return to_peer
        if previous is None:
            return to_peer / 2
        measured = server_rtts.get((previous, peer))
        return measured / 2 if measured is not None else (rtts.get(previous, UNMEASURED_RTT) + to_peer) / 2

    # Dijkstra over (block position, server that produced it); with push the path's cost depends on that server.
    best: dict[tuple[int, str | None], float] = {(start, None): 0.0}
    came_from: dict[tuple[int, str | None], tuple[int, str | None, str]] = {}
    queue: list[tuple[float, int, str]] = [(0.0, start, "")]
    finish: tuple[float, tuple[int, str | None]] | None = None
    while queue:
        cost, position, previous_key = heapq.heappop(queue)
        previous = previous_key or None
        if cost > best.get((position, previous), float("inf")):
            continue
        if position == end:
            total = cost + (rtts.get(previous, UNMEASURED_RTT) / 2 if push and previous else 0.0)
            if finish is None or total < finish[0]:
                finish = (total, (position, previous))
            continue
        for server in usable:
            if not server.record.start_block <= position < server.record.end_block:
                continue
            hop_end = min(server.record.end_block, end)
            state = (hop_end, server.peer_id if push else None)
            new_cost = cost + link(previous, server.peer_id) + compute_cost(server, hop_end - position)
            if new_cost < best.get(state, float("inf")):
                best[state] = new_cost
                heapq.heappush(queue, (new_cost, hop_end, server.peer_id if push else ""))
                came_from[state] = (position, previous, server.peer_id)
    if finish is None:
        return None if start != end else []
    route, state = [], finish[1]
    while state != (start, None):
        position, previous, peer = came_from[state]
        route.append(Hop(peer, position, state[0]))
        state = (position, previous)
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
