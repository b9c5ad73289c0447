"""`corolla health`: read the swarm map through a peer of its own, print it (or its JSON), optionally live."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from typing import TextIO

from corolla.api.state import SwarmState, collect_state
from corolla.api.terminal import render_state
from corolla.net.node import NetworkConfig, Node


@dataclass(frozen=True)
class HealthTarget:
    model: str  # the name shown
    model_id: str  # DHT id: name plus config hash
    num_blocks: int


async def read_state(network: NetworkConfig, target: HealthTarget, rtt_timeout: float) -> SwarmState:
    node = await asyncio.wait_for(Node.create(network, client_mode=True), 60)
    try:
        return await collect_state(node, target.model, target.model_id, target.num_blocks, rtt_timeout)
    finally:
        await asyncio.wait_for(node.shutdown(), 10)


async def watch(network: NetworkConfig, target: HealthTarget, rtt_timeout: float, every: float,
                out: TextIO = sys.stdout) -> None:
    """Redraw the map every `every` seconds until Ctrl-C (one peer for the whole watch)."""
    node = await asyncio.wait_for(Node.create(network, client_mode=True), 60)
    try:
        while True:
            state = await collect_state(node, target.model, target.model_id, target.num_blocks, rtt_timeout)
            stamp = time.strftime("%H:%M:%S", time.localtime(state.updated_at))
            out.write("\x1b[H\x1b[2J" + render_state(state) + f"\n\n  {stamp}; every {every:g} s; Ctrl-C to stop\n")
            out.flush()
            await asyncio.sleep(every)
    finally:
        await asyncio.wait_for(node.shutdown(), 10)
