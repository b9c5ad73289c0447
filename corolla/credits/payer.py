"""A client's side of credits: it counts the work each server did for it that it accepted (after output checking,
where on) and signs cumulative receipts for it, never for more than it accepted.

Receipts go to each server inside OpenSession and on the session's stream every RECEIPT_EVERY_STEPS steps and
when the session closes. Forward and backward requests (one request per stream, no room for a later message)
carry the receipt for everything before them: a request's own work is signed for with the next request or session
to that server (a backward counts twice: the server recomputes the forward). With a delegation (`corolla credits delegate`), the receipts and the sessions count for
the server that signed it: a person running a server and a client gets the server's standing."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives.asymmetric import rsa

from corolla.credits.ledger import SIGNED, Ledger
from corolla.credits.receipts import sign_receipt
from corolla.errors import CorollaError
from corolla.net.auth import peer_id_of_public_key, public_key_der
from corolla.net.messages import Delegation, WorkReceipt

# A receipt costs the client one RSA-2048 signature (~1-2 ms of CPU) and the server one check (~0.1 ms): every 16
# steps keeps that under 1% of a decode step of ~10 ms or more, and well inside the server's slack (48 steps).
RECEIPT_EVERY_STEPS = 16


def save_delegation(path: str | Path, delegation: Delegation) -> None:
    Path(path).write_bytes(msgpack.packb(delegation.model_dump(mode="python"), use_bin_type=True))


def load_delegation(path: str | Path) -> Delegation:
    try:
        return Delegation.model_validate(msgpack.unpackb(Path(path).read_bytes(), raw=False))
    except Exception as e:
        raise CorollaError(f"cannot read the delegation file {path}: {e} (make one with `corolla credits "
                           f"delegate`)") from None


class Payer:
    """Per server: block-tokens accepted so far, receipts' sequence numbers, steps since the last receipt."""

    def __init__(self, key: rsa.RSAPrivateKey, swarm: str, delegation: Delegation | None = None,
                 ledger: Ledger | None = None):
        self._key, self._der, self.swarm = key, public_key_der(key), swarm
        self.peer_id = peer_id_of_public_key(self._der)
        if delegation is not None and delegation.delegate != self.peer_id:
            raise CorollaError(f"the delegation is for client {delegation.delegate}, but this client is "
                               f"{self.peer_id}: start the client with the identity the delegation names")
        self.delegation, self.ledger = delegation, ledger
        self.totals: Counter = Counter()
        self._sequences: Counter = Counter()
        self._unsent: Counter = Counter()  # steps since the last receipt, per server
        for receipt in ledger.receipts(SIGNED, swarm) if ledger is not None else ():
            if receipt.payer == self.peer_id:
                self.totals[receipt.payee] = receipt.block_tokens
                self._sequences[receipt.payee] = receipt.sequence

    def accepted(self, payee: str, block_tokens: int) -> None:
        """`payee` computed `block_tokens` that this client accepted."""
        self.totals[payee] += block_tokens
        self._unsent[payee] += 1

    def due(self, payee: str) -> bool:
        return self._unsent[payee] >= RECEIPT_EVERY_STEPS

    def owes(self, payee: str) -> bool:
        return self._unsent[payee] > 0

    def receipt_if_owed(self, payee: str) -> WorkReceipt | None:
        """A receipt for a forward or backward request to `payee`, when it did work not yet signed for."""
        return self.receipt(payee) if self.owes(payee) else None

    def receipt(self, payee: str) -> WorkReceipt:
        """A new signed receipt for everything `payee` did so far."""
        # Milliseconds as a floor: a client restarted with the same key and no ledger still moves forward.
        sequence = max(self._sequences[payee] + 1, int(time.time() * 1000))
        self._sequences[payee] = sequence
        receipt = sign_receipt(self._key, self.swarm, payee, self.totals[payee], sequence, self.delegation,
                               payer_der=self._der)
        self._unsent[payee] = 0
        if self.ledger is not None:
            self.ledger.put(SIGNED, receipt)
        return receipt


def make_payer(node, swarm: str, config) -> Payer | None:
    """The client's payer (None when config.credits is off), signing with the client peer's identity key."""
    if not config.credits or node.identity_key is None:
        return None
    delegation = load_delegation(config.delegation_file) if config.delegation_file else None
    ledger = Ledger(config.credits_ledger) if config.credits_ledger else None
    return Payer(node.identity_key, swarm, delegation, ledger)
