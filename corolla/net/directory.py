"""Reading the swarm's directory of servers from the DHT (shared by servers, clients and monitors)."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from corolla.net.node import Node
from corolla.net.records import PeerRecord, ServerRecord, block_key

logger = logging.getLogger(__name__)


async def read_servers(node: Node, model_id: str, num_blocks: int) -> list[PeerRecord]:
    """Every server's valid record for `model_id`, one per peer; records that fail validation are skipped.

    Node.get returns only records signed by the peer they are stored under (and, in a private swarm, by a member),
    so a record here is the named server's own announcement: nobody else can forge or overwrite it.
    """
    found = await node.get([block_key(model_id, block) for block in range(num_blocks)])
    servers: dict[str, PeerRecord] = {}
    for items in found.values():
        for peer_id, (value, _) in items.items():
            if peer_id in servers:
                continue
            try:
                servers[peer_id] = PeerRecord(peer_id=peer_id, record=ServerRecord.model_validate(value))
                node.remember_addresses(peer_id, servers[peer_id].record.relay_addresses)
            except ValidationError:
                logger.debug("skipping an invalid record from %s", peer_id)
    return list(servers.values())
