"""Output checking: re-run a random share of a session's steps on other servers holding the same blocks and
compare. A server whose output the others contradict is not used again and is reported.

The check sends the hop's whole input history through a stateless forward on another server (so the checker
needs no session state), and compares the new tokens' outputs within a tolerance (servers may differ in
hardware and kernels, so bit-exact equality is not expected)."""

from __future__ import annotations

import logging
import random

import torch

from corolla.client.routing import Hop
from corolla.client.swarm import SwarmClient
from corolla.errors import RemoteError

logger = logging.getLogger(__name__)


class OutputMismatch(RemoteError):
    """Other servers computed a different output for the same input: this server's output is not used."""


def close_enough(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    scale = max(1.0, float(a.abs().max()))
    return float((a.float() - b.float()).abs().max()) <= tolerance * scale


class OutputChecker:
    def __init__(self, swarm: SwarmClient, forward, share: float, tolerance: float, strikes_to_ban: int,
                 rng: random.Random | None = None):
        self.swarm, self._forward = swarm, forward  # forward(hop, hidden, position_ids, attention_mask) -> output
        self.share, self.tolerance, self.strikes_to_ban = share, tolerance, strikes_to_ban
        self.rng = rng or random.Random()
        self.strikes: dict[str, int] = {}
        self.checks = 0

    def should_check(self) -> bool:
        return self.share > 0 and self.rng.random() < self.share

    async def check(self, hop: Hop, full_input: torch.Tensor, positions: torch.Tensor,
                    attention_mask: torch.Tensor | None, start: int, output: torch.Tensor) -> None:
        """Raise OutputMismatch if other servers contradict `output` (hop's output for tokens >= start)."""
        servers = await self.swarm.servers()
        route_filter = self.swarm.route_filter(servers, 0)
        checkers = [s.peer_id for s in route_filter.usable(servers) if s.peer_id != hop.peer_id
                    and s.record.start_block <= hop.start and hop.end <= s.record.end_block]
        self.rng.shuffle(checkers)
        if not checkers:
            logger.debug("no other server holds blocks %d:%d; step not checked", hop.start, hop.end)
            return
        self.checks += 1
        verdicts = []
        for checker in checkers[:2]:
            try:
                result = await self._forward(Hop(checker, hop.start, hop.end), full_input, positions, attention_mask)
            except Exception as e:  # a checker that fails says nothing about the checked server
                logger.info("checker %s failed: %r", checker, e)
                continue
            verdicts.append((checker, close_enough(result[:, start:], output, self.tolerance)))
            if verdicts[-1][1]:
                break  # confirmed by another server
        if not verdicts or verdicts[-1][1] and len(verdicts) == 1:
            return
        agreeing = [peer for peer, same in verdicts if same]
        disagreeing = [peer for peer, same in verdicts if not same]
        if agreeing:  # one checker agreed with the server, another did not: that other one is suspect
            for peer in disagreeing:
                self._strike(peer, confirmed=False)
            return
        self._strike(hop.peer_id, confirmed=len(disagreeing) >= 2)
        if len(disagreeing) == 1:
            self._strike(disagreeing[0], confirmed=False)  # one against one: both suspect
        raise OutputMismatch(hop.peer_id, (hop.start, hop.end),
                             f"output differs from what {', '.join(disagreeing)} computed for the same input")

    def _strike(self, peer_id: str, confirmed: bool) -> None:
        self.strikes[peer_id] = self.strikes.get(peer_id, 0) + 1
        if confirmed or self.strikes[peer_id] >= self.strikes_to_ban:
            self.swarm.block(peer_id, reason="its outputs disagree with other servers' outputs")
