"""A server's side of credits: it checks and keeps the receipts its clients send, counts the work it serves,
reads other servers' published receipts, computes standing in its own view and gives each session its priority.

Priority of a session = the standing of the identity it speaks for (the client's peer id, or the server named by
its delegation), or 0 (a free rider) when:
- the identity has no standing here;
- the client stopped paying: more than RECEIPT_SLACK_STEPS of its steps here are not covered by its receipts yet
  (clients send one every payer.RECEIPT_EVERY_STEPS steps, so an honest one is never near that);
- the identity already has CREDITED_SESSIONS_PER_IDENTITY credited sessions open here (the rest run as free).
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from pydantic import ValidationError

from corolla.credits.ledger import EARNED, Ledger
from corolla.credits.receipts import Latest, ReceiptError, check_receipt, identity_of
from corolla.credits.standing import DAMPING, HALF_LIFE_S, Edge, compute_standing, decayed
from corolla.net.messages import WorkReceipt
from corolla.net.records import CreditsRecord
from corolla.net.wire import decode, encode

logger = logging.getLogger(__name__)

RECEIPT_SLACK_STEPS = 48  # 3x the client's receipt period (16 steps): room for a lost or late receipt
CREDITED_SESSIONS_PER_IDENTITY = 8  # one contributor cannot take every slot with many sessions
PUBLISHED_RECEIPTS = 32  # (CreditsRecord's bound) the largest receipts this server puts in the DHT (the record stays under ~40 KB)
PUBLISHED_STANDING = 64  # (CreditsRecord's bound) identities with the most standing here, published for `corolla credits`


_STATELESS = "stateless:"  # older ledgers' row of forward and backward work, before clients signed for it
_FORGOTTEN = "forgotten:"  # the ledger row of work served to peers the book forgot (no receipt, no session open)
STANDING_EDGES = 100_000  # the largest receipts standing is computed from (~0.1 s of work; the rest count nothing)
# Peers known only from forward/backward work (no receipt yet, no session open) kept per peer at once: their
# receipt comes with their next request, so the book must remember them until then; ~200 bytes each (~1 MB),
# beyond that the longest idle is forgotten like a closed session's (free peer ids cost the book nothing more).
STATELESS_PEERS = 4096


def read_record(value: object) -> CreditsRecord | None:
    """A credits record read from the DHT, or None when it is not a valid one (its publisher's loss only)."""
    try:
        return CreditsRecord.model_validate(value)
    except ValidationError as e:
        logger.debug("ignoring an invalid credits record: %s", e)
        return None


def credits_key(swarm: str) -> str:
    """DHT key of the servers' credits records (subkey = the publishing server: only it can write there)."""
    return f"{swarm}.credits"


@dataclass
class SessionCredit:
    """What the book knows of one open session."""

    peer: str  # the client's peer id (proven by the secure channel)
    slot: str | None = None  # the identity whose CREDITED_SESSIONS_PER_IDENTITY it counts against, if any


@dataclass
class BookStats:
    accepted: int = 0
    rejected: int = 0
    last_rejection: str = ""


@dataclass
class _Payer:
    latest: Latest | None = None
    unpaid: deque = field(default_factory=lambda: deque(maxlen=RECEIPT_SLACK_STEPS + 1))  # served totals per step
    served: int = 0  # block-tokens served to this peer, ever
    # Known from the ledger at start-up: served counts are saved every few seconds, so after a crash the count may
    # miss work the client accepted and will receipt. Its first receipt of this run may then exceed `served`, once.
    restarted: bool = False


class CreditBook:
    def __init__(self, ledger: Ledger, swarm: str, own_peer_id: str, trusted: frozenset[str] = frozenset(),
                 half_life: float = HALF_LIFE_S, damping: float = DAMPING, clock=time.time):
        self.ledger, self.swarm, self.peer_id, self.clock = ledger, swarm, own_peer_id, clock
        self.roots = frozenset(trusted) | {own_peer_id}
        self.half_life, self.damping = half_life, damping
        self.stats = BookStats()
        self.started = clock()  # unix time this book was opened (a restart shows as a later one)
        self._payers: dict[str, _Payer] = {}
        self._speaks_for: dict[str, tuple[str, float]] = {}  # client peer -> (identity, delegation expiry)
        self._credited: Counter = Counter()  # identity -> credited sessions open
        self._unsaved: Counter = Counter()  # block-tokens served, not yet in the ledger
        self._verified: dict[bytes, WorkReceipt] = {}  # signature -> checked receipt, read from the DHT
        self.standing: dict[str, float] = {}
        self._sessions: Counter = Counter()  # client peer -> its sessions open here
        self._anonymous = 0  # block-tokens served, not kept per peer: forgotten peers' work (and older ledgers')
        self._unpaid_stateless: OrderedDict[str, None] = OrderedDict()  # peers with work but no receipt, idlest first
        for peer, served in ledger.served(swarm).items():
            if peer.startswith((_STATELESS, _FORGOTTEN)):
                self._anonymous += served
            else:
                self._payer(peer).served = served
        for receipt in ledger.receipts(EARNED, swarm):
            self._payer(receipt.payer).latest = Latest(receipt.sequence, receipt.block_tokens)
        for peer, payer in list(self._payers.items()):
            payer.restarted = True
            if payer.latest is None:  # known from forward/backward work only (sessions' rows end at close)
                self._remember_unpaid(peer)
        self.refresh({})

    def _payer(self, peer: str) -> _Payer:
        payer = self._payers.get(peer)
        if payer is None:
            payer = self._payers[peer] = _Payer()
        return payer

    @property
    def served_block_tokens(self) -> int:
        return sum(payer.served for payer in self._payers.values()) + self._anonymous

    # ---- receipts and work (event loop thread) ---------------------------------------------------------------

    def accept(self, receipt: WorkReceipt, sender: str) -> None:
        """Check and keep a receipt sent by `sender`; raises ReceiptError (counted) if it is not valid."""
        try:
            if receipt.payer != sender:
                raise ReceiptError(f"receipt signed by {receipt.payer} sent by another peer {sender}")
            payer = self._payer(sender)
            check_receipt(receipt, self.swarm, self.peer_id, self.clock(), payer.latest)
            if receipt.block_tokens > payer.served and not payer.restarted:
                raise ReceiptError(f"receipt for {receipt.block_tokens} block-tokens; only {payer.served} were "
                                   f"served to {sender}")
        except ReceiptError as e:
            self.stats.rejected += 1
            self.stats.last_rejection = str(e)
            raise
        self.ledger.put(EARNED, receipt)  # first: if the ledger fails, memory still agrees with it
        self.stats.accepted += 1
        payer.latest = Latest(receipt.sequence, receipt.block_tokens)
        self._unpaid_stateless.pop(sender, None)
        if payer.restarted:  # the work lost from our count in a crash: the client's count is the better one
            payer.restarted = False
            lost = receipt.block_tokens - payer.served
            if lost > 0:
                payer.served += lost
                self._unsaved[sender] += lost
        while payer.unpaid and payer.unpaid[0] <= receipt.block_tokens:
            payer.unpaid.popleft()
        if receipt.delegation is not None:
            self._speaks_for[sender] = (identity_of(receipt), receipt.delegation.expires)
        self._flush_served()

    def served(self, peer: str, block_tokens: int, in_session: bool = True) -> None:
        """`block_tokens` of work done for `peer`: an inference step (in_session: its steps must be covered by
        receipts within RECEIPT_SLACK_STEPS to keep priority), or a stateless forward or backward (the client signs
        for it with its next request or session here; it has no steps to fall behind on)."""
        payer = self._payer(peer)
        payer.served += block_tokens
        self._unsaved[peer] += block_tokens
        if in_session:
            payer.unpaid.append(payer.served)
        elif payer.latest is None and peer not in self._sessions:
            self._remember_unpaid(peer)

    def _remember_unpaid(self, peer: str) -> None:
        self._unpaid_stateless[peer] = None
        self._unpaid_stateless.move_to_end(peer)
        while len(self._unpaid_stateless) > STATELESS_PEERS:
            idlest, _ = self._unpaid_stateless.popitem(last=False)
            if idlest not in self._sessions:  # one with a session open is forgotten, if unpaid, when it closes
                self._forget_if_unpaid(idlest)

    def _flush_served(self) -> None:
        if self._unsaved:
            self.ledger.add_served(self.swarm, dict(self._unsaved))
            self._unsaved.clear()

    # ---- sessions and priority -----------------------------------------------------------------------------

    def identity(self, peer: str) -> str:
        """The identity `peer` speaks for: a server that delegated to it (while the delegation holds), or itself."""
        entry = self._speaks_for.get(peer)
        if entry is not None and entry[1] >= self.clock():
            return entry[0]
        return peer

    def open_session(self, peer: str, receipt: WorkReceipt | None) -> SessionCredit:
        if receipt is not None:
            try:
                self.accept(receipt, peer)
            except ReceiptError as e:
                logger.info("session of %s opened without credit: %s", peer, e)
            except Exception:  # the ledger failed: the session opens all the same, credited by standing only
                logger.exception("session of %s: its receipt could not be kept", peer)
        session = SessionCredit(peer)
        self._sessions[peer] += 1
        self._take_slot(session)
        identity = self.identity(peer)
        standing = self.standing.get(identity, 0.0) if session.slot is not None else 0.0
        logger.info("credits: %s opens a session as %s, %s", peer, identity,
                    "a free rider" if not standing else "trusted" if math.isinf(standing) else
                    f"standing {standing:.0f} block-tokens")
        return session

    def _take_slot(self, session: SessionCredit) -> None:
        identity = self.identity(session.peer)
        if self.standing.get(identity, 0.0) > 0 and self._credited[identity] < CREDITED_SESSIONS_PER_IDENTITY:
            session.slot = identity
            self._credited[identity] += 1

    def _release_slot(self, session: SessionCredit) -> None:
        if session.slot is not None:
            self._credited[session.slot] = max(0, self._credited[session.slot] - 1)
            session.slot = None

    def close_session(self, session: SessionCredit) -> None:
        self._release_slot(session)
        self._flush_served()
        self._sessions[session.peer] -= 1
        if self._sessions[session.peer] <= 0:
            del self._sessions[session.peer]
            self._forget_if_unpaid(session.peer)

    def _forget_if_unpaid(self, peer: str) -> None:
        """Peer ids cost nothing: the book keeps no state for a peer with no receipt and no session open here,
        only its work in the total served (its next session starts from nothing)."""
        payer = self._payers.get(peer)
        if payer is None or payer.latest is not None:
            return
        self._unpaid_stateless.pop(peer, None)
        self._flush_served()  # the ledger's row must hold everything before it moves
        self.ledger.forget_served(self.swarm, peer, _FORGOTTEN)
        self._anonymous += payer.served
        del self._payers[peer]

    def priority(self, session: SessionCredit) -> float:
        """The session's place in line under contention: its identity's standing, 0 for a free rider."""
        if session.slot is not None and session.slot != self.identity(session.peer):
            self._release_slot(session)  # a delegation came, or expired: the session now speaks for another
        if session.slot is None:
            self._take_slot(session)  # standing may have come since the session opened
        if session.slot is None or len(self._payer(session.peer).unpaid) > RECEIPT_SLACK_STEPS:
            return 0.0
        return self.standing.get(session.slot, 0.0)

    # ---- the swarm's receipts (DHT) -----------------------------------------------------------------------

    def refresh(self, published: dict[str, object]) -> None:
        """Recompute standing from our own receipts and other servers' published records {publisher: value}.
        Receipts are cumulative: only the latest (highest sequence) of each (payer, payee) counts, however many
        times it or older ones of the same payer were published."""
        now = self.clock()
        latest: dict[tuple[str, str], WorkReceipt] = {}
        found = list(self.ledger.receipts(EARNED, self.swarm))
        for publisher, value in published.items():
            record = read_record(value) if publisher != self.peer_id else None
            for encoded in record.receipts if record is not None else ():
                receipt = self._published_receipt(publisher, encoded, now)
                if receipt is not None:
                    found.append(receipt)
        for receipt in found:
            pair = (receipt.payer, receipt.payee)
            if pair not in latest or receipt.sequence > latest[pair].sequence:
                latest[pair] = receipt
        edges = [Edge(identity_of(r), r.payee, r.block_tokens, r.time) for r in latest.values()]
        if len(edges) > STANDING_EDGES:
            edges = heapq.nlargest(STANDING_EDGES, edges, key=lambda e: decayed(e, now, self.half_life))
        self.standing = compute_standing(self.roots, edges, now, self.half_life, self.damping)

    def _published_receipt(self, publisher: str, encoded: bytes, now: float) -> WorkReceipt | None:
        """The receipt in `encoded` if it is a valid one for work done by `publisher` (checked once, then cached)."""
        try:
            receipt = decode(encoded)
            if not isinstance(receipt, WorkReceipt) or receipt.payee != publisher:
                return None  # a server publishes only receipts for its own work
            if self._verified.get(receipt.signature) == receipt:
                return receipt
            check_receipt(receipt, self.swarm, publisher, now)
        except Exception as e:  # a bad record costs its publisher its credit, nothing else
            logger.debug("ignoring a receipt published by %s: %s", publisher, e)
            return None
        if len(self._verified) > 100_000:  # bounded memory: start over (re-verifying costs ~0.1 ms a receipt)
            self._verified.clear()
        self._verified[receipt.signature] = receipt
        return receipt

    def close(self) -> None:
        self._flush_served()
        self.ledger.close()

    def publication(self) -> dict:
        """This server's credits record: its largest receipts, its standing table and what it served."""
        self._flush_served()
        receipts = sorted(self.ledger.receipts(EARNED, self.swarm), key=lambda r: -r.block_tokens)
        standing = sorted(((who, value) for who, value in self.standing.items() if who != self.peer_id),
                          key=lambda item: -item[1])[:PUBLISHED_STANDING]
        return CreditsRecord(receipts=[encode(r) for r in receipts[:PUBLISHED_RECEIPTS] if r.block_tokens > 0],
                             standing={who: (-1.0 if math.isinf(value) else value) for who, value in standing},
                             served_block_tokens=self.served_block_tokens, started=self.started).model_dump()
