"""The swarm map: which server holds which span of blocks, in what state, how fast and how far away.

One typed object (`SwarmState`) is built from the DHT records and a ping to each server; the web page
(`/api/v1/state`) and `corolla health --json` serve exactly this object, and `corolla health` draws it.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel, ConfigDict, Field

from corolla.errors import CorollaError
from corolla.net.directory import read_servers
from corolla.net.node import Node
from corolla.net.ping import measure_rtt
from corolla.net.records import PeerRecord, ServerState


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class ServerView(_Frozen):
    peer_id: str
    name: str = Field(description="the server's public name, else the end of its peer id")
    state: ServerState
    start_block: int = Field(description="first block of its span")
    end_block: int = Field(description="one past the last block of its span")
    throughput: float = Field(description="announced inference tokens/s over its span")
    cache_tokens_left: int = Field(description="attention-cache room, in tokens")
    served_block_tokens: int = Field(default=0, description="work it did for clients, ever: tokens through blocks "
                                                            "(credits; a backward pass counts twice)")
    dtype: str
    quant: str
    adapters: list[str] = Field(description="adapters it serves (empty when it announces none)")
    version: str = Field(description="corolla version it runs")
    rtt_ms: float | None = Field(description="ping round trip from the observer; None if it did not answer")
    reached: str | None = Field(default=None, description="how the observer reached it: direct or relayed "
                                                          "(through a libp2p relay: the server is behind NAT); "
                                                          "None if it did not answer")


class BlockView(_Frozen):
    index: int
    servers: list[str] = Field(description="peer ids of the online servers holding this block")
    covered: bool = Field(description="at least one online server holds it")


class SwarmState(_Frozen):
    model: str = Field(description="the model's name (as in /v1/models)")
    model_id: str = Field(description="its id in the DHT: name plus a hash of the config")
    num_blocks: int
    updated_at: float = Field(description="unix time, seconds")
    servers: list[ServerView] = Field(description="sorted by span start")
    blocks: list[BlockView]
    covered_blocks: int = Field(description="blocks held by at least one online server")
    missing: list[tuple[int, int]] = Field(description="[start, end) ranges no online server holds")

    @property
    def complete(self) -> bool:
        return self.covered_blocks == self.num_blocks


def build_state(model: str, model_id: str, num_blocks: int, records: list[PeerRecord],
                rtts: dict[str, float | None], now: float, paths: dict[str, str | None] | None = None) -> SwarmState:
    """Pure: the map from DHT records, measured round-trip times (seconds) and how each server was reached."""
    paths = paths or {}
    servers = sorted((_server_view(r, rtts.get(r.peer_id), paths.get(r.peer_id)) for r in records),
                     key=lambda s: (s.start_block, s.end_block, s.name))
    holders: list[list[str]] = [[] for _ in range(num_blocks)]
    for server in servers:
        if server.state == ServerState.ONLINE:
            for block in range(server.start_block, min(server.end_block, num_blocks)):
                holders[block].append(server.peer_id)
    blocks = [BlockView(index=i, servers=peers, covered=bool(peers)) for i, peers in enumerate(holders)]
    return SwarmState(model=model, model_id=model_id, num_blocks=num_blocks, updated_at=now, servers=servers,
                      blocks=blocks, covered_blocks=sum(b.covered for b in blocks), missing=_missing(blocks))


def _server_view(peer: PeerRecord, rtt: float | None, path: str | None = None) -> ServerView:
    record = peer.record
    adapters = getattr(record, "adapters", None) or ()  # announced by servers that serve adapters
    return ServerView(
        peer_id=peer.peer_id, name=record.public_name or f"…{peer.peer_id[-8:]}", state=record.state,
        start_block=record.start_block, end_block=record.end_block, throughput=record.throughput,
        cache_tokens_left=record.cache_tokens_left, served_block_tokens=record.served_block_tokens,
        dtype=record.dtype, quant=record.quant,
        adapters=[str(a) for a in adapters], version=record.version,
        rtt_ms=None if rtt is None else round(rtt * 1000, 3),
        reached=None if rtt is None else path or ("relayed" if record.relay_addresses else "direct"),
    )


def _missing(blocks: list[BlockView]) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for block in blocks:
        if block.covered:
            continue
        if ranges and ranges[-1][1] == block.index:
            ranges[-1] = (ranges[-1][0], block.index + 1)
        else:
            ranges.append((block.index, block.index + 1))
    return ranges


async def collect_state(node: Node, model: str, model_id: str, num_blocks: int,
                        rtt_timeout: float = 2.0) -> SwarmState:
    """Read the DHT and ping every server that is not offline (all pings at once, each bounded)."""
    records = await read_servers(node, model_id, num_blocks)

    async def rtt(peer: PeerRecord) -> tuple[float | None, str | None]:
        if peer.record.state == ServerState.OFFLINE:
            return None, None
        try:
            measured = await asyncio.wait_for(measure_rtt(node, peer.peer_id, rtt_timeout), rtt_timeout * 2)
        except (ConnectionError, EOFError, OSError, asyncio.TimeoutError, CorollaError):
            return None, None
        return measured, await node.path_to(peer.peer_id)  # the connection the ping just used

    measured = dict(zip((p.peer_id for p in records), await asyncio.gather(*(rtt(peer) for peer in records))))
    return build_state(model, model_id, num_blocks, records, {peer: rtt for peer, (rtt, _) in measured.items()},
                       time.time(), paths={peer: path for peer, (_, path) in measured.items()})
