"""A peer in the swarm: hivemind's libp2p daemon + Kademlia DHT node behind a small API of our own.

Everything hivemind-specific lives here, so the transport stays swappable. Must be used from inside one asyncio
loop (the caller's), which owns the node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import socket
import tempfile
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PContext, P2PDaemonError, PeerID
from hivemind.p2p.p2p_daemon_bindings.utils import ControlFailure
from hivemind.utils.multiaddr import Multiaddr
from hivemind.utils.timed_storage import ValueWithExpiration

from corolla.errors import BadRequestError, CorollaError
from corolla.net.auth import (Membership, RecordSigner, SwarmAuth, SwarmKey, SwarmKeyAuthorizer, generate_identity,
                              load_identity, peer_id_of_multiaddr, peer_id_of_public_key, public_key_der)
from corolla.net.messages import ErrorReply
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
    use_relay: bool = field(default=True, metadata={"help": "reach peers behind NAT through libp2p relays "
                                                            "(--no-use-relay: direct connections only)"})
    reachability: str = field(default="auto", metadata={
        "help": "how others reach this peer: auto (private when this machine has a private address and an initial "
                "peer a public one, else libp2p's AutoNAT finds out), public (this address or "
                "--announce-host is reachable from the internet: it also relays for peers behind NAT) or private "
                "(behind a home router that forwards nothing in: reserve a slot on relays and be reached "
                "through them; nothing needs opening)"})
    relays: tuple[str, ...] = field(default=(), metadata={
        "help": "with --reachability private: multiaddrs of public peers to be reached through (default: the "
                "initial peers). libp2p reserves at once only with 4 or more; with fewer it waits 3 minutes"})
    swarm_key_file: str | None = field(default=None, metadata={
        "help": "private swarm: file with the swarm's shared secret (e.g. `openssl rand -hex 32 > swarm.key`); "
                "peers without it can neither read the DHT, announce, serve nor be served"})
    allowed_peers: tuple[str, ...] | None = field(default=None, metadata={
        "help": "private swarm: peer ids allowed to talk to this peer (besides itself and its initial peers); "
                "streams, DHT requests and records of other peers are refused"})

    def __post_init__(self) -> None:
        _check_reachability(self)


REACHABILITIES = ("auto", "public", "private")


def _is_private_ip(text: str) -> bool:
    address = ipaddress.ip_address(text)
    return address.is_private or address in ipaddress.ip_network("100.64.0.0/10")  # RFC 1918 etc., carrier NAT


def _outbound_source(peer_ip: str) -> str:
    """The local address this machine would use to reach `peer_ip` (a UDP connect sends no packet)."""
    family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_ip, 9))
        return probe.getsockname()[0]


def resolve_reachability(config: NetworkConfig, outbound_source=_outbound_source) -> str:
    """--reachability auto, decided where the answer is plain: a peer that would reach a public initial peer from
    a private address (a home LAN, carrier NAT) is behind NAT, so "private"; a loopback or LAN swarm, a public
    address or an --announce-host stays as asked ("auto": libp2p's AutoNAT decides, slowly in small swarms)."""
    if config.reachability != "auto" or config.announce_host or not config.use_relay:
        return config.reachability
    try:
        if ipaddress.ip_address(config.host).is_loopback:
            return "auto"
    except ValueError:
        return "auto"
    for peer in config.initial_peers:
        parts = peer.split("/")
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6"):
            continue
        try:
            if _is_private_ip(parts[2]):
                continue
            source = config.host if config.host not in ("0.0.0.0", "::") else outbound_source(parts[2])
            return "private" if _is_private_ip(source) else "auto"
        except (ValueError, OSError):
            continue
    return "auto"


def _check_reachability(config: NetworkConfig) -> None:
    if config.reachability not in REACHABILITIES:
        raise CorollaError(f"--reachability must be one of {', '.join(REACHABILITIES)}, not {config.reachability!r}")
    if config.reachability == "private" and not config.use_relay:
        raise CorollaError("--reachability private needs relays: drop --no-use-relay")
    if config.reachability == "private" and not (config.relays or config.initial_peers):
        raise CorollaError("--reachability private needs public peers to relay through: give --initial-peers "
                           "(or --relays)")


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
        # asyncio.timeout, not wait_for: wait_for wraps the read in a new task (extra loop turns on every message).
        async with asyncio.timeout(timeout):
            return await read_frame(self._reader, self._max_frame_bytes, self._meter)

    async def linger(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for the peer to close its side, discarding whatever it still sends. Used after an error
        reply: closing a stream that still has unread input resets it, and the reset can overtake the reply."""
        try:
            async with asyncio.timeout(timeout):
                while await self._reader.read(2**16):
                    pass
        except (TimeoutError, ConnectionError, OSError):
            pass

    def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _circuit_multiaddr(address: str) -> Multiaddr:
    """`<relay addr>/p2p/<relay>/p2p-circuit[/p2p/<target>]` as the daemon reads it. hivemind's Multiaddr writes a
    /p2p/ part as a CID (0x01 0x72 ...), where the daemon expects the bare multihash ("length greater than remaining
    number of bytes in buffer"), so the /p2p/ part is written here by hand."""
    relay_part, _, _ = address.partition("/p2p-circuit")
    transport, _, relay = relay_part.rpartition("/p2p/")
    if not transport or not relay:
        raise ValueError("not a <relay>/p2p/<id>/p2p-circuit address")
    multihash = PeerID.from_base58(relay).to_bytes()
    return Multiaddr(Multiaddr(transport).to_bytes() + _varint(0x1A5) + _varint(len(multihash)) + multihash
                     + _CIRCUIT_CODE)


_CIRCUIT_CODE = b"\xa2\x02"  # varint of 0x122, the multiaddr code of /p2p-circuit


def _is_circuit(addr) -> bool:
    """Whether a connection address goes through a relay."""
    try:
        return "/p2p-circuit" in str(addr)
    except Exception:  # hivemind's multiaddr cannot print some daemon-made /p2p/ parts; the raw code still shows
        return _CIRCUIT_CODE in addr.to_bytes()


StreamHandler = Callable[[MessageStream], Awaitable[None]]

AUTH_TIMEOUT = 10.0  # seconds a peer opening a stream in a swarm with a key has to send its proof
_AUTH_FRAME_BYTES = 1024  # the proof frame is tiny: read no more than this before the peer is known


class _GatedP2P(P2P):
    """hivemind's P2P whose protobuf RPC handlers (the DHT's) refuse peers outside the allow-list."""

    _membership: Membership | None = None  # set right after the daemon starts, before any handler is added

    async def add_protobuf_handler(self, name, handler, input_protobuf_type, *, stream_input: bool = False,
                                   stream_output: bool = False, balanced: bool = False) -> None:
        def check(context: P2PContext) -> None:
            peer_id = context.remote_id.to_base58()
            if self._membership is not None and not self._membership.allows(peer_id):
                logger.debug("refusing %s from %s: not in the allow-list", name, peer_id)
                raise PermissionError(f"{peer_id} is not allowed in this private swarm")

        if not stream_input and not stream_output:
            async def gated(request, context: P2PContext):
                check(context)
                return await handler(request, context)
        else:
            async def gated(requests, context: P2PContext):
                check(context)
                output = handler(requests, context)
                if isinstance(output, AsyncIterable):
                    async for item in output:
                        yield item
                else:
                    yield await output

        await super().add_protobuf_handler(name, gated, input_protobuf_type, stream_input=stream_input,
                                           stream_output=stream_output, balanced=balanced)


# A public peer's relay service, as the daemon's flags set it. The daemon's own limits cut a relayed connection
# after 128 KiB each way (a 36-token session of a 1024-wide model through a relay was reset mid-generation in
# benchmarks/network_bench.py), so relaying is given room for long sessions. Per-peer circuit counts stay default.
_RELAY_SERVICE_OPTIONS = {"relayService": 1, "relayDataLimit": 1 << 36, "relayTimeLimit": "24h0m0s"}


def _p2p_class(daemon_options: dict[str, Any]) -> type[_GatedP2P]:
    """_GatedP2P whose daemon gets `daemon_options` as extra command-line flags."""
    if not daemon_options:
        return _GatedP2P

    class _ConfiguredP2P(_GatedP2P):
        def _make_process_args(self, *args, **kwargs) -> list[str]:
            return P2P._make_process_args(*args, **kwargs, **daemon_options)

    return _ConfiguredP2P


class Node:
    """This process's peer: a DHT participant that can serve and open message streams.

    Every DHT record it stores is signed with its identity key (see auth.py); `get` returns only records whose
    signature proves they come from the peer named by their subkey (and, in a private swarm, from a member).
    """

    def __init__(self, p2p: P2P, dht: DHTNode, membership: Membership, identity_key=None):
        self._p2p, self._dht, self.membership = p2p, dht, membership
        self.identity_key = identity_key  # RSA private key of this peer id (signs DHT records and work receipts)
        self.peer_id: str = p2p.peer_id.to_base58()
        self.meter = TransferMeter()  # bandwidth seen on this peer's incoming streams
        self.behind_nat = False  # reachable only through relays (--reachability private)
        self.relay_addresses: list[str] = []  # what reaches this peer through its relays (announced by servers)
        self._known_addresses: dict[str, list[str]] = {}  # peer id -> its announced relay addresses

    @classmethod
    async def create(cls, config: NetworkConfig, client_mode: bool = False) -> "Node":
        config = dataclasses.replace(config, reachability=resolve_reachability(config))
        behind_nat = config.reachability == "private"
        if behind_nat:
            logger.info("reachable through relays (--reachability private): %s",
                        ", ".join(config.relays or config.initial_peers))
        # A peer behind NAT takes part in the DHT as a client (as Petals' relayed servers do): others could only
        # reach its DHT through relays, and stores sent to it were lost (measured in tests/network: records of a
        # NAT'd server in DHT-server mode were never found by clients).
        dht_client = client_mode or behind_nat
        announce = [_maddr(config.announce_host, config.port)] if config.announce_host and config.port else None
        swarm_key = SwarmKey.from_file(config.swarm_key_file) if config.swarm_key_file else None
        allowed = None
        if config.allowed_peers is not None:
            allowed = frozenset(config.allowed_peers) | {
                peer for peer in map(peer_id_of_multiaddr, config.initial_peers) if peer}
        # The identity key is also the key that signs this peer's records, so it must be at hand: without
        # --identity, a fresh one is made in a private temporary directory (the daemon reads it at start).
        with tempfile.TemporaryDirectory(prefix="corolla-identity-") as tmp:
            identity = config.identity or os.path.join(tmp, "identity.key")
            fresh = not os.path.isfile(identity)
            if fresh:
                try:
                    generate_identity(identity)
                except OSError as e:
                    raise CorollaError(f"cannot write the identity file {identity}: {e}") from None
            private_key = load_identity(identity)
            try:
                p2p_class = _p2p_class(_RELAY_SERVICE_OPTIONS if config.reachability == "public" else {})
                p2p = await p2p_class.create(
                    initial_peers=list(config.initial_peers) or None,
                    host_maddrs=[_maddr(config.host, config.port)],
                    announce_maddrs=announce,
                    identity_path=identity,
                    check_if_identity_free=not fresh,
                    nat_port_map=config.nat_port_map,
                    use_relay=config.use_relay,
                    use_auto_relay=behind_nat,
                    # relays to reserve a slot on (libp2p's autorelay; it also tries the DHT's peers)
                    trusted_relays=list(config.relays or config.initial_peers) if behind_nat else None,
                    # public: relay for others at once (libp2p serves as a relay only once it believes it is
                    # public, which AutoNAT decides only after several peers dialled back)
                    force_reachability=None if config.reachability == "auto" else config.reachability,
                    use_ipfs=False,
                    # the daemon's own DHT (peer routing: how a client finds a relayed server's circuit address)
                    dht_mode="client" if client_mode else "server",
                )
            except Exception as e:
                raise CorollaError(f"could not start the p2p daemon: {e}") from e
        peer_id = p2p.peer_id.to_base58()
        membership = Membership(local_peer_id=peer_id, allowed=allowed, swarm_key=swarm_key)
        p2p._membership = membership
        if peer_id_of_public_key(public_key_der(private_key)) != peer_id:
            await p2p.shutdown()
            raise CorollaError(f"the p2p daemon's peer id {peer_id} does not match the identity key")
        try:
            dht = await DHTNode.create(
                p2p=p2p, initial_peers=list(config.initial_peers) or None, client_mode=dht_client,
                ensure_bootstrap_success=True, wait_timeout=5,
                record_validator=RecordSigner(private_key, membership),
                authorizer=SwarmKeyAuthorizer(swarm_key) if swarm_key else None,
            )
        except Exception as e:
            await p2p.shutdown()
            peers = ", ".join(config.initial_peers) or "(none)"
            hint = (" (this is a private swarm: check the swarm key file and that this peer's id "
                    f"{peer_id} is in the others' allow-lists)" if membership.private else "")
            raise CorollaError(f"could not join the swarm through initial peers {peers}: {e}{hint}") from e
        node = cls(p2p, dht, membership, private_key)
        node.behind_nat = behind_nat
        if behind_nat:
            node.relay_addresses = [f"{relay}/p2p-circuit/p2p/{peer_id}"
                                    for relay in (config.relays or config.initial_peers)[:8] if "/p2p/" in relay]
        return node

    async def addresses(self) -> list[str]:
        """Multiaddrs (with /p2p/<peer id>) that other peers can use as --initial-peers."""
        return [str(addr) for addr in await self._p2p.get_visible_maddrs(latest=True)]

    def remember_addresses(self, peer_id: str, addresses: list[str]) -> None:
        """Relay addresses a peer announced (its DHT record): dialled when the daemon's own routing cannot find it
        (libp2p's peer routing does not always learn a NAT'd peer's circuit addresses: seen in tests/network)."""
        if addresses and peer_id != self.peer_id:
            self._known_addresses[peer_id] = list(addresses)

    async def _dial_announced(self, peer: PeerID) -> None:
        """Connect to `peer` through its announced relay addresses, if it announced any (else nothing)."""
        encoded = []
        for address in self._known_addresses.get(peer.to_base58(), []):
            try:
                encoded.append(_circuit_multiaddr(address))
            except (ValueError, KeyError, TypeError) as e:
                logger.debug("skipping the announced address %s: %s", address, e)
        if encoded:
            await self._p2p._client.connect(peer, encoded)

    async def path_to(self, peer_id: str) -> str | None:
        """How this peer is connected to `peer_id` now: "relayed" (every connection goes through a relay),
        "direct", or None when not connected."""
        try:
            peers = await asyncio.wait_for(self._p2p.list_peers(), 5)
        except (ControlFailure, P2PDaemonError, asyncio.TimeoutError, OSError):
            return None
        for info in peers:
            if info.peer_id.to_base58() == peer_id:
                return "relayed" if info.addrs and all(map(_is_circuit, info.addrs)) else "direct"
        return None

    # ---- DHT ----------------------------------------------------------------------------------------------

    async def store(self, items: list[tuple[str, str, Any, float]]) -> None:
        """Store (key, subkey, value, expiration unix time) items; values must be msgpack-able plain data.

        The subkey must be this peer's id: the record is signed with its identity key, and no other peer can
        overwrite it.
        """
        if not items:
            return
        for _, subkey, _, _ in items:
            if subkey != self.peer_id:
                raise ValueError(f"a peer stores records only under its own peer id {self.peer_id}, not {subkey!r}")
        await self._dht.store_many(
            keys=[key for key, _, _, _ in items],
            values=[value for _, _, value, _ in items],
            expiration_time=[expiration for _, _, _, expiration in items],
            subkeys=[subkey for _, subkey, _, _ in items],
        )

    async def get(self, keys: list[str]) -> dict[str, dict[str, tuple[Any, float]]]:
        """For each key, its live {peer id: (value, expiration)}; empty when nothing is stored.

        Only records that passed RecordSigner are here: signed by the key of the peer id they are stored under,
        and in a private swarm by a member.
        """
        found = await self._dht.get_many(keys, sufficient_expiration_time=float("inf"))
        now = time.time()
        result: dict[str, dict[str, tuple[Any, float]]] = {}
        for key in keys:
            entry = found.get(key)
            subitems: dict[str, tuple[Any, float]] = {}
            if isinstance(entry, ValueWithExpiration) and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    if (isinstance(subkey, str) and self.membership.allows(subkey)
                            and isinstance(item, ValueWithExpiration) and item.expiration_time > now):
                        subitems[subkey] = (item.value, item.expiration_time)
            result[key] = subitems
        return result

    # ---- streams ------------------------------------------------------------------------------------------

    async def serve(self, protocol: str, handler: StreamHandler, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        """Run `handler` on each incoming stream of `protocol`; in a private swarm, only for members."""
        async def on_stream(info, reader, writer):
            stream = MessageStream(info.peer_id.to_base58(), reader, writer, max_frame_bytes, self.meter)
            try:
                refusal = await self._check_member(stream, reader)
                if refusal is None:
                    await handler(stream)
                else:
                    logger.info("refused a %s stream from %s: %s", protocol, stream.peer_id, refusal)
                    try:
                        await asyncio.wait_for(stream.send(ErrorReply(kind="forbidden", message=refusal)), 5)
                    except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                        pass
            except Exception:
                logger.exception("handler for %s from %s failed", protocol, stream.peer_id)
            finally:
                try:
                    await stream.linger()  # close after the peer, so a last reply in flight is not reset away
                finally:
                    stream.close()

        await self._p2p.add_binary_stream_handler(protocol, on_stream)

    async def _check_member(self, stream: MessageStream, reader: asyncio.StreamReader) -> str | None:
        """None if the stream's peer belongs to this swarm, else why not (for the refusal and the log)."""
        if not self.membership.allows(stream.peer_id):
            return f"peer {stream.peer_id} is not in this private swarm's allow-list"
        if self.membership.swarm_key is None:
            return None
        try:
            proof = await asyncio.wait_for(read_frame(reader, _AUTH_FRAME_BYTES), AUTH_TIMEOUT)
        except (BadRequestError, EOFError, ConnectionError, asyncio.TimeoutError) as e:
            return f"no proof of this private swarm's key ({str(e) or type(e).__name__})"
        if not isinstance(proof, SwarmAuth) or not self.membership.swarm_key.is_member(stream.peer_id, proof.token):
            return f"peer {stream.peer_id} did not prove it holds this private swarm's key"
        return None

    async def connect(self, peer_id: str, protocol: str, timeout: float) -> MessageStream:
        """Open a stream to `peer_id`; ConnectionError if the peer cannot be reached (or is not a valid peer id or
        not in this private swarm's allow-list), TimeoutError after `timeout`."""
        if not self.membership.allows(peer_id):
            raise ConnectionError(f"{peer_id} is not in this private swarm's allow-list")
        try:
            peer = PeerID.from_base58(peer_id)
        except Exception:
            raise ConnectionError(f"{peer_id!r} is not a valid peer id") from None
        try:
            async with asyncio.timeout(timeout):
                # A server behind NAT: connect through the relays it announced first. libp2p's own lookup of its
                # address often does not find the circuit addresses and takes seconds to give up (tests/network);
                # an existing connection makes this a no-op.
                await self._dial_announced(peer)
                _, reader, writer = await self._p2p.call_binary_stream_handler(peer, protocol)
        except (ControlFailure, P2PDaemonError) as e:
            raise ConnectionError(f"cannot reach {peer_id}: {e}") from None
        stream = MessageStream(peer_id, reader, writer, meter=self.meter)
        if self.membership.swarm_key is not None:
            try:
                await stream.send(SwarmAuth(token=self.membership.swarm_key.member_token(self.peer_id)))
            except ConnectionError:
                pass  # the peer refused us already; its answer (a `forbidden` error) is what the caller reads next
        return stream

    async def shutdown(self) -> None:
        try:
            await self._dht.shutdown()
        finally:
            await self._p2p.shutdown()
