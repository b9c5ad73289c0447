"""Standing: how much an identity has done for those this server trusts, in this server's own view (pure).

Each server computes it alone, from receipts it holds or read from the DHT; there is no global balance.
- Roots (this server itself, its operator's client keys, --trusted-peers) are trusted outright.
- Hop 1: work receipted by a root counts in full: standing(X) += decayed(receipt).
- Hop 2: work receipted by a hop-1 identity P counts damped, and P can hand out at most its own standing in all:
  each of P's receipts is scaled by min(1, standing(P) / everything P receipted), then by DAMPING.
- Nothing further: receipts signed by identities with no standing count for nothing. So identities that only sign
  each other (Sybils) gain nothing, and an attacker with standing s can give its Sybils at most DAMPING * s in all,
  without changing its own standing.
- Decay: a cumulative receipt counts 0.5 ** (age / half_life), age = now - the receipt's time (the last time that
  payer acknowledged anything), so a contributor who stopped serving fades.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable

ROOT = math.inf  # a root's standing: above everyone's
DAMPING = 0.5  # hop 2 counts half: trust through one stranger is worth less than trust seen directly
HALF_LIFE_S = 7 * 24 * 3600.0  # a week: yesterday's work still counts, last year's barely does


@dataclass(frozen=True)
class Edge:
    """One checked receipt, by identity: `payer` acknowledged `block_tokens` of work by `payee`, last at `time`."""

    payer: str
    payee: str
    block_tokens: int
    time: float


def decayed(edge: Edge, now: float, half_life: float) -> float:
    age = max(0.0, now - edge.time)
    return edge.block_tokens * 0.5 ** (age / half_life)


def compute_standing(roots: Iterable[str], edges: Iterable[Edge], now: float, half_life: float = HALF_LIFE_S,
                     damping: float = DAMPING) -> dict[str, float]:
    """Every identity with standing > 0 (roots: ROOT). Self-receipts (payer == payee) are ignored. `edges` are
    summed: give one per (signing key, payee), its latest cumulative receipt (CreditBook.refresh does)."""
    roots = set(roots)
    by_payer: dict[str, list[Edge]] = defaultdict(list)
    for edge in edges:
        if edge.payer != edge.payee and edge.block_tokens > 0:
            by_payer[edge.payer].append(edge)
    first: dict[str, float] = defaultdict(float)
    for root in roots:
        for edge in by_payer.get(root, ()):
            if edge.payee not in roots:
                first[edge.payee] += decayed(edge, now, half_life)
    standing = dict(first)
    for payer, own in first.items():
        out = [(edge, decayed(edge, now, half_life)) for edge in by_payer.get(payer, ())
               if edge.payee not in roots]
        total = sum(amount for _, amount in out)
        if total <= 0:
            continue
        scale = damping * min(1.0, own / total)
        for edge, amount in out:
            standing[edge.payee] = standing.get(edge.payee, 0.0) + amount * scale
    standing.update({root: ROOT for root in roots})
    return {who: value for who, value in standing.items() if value > 0}
