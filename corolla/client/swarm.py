"""The client's view of the swarm: a network thread with its own asyncio loop, the DHT directory, bans, routes."""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Coroutine

from corolla.client.config import ClientConfig
from corolla.client.routing import Hop, missing_ranges, plan_route
from corolla.errors import MissingBlocksError
from corolla.net.directory import read_servers
from corolla.net.node import MessageStream, NetworkConfig, Node
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
        self._bans: dict[str, tuple[float, float]] = {}  # peer -> (banned until, current ban length)
        self._closed = False
        try:
            self.node: Node = self.call(Node.create(network, client_mode=True), timeout=60)
        except BaseException:
            self._stop_loop()
            raise
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
        _, length = self._bans.get(peer_id, (0.0, self.config.ban_seconds / 2))
        length = min(length * 2, 300.0)
        self._bans[peer_id] = (time.monotonic() + length, length)
        logger.warning("not using server %s for %.0f s", peer_id, length)

    def banned(self) -> set[str]:
        now = time.monotonic()
        return {peer for peer, (until, _) in self._bans.items() if until > now}

    async def route(self, start: int, end: int) -> list[Hop]:
        """A route over [start, end), waiting (bounded) for servers to cover missing blocks."""
        deadline = time.monotonic() + self.config.missing_blocks_wait
        refresh = False
        while True:
            servers = await self.servers(refresh=refresh)
            route = plan_route(servers, start, end, self.banned())
            if route is not None:
                return route
            if time.monotonic() >= deadline:
                missing = missing_ranges(servers, start, end, self.banned())
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


def _close_ref(ref: "weakref.ref[SwarmClient]") -> None:
    client = ref()
    if client is not None:
        client.close()
