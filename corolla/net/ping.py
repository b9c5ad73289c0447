"""Round-trip time between peers: a tiny echo protocol (server handler and client call side by side)."""

from __future__ import annotations

import asyncio
import time

from pydantic import Field

from corolla.net.node import MessageStream, Node
from corolla.net.wire import Message, message_type

PING_PROTOCOL = "corolla/ping/1"
MAX_REPLY_BYTES = 64 * 1024
# Padding of a routing ping's answer: four tokens' activations of a 1024-wide model in float32. On a 100 Mbit/s
# uplink it adds 1.3 ms to the round trip, on a 1 Mbit/s one about 100 ms (past a router's burst of a few KiB), so
# routing sees a slow uplink (tests/network/test_homes.py). Pings are rare (every 30 s per server).
ROUTING_REPLY_BYTES = 16384


@message_type("ping")
class Ping(Message):
    nonce: int = Field(ge=0, description="echoed back")
    reply_bytes: int = Field(default=0, ge=0, le=MAX_REPLY_BYTES, description="padding the pong must carry, in "
                                                                              "bytes (so the round trip includes "
                                                                              "the answerer's uplink)")


@message_type("pong")
class Pong(Message):
    nonce: int
    padding: bytes = Field(default=b"", max_length=MAX_REPLY_BYTES, description="reply_bytes zero bytes")


async def serve_ping(node: Node, max_pings: int = 16, reply_delay: float = 0.0) -> None:
    async def handle(stream: MessageStream) -> None:
        for _ in range(max_pings):
            try:
                message = await stream.recv(timeout=10)
            except (EOFError, ConnectionError, asyncio.TimeoutError):
                return
            if not isinstance(message, Ping):
                return
            if reply_delay > 0:  # testing only: emulates a slow link
                await asyncio.sleep(reply_delay)
            await stream.send(Pong(nonce=message.nonce, padding=bytes(message.reply_bytes)))

    await node.serve(PING_PROTOCOL, handle)


async def measure_rtt(node: Node, peer_id: str, timeout: float = 5.0, pings: int = 2,
                      reply_bytes: int = ROUTING_REPLY_BYTES) -> float:
    """Best round-trip time in seconds over `pings` echoes on one stream (the first also opens the stream); each
    answer carries `reply_bytes` of padding, so a slow uplink shows."""
    stream = await node.connect(peer_id, PING_PROTOCOL, timeout)
    try:
        best = float("inf")
        for nonce in range(pings):
            began = time.perf_counter()
            await stream.send(Ping(nonce=nonce, reply_bytes=reply_bytes))
            reply = await stream.recv(timeout)
            if not isinstance(reply, Pong) or reply.nonce != nonce:
                raise ConnectionError(f"{peer_id} answered a ping with {reply.TYPE}")
            best = min(best, time.perf_counter() - began)
        return best
    finally:
        stream.close()
