"""DHT records: what a server announces about itself, under which keys."""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field


class ServerState(str, enum.Enum):
    JOINING = "joining"  # loading blocks; not serving yet
    ONLINE = "online"
    OFFLINE = "offline"  # shutting down; clients must not route here


class ServerRecord(BaseModel):
    """Announced by a server for each block it serves, under block_key(model_id, block), subkey = its peer id,
    signed with the server's identity key (net/auth.py), so only that server can write or replace it."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # newer peers may add fields

    state: ServerState
    start_block: int = Field(ge=0, description="first block of the server's span")
    end_block: int = Field(ge=1, description="one past the last block of the span")
    throughput: float = Field(default=1.0, ge=0, description="inference (decode) tokens/s of the whole span, measured")
    forward_throughput: float = Field(default=0.0, ge=0, description="forward (prefill/training) tokens/s of the span")
    network_mbps: float | None = Field(default=None, ge=0, description="incoming bandwidth seen in real transfers")
    dtype: str = Field(default="float32", description="compute dtype")
    quant: str = Field(default="none", description="weight quantization")
    adapters: list[str] = Field(default_factory=list, max_length=64, description="adapters this server hosts "
                                                                                 "(by the names clients ask for)")
    cache_tokens_left: int = Field(default=0, ge=0, description="attention-cache room, in tokens")
    cache_tokens_total: int = Field(default=0, ge=0, description="the whole attention-cache budget, in tokens: the "
                                                                 "most one session (max_length x batch) can ever "
                                                                 "hold here (0: not announced)")
    version: str = Field(default="", description="corolla version of the server")
    public_name: str = Field(default="", max_length=100, description="optional human-readable server name")
    served_block_tokens: int = Field(default=0, ge=0, description="work this server did for clients, ever: tokens "
                                                                  "through blocks (a backward pass counts twice)")
    started_at: float = Field(default=0.0, description="unix time the server process started (restarts change it)")
    relay_addresses: list[str] = Field(default_factory=list, max_length=8, description="behind NAT "
                                       "(--reachability private): multiaddrs that reach this server through relays, "
                                       "<relay>/p2p-circuit/p2p/<server>; empty when it is reached directly")
    next_pings: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict, max_length=16,
                                         description="round-trip seconds to servers of the blocks after this span, "
                                                     "measured by this server (clients route pushes with them)")


class CreditsRecord(BaseModel):
    """Published by a server with credits on, under credits_key(model_id) (credits/book.py), subkey = its peer id,
    signed with its identity key: its largest receipts and its view of standing (docs/incentives.md). Readers
    validate each publisher's record and skip one that does not fit."""

    model_config = ConfigDict(frozen=True, extra="ignore")  # newer peers may add fields

    receipts: list[Annotated[bytes, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=32, description="wire-encoded WorkReceipts for work this server did, its "
                                                         "largest (a receipt with a delegation is ~1.3 KB)")
    standing: dict[Annotated[str, Field(max_length=100)], Annotated[float, Field(ge=-1.0, allow_inf_nan=False)]] = \
        Field(default_factory=dict, max_length=64, description="identity -> standing in this server's view, in "
                                                               "decayed block-tokens; -1.0: trusted outright")
    served_block_tokens: int = Field(default=0, ge=0, description="work this server did for clients, ever: tokens "
                                                                  "through blocks (a backward pass counts twice)")
    started: float = Field(default=0.0, allow_inf_nan=False, description="unix time the server's credits book "
                                                                          "opened (a restart shows as a later one)")


def block_key(model_id: str, block: int) -> str:
    return f"{model_id}.{block}"


class PeerRecord(BaseModel):
    """A server as a client sees it: its peer id plus its latest record."""

    model_config = ConfigDict(frozen=True)

    peer_id: str
    record: ServerRecord
