"""The client's view of the swarm: a network thread with its own asyncio loop, the DHT directory, bans, routes."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Coroutine

from corolla.client.config import ClientConfig
from corolla.credits.payer import Payer, make_payer
from corolla.client.routing import (Hop, RouteFilter, largest_session, missing_ranges, plan_balanced_route,
                                    plan_fastest_route)
from corolla.errors import CacheFullError, MissingBlocksError
from corolla.net.directory import read_servers
from corolla.net.node import MessageStream, NetworkConfig, Node
from corolla.net.ping import measure_rtt
from corolla.net.records import PeerRecord

logger = logging.getLogger(__name__)


class SwarmClient:
    """Owns the client's peer. Synchronous callers use `call`; coroutines run on the network thread."""

    def __init__(self, network: NetworkConfig, model_id: str, num_blocks: int, config: ClientConfig):
        self.model_id, self.num_blocks, self.config = model_id, num_blocks, config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="corolla-network", daemon=True)
        self._thread.start()
        self._servers: list[PeerRecord] = []
        self._fetched_at = -float("inf")
        self._bans: dict[str, _Ban] = {}
        self.blocked: dict[str, str] = {}  # peer id -> why it is never used again (e.g. wrong outputs); reported
        self._rtts: dict[str, tuple[float, float]] = {}  # peer -> (round-trip seconds, measured at)
        self._closed = False
        try:
            self.node: Node = self.call(Node.create(network, client_mode=True), timeout=60)
        except BaseException:
            self._stop_loop()
            raise
        self.payer: Payer | None = make_payer(self.node, model_id, config)  # None: credits off
        atexit.register(_close_ref, weakref.ref(self))

    def call(self, coroutine: Coroutine, timeout: float | None = None) -> Any:
        """Run a coroutine on the network thread and wait for its result (bounded by `timeout`)."""
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    # ---- directory and bans (network thread) -----------------------------------------------------------------

    async def servers(self, refresh: bool = False) -> list[PeerRecord]:
        if refresh or time.monotonic() - self._fetched_at > self.config.refresh_period:
            self._servers = await read_servers(self.node, self.model_id, self.num_blocks)
            self._fetched_at = time.monotonic()
        return self._servers

    def ban(self, peer_id: str) -> None:
        previous = self._bans.get(peer_id)
        length = min(previous.length * 2, 300.0) if previous else self.config.ban_seconds
        self._bans[peer_id] = _Ban(until=time.monotonic() + length, length=length, at=time.time())
        logger.warning("not using server %s for %.0f s", peer_id, length)

    def block(self, peer_id: str, reason: str) -> None:
        """Never use this server again (for this client's lifetime), and report it."""
        if peer_id not in self.blocked:
            self.blocked[peer_id] = reason
            logger.error("server %s is blocked and reported: %s", peer_id, reason)

    def route_filter(self, servers: list[PeerRecord], min_cache_tokens: int, adapter: str | None = None) -> RouteFilter:
        now = time.monotonic()
        restarted = {s.peer_id for s in servers
                     if s.peer_id in self._bans and s.record.started_at > self._bans[s.peer_id].at}
        for peer_id in restarted:  # a server that came back (same peer id) since we banned it gets a new chance
            logger.info("server %s restarted; using it again", peer_id)
            del self._bans[peer_id]
        banned = ({peer for peer, ban in self._bans.items() if ban.until > now} | set(self.config.blocked_servers)
                  | set(self.blocked))
        allowed = frozenset(self.config.allowed_servers) if self.config.allowed_servers is not None else None
        return RouteFilter(banned=frozenset(banned), allowed=allowed, min_cache_tokens=min_cache_tokens, adapter=adapter)

    async def _measure_rtts(self, servers: list[PeerRecord], route_filter: RouteFilter) -> dict[str, float]:
        """Round-trip times of usable servers, pinging (concurrently, bounded) those not measured lately."""
        now = time.monotonic()
        stale = [s.peer_id for s in route_filter.usable(servers)
                 if now - self._rtts.get(s.peer_id, (0.0, -float("inf")))[1] > self.config.rtt_refresh_period]

        async def ping(peer_id: str) -> None:
            try:
                rtt = await asyncio.wait_for(measure_rtt(self.node, peer_id, self.config.ping_timeout),
                                             self.config.ping_timeout * 3)
                self._rtts[peer_id] = (rtt, time.monotonic())
            except (ConnectionError, EOFError, OSError, asyncio.TimeoutError) as e:
                logger.info("server %s did not answer a ping: %r", peer_id, e)
                self.ban(peer_id)

        await asyncio.gather(*(ping(peer_id) for peer_id in stale))
        return {peer_id: rtt for peer_id, (rtt, _) in self._rtts.items()}

    def rtt(self, peer_id: str) -> float | None:
        measured = self._rtts.get(peer_id)
        return measured[0] if measured else None

    async def route(self, start: int, end: int, purpose: str = "inference", min_cache_tokens: int = 0,
                    adapter: str | None = None) -> list[Hop]:
        """A route over [start, end), waiting (bounded) for servers to cover missing blocks.

        purpose="inference": the lowest-latency chain with cache room; "forward": spread by throughput.
        adapter: use only servers hosting this adapter."""
        deadline = time.monotonic() + self.config.missing_blocks_wait
        refresh = False
        while True:
            servers = await self.servers(refresh=refresh)
            route_filter = self.route_filter(servers, min_cache_tokens, adapter)
            largest = largest_session(servers, start, end, route_filter) if min_cache_tokens else None
            if largest is not None and min_cache_tokens > largest[0]:  # waiting for room would be in vain
                raise CacheFullError(f"server cache full: a session of {min_cache_tokens} tokens (max_length x batch) "
                                     f"can never fit: the largest the swarm can hold is {largest[0]} tokens (block "
                                     f"{largest[1]}'s servers)")
            if purpose == "inference":
                rtts = await self._measure_rtts(servers, route_filter)
                route_filter = self.route_filter(servers, min_cache_tokens, adapter)  # pings may have banned some
                server_rtts = {(s.peer_id, peer): rtt for s in servers
                               for peer, rtt in (getattr(s.record, "next_pings", None) or {}).items()}
                route = plan_fastest_route(servers, start, end, rtts, route_filter, push=self.config.use_push,
                                           server_rtts=server_rtts)
            else:
                route = plan_balanced_route(servers, start, end, route_filter)
            if route is not None:
                return route
            if time.monotonic() >= deadline:
                missing = missing_ranges(servers, start, end, route_filter)
                roomless = replace(route_filter, min_cache_tokens=0)
                if min_cache_tokens and not missing_ranges(servers, start, end, roomless):
                    full = ", ".join(f"{a}..{b - 1}" for a, b in missing)
                    raise CacheFullError(f"server cache full: no server of blocks {full} has room for "
                                         f"{min_cache_tokens} more tokens (waited {self.config.missing_blocks_wait:g} s)")
                if adapter is not None and not missing_ranges(servers, start, end, replace(roomless, adapter=None)):
                    blocks = ", ".join(f"{a}..{b - 1}" for a, b in missing)
                    raise MissingBlocksError(missing, self.config.missing_blocks_wait,
                                             f"no server hosting adapter {adapter!r} serves blocks {blocks}")
                raise MissingBlocksError(missing, self.config.missing_blocks_wait)
            await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            refresh = True

    async def connect(self, peer_id: str, protocol: str) -> MessageStream:
        return await self.node.connect(peer_id, protocol, self.config.connect_timeout)

    # ---- shutdown ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.call(self.node.shutdown(), timeout=10)
        except Exception:
            logger.debug("node shutdown failed", exc_info=True)
        self._stop_loop()

    def _stop_loop(self) -> None:
        async def cancel_pending():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.call(cancel_pending(), timeout=5)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@dataclass(frozen=True)
class _Ban:
    until: float  # monotonic time the ban ends
    length: float  # seconds; doubles on each further failure
    at: float  # unix time of the ban, compared with a server's announced start time


def _close_ref(ref: "weakref.ref[SwarmClient]") -> None:
    client = ref()
    if client is not None:
        client.close()
