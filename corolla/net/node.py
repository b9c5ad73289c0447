"""A peer in the swarm: hivemind's libp2p daemon + Kademlia DHT node behind a small API of our own.

Everything hivemind-specific lives here, so the transport stays swappable. Must be used from inside one asyncio
loop (the caller's), which owns the node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PDaemonError, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.utils.timed_storage import ValueWithExpiration

from corolla.errors import CorollaError
from corolla.net.wire import DEFAULT_MAX_FRAME_BYTES, Message, TransferMeter, read_frame, write_frame

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkConfig:
    """How a peer joins the swarm. Defaults keep everything on loopback: nothing leaves the machine."""

    initial_peers: tuple[str, ...] = field(default=(), metadata={"help": "multiaddrs of peers already in the swarm"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for a public server)"})
    port: int = field(default=0, metadata={"help": "TCP port to listen on (0 = any free port)"})
    announce_host: str | None = field(default=None, metadata={"help": "address others should dial, if not host"})
    identity: str | None = field(default=None, metadata={"help": "private key file, for a stable peer id"})
    nat_port_map: bool = field(default=False, metadata={"help": "ask the LAN gateway to map a port (UPnP/NAT-PMP)"})
    use_relay: bool = field(default=False, metadata={"help": "reach and be reached through libp2p relays"})


def _maddr(host: str, port: int) -> str:
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


class MessageStream:
    """One libp2p stream carrying typed, length-prefixed messages in both directions."""

    def __init__(self, peer_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, meter: TransferMeter | None = None):
        self.peer_id, self._reader, self._writer, self._max_frame_bytes = peer_id, reader, writer, max_frame_bytes
        self._meter = meter

    async def send(self, message: Message) -> None:
        await write_frame(self._writer, message)

    async def recv(self, timeout: float | None = None) -> Message:
        """Next message; EOFError if the peer closed cleanly, TimeoutError after `timeout` seconds."""
        return await asyncio.wait_for(read_frame(self._reader, self._max_frame_bytes, self._meter), timeout)

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()


StreamHandler = Callable[[MessageStream], Awaitable[None]]


class Node:
    """This process's peer: a DHT participant that can serve and open message streams."""

    def __init__(self, p2p: P2P, dht: DHTNode):
        self._p2p, self._dht = p2p, dht
        self.peer_id: str = p2p.peer_id.to_base58()
        self.meter = TransferMeter()  # bandwidth seen on this peer's incoming streams

    @classmethod
    async def create(cls, config: NetworkConfig, client_mode: bool = False) -> "Node":
        announce = [_maddr(config.announce_host, config.port)] if config.announce_host and config.port else None
        try:
            p2p = await P2P.create(
                initial_peers=list(config.initial_peers) or None,
                host_maddrs=[_maddr(config.host, config.port)],
                announce_maddrs=announce,
                identity_path=config.identity,
                nat_port_map=config.nat_port_map,
                use_relay=config.use_relay,
                use_auto_relay=config.use_relay,
                use_ipfs=False,
                dht_mode="client" if client_mode else "server",
            )
        except Exception as e:
            raise CorollaError(f"could not start the p2p daemon: {e}") from e
        try:
            dht = await DHTNode.create(
                p2p=p2p, initial_peers=list(config.initial_peers) or None, client_mode=client_mode,
                ensure_bootstrap_success=True, wait_timeout=5,
            )
        except Exception as e:
            await p2p.shutdown()
            peers = ", ".join(config.initial_peers) or "(none)"
            raise CorollaError(f"could not join the swarm through initial peers {peers}: {e}") from e
        return cls(p2p, dht)

    async def addresses(self) -> list[str]:
        """Multiaddrs (with /p2p/<peer id>) that other peers can use as --initial-peers."""
        return [str(addr) for addr in await self._p2p.get_visible_maddrs(latest=True)]

    # ---- DHT ----------------------------------------------------------------------------------------------

    async def store(self, items: list[tuple[str, str, Any, float]]) -> None:
        """Store (key, subkey, value, expiration unix time) items; values must be msgpack-able plain data."""
        if not items:
            return
        await self._dht.store_many(
            keys=[key for key, _, _, _ in items],
            values=[value for _, _, value, _ in items],
            expiration_time=[expiration for _, _, _, expiration in items],
            subkeys=[subkey for _, subkey, _, _ in items],
        )

    async def get(self, keys: list[str]) -> dict[str, dict[str, tuple[Any, float]]]:
        """For each key, its live {subkey: (value, expiration)}; empty when nothing is stored."""
        found = await self._dht.get_many(keys, sufficient_expiration_time=float("inf"))
        now = time.time()
        result: dict[str, dict[str, tuple[Any, float]]] = {}
        for key in keys:
            entry = found.get(key)
            subitems: dict[str, tuple[Any, float]] = {}
            if isinstance(entry, ValueWithExpiration) and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    if isinstance(item, ValueWithExpiration) and item.expiration_time > now:
                        subitems[str(subkey)] = (item.value, item.expiration_time)
            result[key] = subitems
        return result

    # ---- streams ------------------------------------------------------------------------------------------

    async def serve(self, protocol: str, handler: StreamHandler, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        async def on_stream(info, reader, writer):
            stream = MessageStream(info.peer_id.to_base58(), reader, writer, max_frame_bytes, self.meter)
            try:
                await handler(stream)
            except Exception:
                logger.exception("handler for %s from %s failed", protocol, stream.peer_id)
            finally:
                stream.close()

        await self._p2p.add_binary_stream_handler(protocol, on_stream)

    async def connect(self, peer_id: str, protocol: str, timeout: float) -> MessageStream:
        """Open a stream to `peer_id`; ConnectionError if the peer cannot be reached, TimeoutError after `timeout`."""
        try:
            _, reader, writer = await asyncio.wait_for(
                self._p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), protocol), timeout
            )
        except (ControlFailure, P2PDaemonError) as e:
            raise ConnectionError(f"cannot reach {peer_id}: {e}") from None
        return MessageStream(peer_id, reader, writer, meter=self.meter)

    async def shutdown(self) -> None:
        try:
            await self._dht.shutdown()
        finally:
            await self._p2p.shutdown()
