"""Who may do what in a swarm: peer identities, signed DHT records and private swarms.

Identity. A peer's identity is an RSA key in libp2p's format (the `--identity` file, or a fresh key per run). Its
peer id is the libp2p hash of the public key, and libp2p's secure channel proves that the other end of a stream
holds the key of the peer id it claims.

Signed records. Every DHT record is stored under subkey = the writer's peer id, and its value travels in an
envelope [version, value, public key, signature, membership token]. The signature (RSA-PSS, SHA-256) covers the
DHT key, the subkey, the value and the expiration time. A record is valid only if the public key hashes to the
subkey's peer id and the signature verifies, so nobody can write, overwrite, replay under another key or extend a
record of a peer whose key they do not hold. Every peer runs the same validator (`RecordSigner`): DHT nodes refuse
to store invalid records, and a reader drops any answer that holds one.

Private swarms, either or both:
  - an allow-list of peer ids (plus the peer itself and its initial peers): streams and DHT requests from other
    peers are refused, and their records are invalid;
  - a swarm key (a shared secret file): a member proves membership with HMAC(key, its peer id) -- on the first
    frame of every stream it opens, and inside every record it signs; DHT requests and responses carry an HMAC
    with a fresh nonce and time (`SwarmKeyAuthorizer`), so peers without the key can neither read nor write
    the DHT. (The libp2p daemon hivemind ships has no pre-shared-key option, so this is done above libp2p.)
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import msgpack
import multihash
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time
from pydantic import Field

from corolla.errors import CorollaError
from corolla.net.wire import Message, message_type

logger = logging.getLogger(__name__)

RECORD_FORMAT = 1  # first element of every signed record envelope
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)
MIN_SWARM_KEY_BYTES = 16


# ---- identities ------------------------------------------------------------------------------------------------

def generate_identity(path: str | os.PathLike) -> None:
    """Write a new RSA identity in libp2p's format (what `--identity` reads; hivemind's own generator)."""
    P2P.generate_identity(str(path))


def load_identity(path: str | os.PathLike) -> rsa.RSAPrivateKey:
    try:
        protobuf = crypto_pb2.PrivateKey.FromString(Path(path).read_bytes())
    except Exception as e:
        raise CorollaError(f"cannot read the identity file {path}: {e}") from None
    if protobuf.key_type != crypto_pb2.KeyType.RSA:
        raise CorollaError(f"identity {path} holds a {crypto_pb2.KeyType.Name(protobuf.key_type)} key; Corolla signs "
                           f"its records with the identity key and needs an RSA one (delete the file to make one)")
    key = serialization.load_der_private_key(protobuf.data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CorollaError(f"identity {path} is not an RSA private key")
    return key


def public_key_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@functools.lru_cache(maxsize=4096)
def peer_id_of_public_key(der: bytes) -> str:
    """The libp2p peer id of an RSA public key (DER SubjectPublicKeyInfo): sha2-256 multihash of its protobuf."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256"))
    return PeerID(digest).to_base58()


def peer_id_of_identity(path: str | os.PathLike) -> str:
    """The peer id a process started with `--identity path` will have (e.g. to put it in an allow-list)."""
    return peer_id_of_public_key(public_key_der(load_identity(path)))


@functools.lru_cache(maxsize=4096)
def _load_public_key(der: bytes) -> rsa.RSAPublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("not an RSA public key")
    return key


def peer_id_of_multiaddr(address: str) -> str | None:
    """The peer id in a multiaddr's /p2p/ part, if any."""
    if "/p2p/" not in address:
        return None
    return address.rsplit("/p2p/", 1)[1].split("/")[0] or None


# ---- private swarms --------------------------------------------------------------------------------------------

class SwarmKey:
    """A private swarm's shared secret. Only derived keys are used, each for one purpose."""

    def __init__(self, secret: bytes):
        if len(secret) < MIN_SWARM_KEY_BYTES:
            raise CorollaError(f"a swarm key must hold at least {MIN_SWARM_KEY_BYTES} bytes of secret, got "
                               f"{len(secret)} (make one with: openssl rand -hex 32 > swarm.key)")
        self._member = hmac.new(secret, b"corolla swarm member v1", hashlib.sha256).digest()
        self._dht = hmac.new(secret, b"corolla swarm dht v1", hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SwarmKey":
        try:
            secret = Path(path).read_bytes().strip()
        except OSError as e:
            raise CorollaError(f"cannot read the swarm key file {path}: {e}") from None
        return cls(secret)

    def member_token(self, peer_id: str) -> bytes:
        """Proof that `peer_id` is a member. Useless to anyone else: libp2p proves who holds which peer id."""
        return hmac.new(self._member, peer_id.encode(), hashlib.sha256).digest()

    def is_member(self, peer_id: str, token: bytes) -> bool:
        return isinstance(token, bytes) and hmac.compare_digest(token, self.member_token(peer_id))

    def dht_mac(self, data: bytes) -> bytes:
        return hmac.new(self._dht, data, hashlib.sha256).digest()


@dataclass(frozen=True)
class Membership:
    """Who belongs to this peer's swarm. Without an allow-list and a swarm key, everyone does."""

    local_peer_id: str
    allowed: frozenset[str] | None = None  # peer ids; None = no allow-list
    swarm_key: SwarmKey | None = None

    @property
    def private(self) -> bool:
        return self.allowed is not None or self.swarm_key is not None

    def allows(self, peer_id: str) -> bool:
        """The allow-list part (a swarm key is checked where a proof is at hand)."""
        return self.allowed is None or peer_id == self.local_peer_id or peer_id in self.allowed


@message_type("swarm_auth")
class SwarmAuth(Message):
    """First frame of every stream opened in a swarm with a key: the opener's membership proof."""

    token: bytes = Field(max_length=64, description="HMAC-SHA256(derived swarm key, opener's peer id)")


# ---- signed DHT records ----------------------------------------------------------------------------------------

def _signed_part(record: DHTRecord, value: bytes) -> bytes:
    return msgpack.packb(["corolla record v1", record.key, record.subkey, value, record.expiration_time],
                         use_bin_type=True)


def open_envelope(value: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(value, public key, signature, membership token) of a signed record, or None if it is not one."""
    try:
        envelope = msgpack.unpackb(value, raw=False)
    except Exception:
        return None
    if (not isinstance(envelope, list) or len(envelope) != 5 or envelope[0] != RECORD_FORMAT
            or not all(isinstance(part, bytes) for part in envelope[1:])):
        return None
    return envelope[1], envelope[2], envelope[3], envelope[4]


class RecordSigner(RecordValidatorBase):
    """Signs this peer's records with its identity key and accepts only records signed by their subkey's peer."""

    def __init__(self, private_key: rsa.RSAPrivateKey, membership: Membership):
        self._private_key, self.membership = private_key, membership
        self._public_der = public_key_der(private_key)
        self.peer_id = peer_id_of_public_key(self._public_der)
        self._own_subkey = msgpack.packb(self.peer_id, use_bin_type=True)
        token = membership.swarm_key.member_token(self.peer_id) if membership.swarm_key else b""
        self._own_token = token

    def sign_value(self, record: DHTRecord) -> bytes:
        if record.subkey != self._own_subkey:
            return record.value  # not ours to sign: every validator will refuse it
        signature = self._private_key.sign(_signed_part(record, record.value), _PSS, hashes.SHA256())
        return msgpack.packb([RECORD_FORMAT, record.value, self._public_der, signature, self._own_token],
                             use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        reason = self.why_invalid(record)
        if reason is not None:
            logger.debug("refusing a DHT record: %s", reason)
        return reason is None

    def why_invalid(self, record: DHTRecord) -> str | None:
        """None if the record is valid, else what is wrong with it."""
        try:
            peer_id = msgpack.unpackb(record.subkey, raw=False)
        except Exception:
            return "the subkey is not msgpack"
        if not isinstance(peer_id, str):
            return "the subkey is not a peer id (unsigned or foreign record)"
        envelope = open_envelope(record.value)
        if envelope is None:
            return f"the record for {peer_id} is not signed"
        value, public_der, signature, token = envelope
        try:
            public_key = _load_public_key(public_der)
            signer = peer_id_of_public_key(public_der)
        except Exception:
            return f"the record for {peer_id} carries an invalid public key"
        if signer != peer_id:
            return f"a record for {peer_id} is signed by another peer ({signer})"
        if not self.membership.allows(peer_id):
            return f"{peer_id} is not in this swarm's allow-list"
        if self.membership.swarm_key is not None and not self.membership.swarm_key.is_member(peer_id, token):
            return f"{peer_id} did not prove it holds this swarm's key"
        try:
            public_key.verify(signature, _signed_part(record, value), _PSS, hashes.SHA256())
        except InvalidSignature:
            return f"the signature of the record for {peer_id} does not match its content"
        return None

    def strip_value(self, record: DHTRecord) -> bytes:
        envelope = open_envelope(record.value)
        return envelope[0] if envelope is not None else record.value

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


# ---- DHT requests in a swarm with a key ------------------------------------------------------------------------

class SwarmKeyAuthorizer(AuthorizerBase):
    """hivemind's DHT request authorization, keyed by the swarm key: each request carries a time, a nonce and an
    HMAC of its bytes; each response, the request's nonce and an HMAC of its own bytes. Peers without the key get
    no answer, and their answers are not believed."""

    MAX_CLOCK_SKEW = 120.0  # seconds; DHT peers must have roughly synchronized clocks anyway

    def __init__(self, swarm_key: SwarmKey):
        self._key = swarm_key
        self._recent_nonces: TimedStorage = TimedStorage()

    def _mac(self, tag: bytes, message) -> bytes:
        return self._key.dht_mac(tag + message.SerializeToString())

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key) -> None:
        auth = request.auth
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(16)
        auth.signature = b""
        auth.signature = self._mac(b"request", request)

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        if not hmac.compare_digest(signature, self._mac(b"request", request)):
            logger.debug("refusing a DHT request without this swarm's key")
            return False
        now = get_dht_time()
        with self._recent_nonces.freeze():
            if abs(auth.time - now) > self.MAX_CLOCK_SKEW or auth.nonce in self._recent_nonces:
                logger.debug("refusing a replayed or stale DHT request")
                return False
        self._recent_nonces.store(auth.nonce, None, now + 3 * self.MAX_CLOCK_SKEW)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self._mac(b"response", response)

    async def validate_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        return auth.nonce == request.auth.nonce and hmac.compare_digest(signature, self._mac(b"response", response))
