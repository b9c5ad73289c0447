"""A server fetching the shards of the span it would move to (server.py `_fetch_while_serving`) stays on its blocks
whatever the download raises, and a download stuck on the network does not hold up a server told to stop. The
Server is real; its model source's fetch is a fake, the swarm view a stub (no network)."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from corolla.net.node import NetworkConfig
from corolla.server import server as server_module
from corolla.server.config import ServerConfig
from corolla.server.server import Server


class _FakeSource:
    def __init__(self, fetch):
        self.fetch_blocks = fetch


@pytest.fixture
def server(tiny_llama, monkeypatch) -> Server:
    """A server on blocks 0:2 of 5 whom the swarm would send to blocks 2:4; announcing does nothing."""
    server = Server(ServerConfig(model=str(tiny_llama), announce_period=0.05), NetworkConfig())
    server.start, server.end = 0, 2

    async def no_announce(node, state):
        pass

    async def no_servers(node, model_id, num_blocks):
        return []

    monkeypatch.setattr(server, "_announce", no_announce)
    monkeypatch.setattr(server_module, "read_servers", no_servers)
    monkeypatch.setattr(server_module, "should_move", lambda servers, peer_id, num_blocks: (2, 4))
    return server


class _Node:
    peer_id = "QmSelf"


@pytest.mark.parametrize("error", [httpx.ConnectError("connection refused"),
                                   httpx.ReadTimeout("timed out"),
                                   httpx.RemoteProtocolError("peer closed connection"),
                                   OSError("disk full")])
def test_a_failed_download_keeps_the_server_on_its_blocks(server, error):
    def failing_fetch(config, start, end):
        raise error

    server.source = _FakeSource(failing_fetch)
    asyncio.run(server._maybe_move(_Node()))  # raised out of run() before: the server exited while serving
    assert (server.start, server.end) == (0, 2)


def test_a_stuck_download_does_not_hold_up_stopping(server):
    release = threading.Event()

    def stuck_fetch(config, start, end):
        release.wait(20)  # bounded, so a failing test still ends; the fix must not wait for it
        raise httpx.ReadTimeout("gave up")

    server.source = _FakeSource(stuck_fetch)

    async def stop_soon() -> bool:
        asyncio.get_running_loop().call_later(0.2, server.stop.set)
        return await server._fetch_while_serving(_Node(), (2, 4))

    began = time.monotonic()
    try:
        assert asyncio.run(stop_soon()) is False  # stopping: stay, do not move
        # asyncio.run joined a to_thread download at exit: it returned only once the fetch gave up, 20 s later.
        assert time.monotonic() - began < 5
    finally:
        release.set()
