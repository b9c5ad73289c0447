"""Signing and checking work receipts and delegations (pure: no network, no storage).

A receipt is cumulative: {swarm, payer, payee, block_tokens so far, sequence, time}, signed by the payer's peer
key. A server keeps the latest one per payer and accepts a new one only if it is signed by the key whose hash is
the payer, is for this swarm and this server, has a higher sequence and a total that did not go down, is not from
the future, and (with a delegation) the delegation is signed by its issuer, names this payer and swarm and has
not expired.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from corolla.errors import BadRequestError
from corolla.net.auth import _load_public_key, peer_id_of_public_key, public_key_der
from corolla.net.messages import Delegation, WorkReceipt

_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
MAX_CLOCK_SKEW = 120.0  # seconds a receipt's time may be ahead of ours (the DHT needs rough clock sync anyway)


class ReceiptError(BadRequestError):
    """A receipt or delegation is invalid: bad signature, wrong swarm or payee, replayed, regressed or expired."""


def _delegation_part(swarm: str, issuer_key: bytes, delegate: str, expires: float) -> bytes:
    return msgpack.packb(["corolla delegation v1", swarm, issuer_key, delegate, expires], use_bin_type=True)


def _receipt_part(r: WorkReceipt) -> bytes:
    delegation = r.delegation.signature if r.delegation is not None else b""
    return msgpack.packb(["corolla receipt v1", r.swarm, r.payer, r.payer_key, r.payee, r.block_tokens, r.sequence,
                          r.time, delegation], use_bin_type=True)


def _verify(public_der: bytes, signature: bytes, data: bytes, what: str) -> None:
    try:
        _load_public_key(public_der).verify(signature, data, _PSS, hashes.SHA256())
    except InvalidSignature:
        raise ReceiptError(f"{what}: the signature does not match") from None
    except Exception:
        raise ReceiptError(f"{what}: the public key is not a valid RSA key") from None


def delegate(server_key: rsa.RSAPrivateKey, delegate_peer_id: str, swarm: str, expires: float) -> Delegation:
    """Let the client `delegate_peer_id` speak for the server `server_key` in `swarm` until `expires`."""
    issuer = public_key_der(server_key)
    signature = server_key.sign(_delegation_part(swarm, issuer, delegate_peer_id, expires), _PSS, hashes.SHA256())
    return Delegation(issuer_key=issuer, delegate=delegate_peer_id, swarm=swarm, expires=expires, signature=signature)


def sign_receipt(payer_key: rsa.RSAPrivateKey, swarm: str, payee: str, block_tokens: int, sequence: int,
                 delegation: Delegation | None = None, at: float | None = None,
                 payer_der: bytes | None = None) -> WorkReceipt:
    der = payer_der or public_key_der(payer_key)
    unsigned = WorkReceipt(swarm=swarm, payer=peer_id_of_public_key(der), payer_key=der, payee=payee,
                           block_tokens=block_tokens, sequence=sequence, time=time.time() if at is None else at,
                           delegation=delegation, signature=b"")
    signature = payer_key.sign(_receipt_part(unsigned), _PSS, hashes.SHA256())
    return unsigned.model_copy(update={"signature": signature})


def identity_of(receipt: WorkReceipt) -> str:
    """Whose work receipt this is: the server the payer speaks for, or the payer itself (checked receipts only)."""
    return peer_id_of_public_key(receipt.delegation.issuer_key) if receipt.delegation is not None else receipt.payer


@dataclass(frozen=True)
class Latest:
    """What a server keeps of the last receipt accepted from one payer."""

    sequence: int
    block_tokens: int


def check_delegation(delegation: Delegation, payer: str, swarm: str, now: float) -> None:
    if delegation.swarm != swarm:
        raise ReceiptError(f"delegation: for swarm {delegation.swarm!r}, not {swarm!r}")
    if delegation.delegate != payer:
        raise ReceiptError(f"delegation: names {delegation.delegate}, not the payer {payer}")
    if delegation.expires < now:
        raise ReceiptError(f"delegation: expired {now - delegation.expires:.0f} s ago")
    _verify(delegation.issuer_key, delegation.signature,
            _delegation_part(delegation.swarm, delegation.issuer_key, delegation.delegate, delegation.expires),
            "delegation")


def check_receipt(receipt: WorkReceipt, swarm: str, payee: str | None, now: float,
                  previous: Latest | None = None) -> None:
    """Raise ReceiptError unless `receipt` is valid for `swarm` and `payee` (None: any payee, e.g. a receipt read
    from the DHT whose publisher is checked by the caller) and newer than `previous`."""
    if receipt.swarm != swarm:
        raise ReceiptError(f"receipt for swarm {receipt.swarm!r}, not {swarm!r}")
    if payee is not None and receipt.payee != payee:
        raise ReceiptError(f"receipt for {receipt.payee}, not this server {payee}")
    if receipt.time > now + MAX_CLOCK_SKEW:
        raise ReceiptError(f"receipt signed {receipt.time - now:.0f} s in the future")
    if previous is not None:
        if receipt.sequence <= previous.sequence:
            raise ReceiptError(f"replayed receipt: sequence {receipt.sequence} <= {previous.sequence} already seen")
        if receipt.block_tokens < previous.block_tokens:
            raise ReceiptError(f"regressed receipt: {receipt.block_tokens} block-tokens < {previous.block_tokens} "
                               f"already acknowledged")
    try:
        payer = peer_id_of_public_key(receipt.payer_key)
    except Exception:
        raise ReceiptError("receipt: payer_key is not a public key") from None
    if payer != receipt.payer:
        raise ReceiptError(f"receipt: payer {receipt.payer} is not the owner of payer_key ({payer})")
    if receipt.delegation is not None:
        check_delegation(receipt.delegation, receipt.payer, swarm, now)
    _verify(receipt.payer_key, receipt.signature, _receipt_part(receipt), "receipt")
