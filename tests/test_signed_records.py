"""Signed DHT records: a record counts only if it is signed by the key of the peer id it is stored under, so nobody
can forge or overwrite another server's announcement. Pure validator checks, then an attack on a live swarm."""

import asyncio
import time

import msgpack
import pytest
from cryptography.hazmat.primitives import hashes
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.p2p import P2P

from conftest import start_swarm
from corolla.models.checkpoint import load_config, model_id
from corolla.net.auth import (_PSS, RECORD_FORMAT, Membership, RecordSigner, SwarmKey, _signed_part, generate_identity,
                              load_identity, open_envelope, peer_id_of_identity, peer_id_of_public_key,
                              public_key_der)
from corolla.net.directory import read_servers
from corolla.net.node import NetworkConfig, Node
from corolla.net.records import ServerRecord, ServerState, block_key


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Three identities: (private key, peer id)."""
    folder = tmp_path_factory.mktemp("keys")
    result = []
    for name in "abc":
        generate_identity(folder / name)
        key = load_identity(folder / name)
        result.append((key, peer_id_of_public_key(public_key_der(key))))
    assert peer_id_of_identity(folder / "a") == result[0][1]
    return result


def record(subkey: str, value, key: str = "model.0", expiration: float | None = None) -> DHTRecord:
    return DHTRecord(DHTID.generate(source=key).to_bytes(), msgpack.packb(subkey), msgpack.packb(value),
                     expiration or time.time() + 30)


def forge(rec: DHTRecord, signing_key, claimed_public_key: bytes | None = None) -> DHTRecord:
    """An envelope signed by `signing_key` whatever the subkey says (what an attacker's code does)."""
    signature = signing_key.sign(_signed_part(rec, rec.value), _PSS, hashes.SHA256())
    envelope = [RECORD_FORMAT, rec.value, claimed_public_key or public_key_der(signing_key), signature, b""]
    return DHTRecord(rec.key, rec.subkey, msgpack.packb(envelope, use_bin_type=True), rec.expiration_time)


def test_own_records_are_signed_and_any_change_breaks_the_signature(keys):
    (key_a, peer_a), _, _ = keys
    signer = RecordSigner(key_a, Membership(peer_a))
    plain = record(peer_a, {"state": "online"})
    signed = DHTRecord(plain.key, plain.subkey, signer.sign_value(plain), plain.expiration_time)
    assert signer.validate(signed) and signer.strip_value(signed) == plain.value
    assert "not signed" in signer.why_invalid(plain)
    later = DHTRecord(signed.key, signed.subkey, signed.value, signed.expiration_time + 100)
    assert "does not match" in signer.why_invalid(later)  # nobody can keep a record alive for its owner
    moved = DHTRecord(record(peer_a, 0, key="model.1").key, signed.subkey, signed.value, signed.expiration_time)
    assert "does not match" in signer.why_invalid(moved)  # nor replay it under another block
    value, public_key, signature, token = open_envelope(signed.value)
    tampered = msgpack.packb([RECORD_FORMAT, msgpack.packb({"state": "offline"}), public_key, signature, token])
    assert "does not match" in signer.why_invalid(DHTRecord(signed.key, signed.subkey, tampered, signed.expiration_time))


def test_a_record_claiming_another_peer_is_rejected(keys):
    (key_a, peer_a), (key_b, peer_b), _ = keys
    verifier = RecordSigner(key_a, Membership(peer_a))
    claim_b = record(peer_b, {"state": "offline"})
    # B's own signer does not sign a record for someone else ...
    assert RecordSigner(key_a, Membership(peer_a)).sign_value(claim_b) == claim_b.value
    # ... and a record for B signed by A, with A's key or with B's public key, is refused.
    assert "signed by another peer" in verifier.why_invalid(forge(claim_b, key_a))
    assert "does not match" in verifier.why_invalid(forge(claim_b, key_a, claimed_public_key=public_key_der(key_b)))
    assert verifier.why_invalid(forge(claim_b, key_b)) is None  # B's own key: fine
    assert "not a peer id" in verifier.why_invalid(DHTRecord(claim_b.key, msgpack.packb(None), claim_b.value, 1e10))


def test_private_swarm_records_need_membership(keys):
    (key_a, peer_a), (key_b, peer_b), (key_c, peer_c) = keys
    allow_list = RecordSigner(key_a, Membership(peer_a, allowed=frozenset({peer_b})))
    assert allow_list.validate(forge(record(peer_b, 1), key_b))
    assert "allow-list" in allow_list.why_invalid(forge(record(peer_c, 1), key_c))

    swarm_key, other_key = SwarmKey(b"k" * 32), SwarmKey(b"x" * 32)
    member = RecordSigner(key_b, Membership(peer_b, swarm_key=swarm_key))
    outsider = RecordSigner(key_c, Membership(peer_c, swarm_key=other_key))
    checker = RecordSigner(key_a, Membership(peer_a, swarm_key=swarm_key))
    for signer, peer, ok in [(member, peer_b, True), (outsider, peer_c, False)]:
        plain = record(peer, 1)
        signed = DHTRecord(plain.key, plain.subkey, signer.sign_value(plain), plain.expiration_time)
        assert checker.validate(signed) == ok
    assert "swarm's key" in checker.why_invalid(forge(record(peer_c, 1), key_c))  # no token at all


class ForgingValidator(RecordValidatorBase):
    """An attacker's DHT node: signs whatever it stores with its own key (optionally naming someone else's public
    key), and stores and serves anything."""

    def __init__(self, key, claimed_public_key: bytes | None = None):
        self.key, self.claimed_public_key = key, claimed_public_key

    def sign_value(self, rec: DHTRecord) -> bytes:
        return forge(rec, self.key, self.claimed_public_key).value

    def validate(self, rec: DHTRecord) -> bool:
        return True

    def strip_value(self, rec: DHTRecord) -> bytes:
        envelope = open_envelope(rec.value)
        return envelope[0] if envelope else rec.value


def test_a_forged_record_for_another_server_is_rejected_and_the_real_one_stands(local_swarm, tiny_llama, tmp_path):
    (server,) = start_swarm(local_swarm, tiny_llama, [(0, 5)], extra_args=["--announce-period", "1"])
    victim = server.log().split("ready: ")[1].split(" as ")[1].split()[0]
    config = load_config(tiny_llama)
    model = model_id(config, "tiny-llama")
    peers = local_swarm.initial_peers

    async def raw_dht(validator=None, identity=None):
        """A hivemind DHT peer outside Corolla's rules: a reader (client mode) or, with a validator, a forger."""
        p2p = await P2P.create(initial_peers=peers, identity_path=identity, check_if_identity_free=False)
        dht = await DHTNode.create(p2p=p2p, initial_peers=peers, record_validator=validator,
                                   client_mode=validator is None)
        return p2p, dht

    async def corolla_view() -> dict:
        node = await Node.create(NetworkConfig(initial_peers=tuple(peers)), client_mode=True)
        try:
            return {s.peer_id: s.record for s in await read_servers(node, model, config.num_hidden_layers)}
        finally:
            await node.shutdown()

    async def raw_view(p2p_dht) -> dict:
        """What a reader that does not check signatures would believe: {subkey: ServerRecord} for block 0."""
        found = await p2p_dht[1].get(block_key(model, 0), latest=True)
        result = {}
        for subkey, item in (found.value if found else {}).items():
            envelope = item.value
            inner = envelope[1] if isinstance(envelope, list) else msgpack.packb(envelope)
            result[subkey] = ServerRecord.model_validate(msgpack.unpackb(inner))
        return result

    async def attack():
        generate_identity(tmp_path / "forger.key")
        forger_key = load_identity(tmp_path / "forger.key")
        forger_id = peer_id_of_public_key(public_key_der(forger_key))
        fake_peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"  # no such peer
        honest = (await corolla_view())[victim]
        assert honest.state == ServerState.ONLINE
        reader = await raw_dht()
        try:
            # The victim's public key is public: it travels in each of its records.
            raw = await reader[1].get(block_key(model, 0), latest=True)
            real_key = raw.value[victim].value[2]
            assert peer_id_of_public_key(real_key) == victim
            forged = ServerRecord(state=ServerState.OFFLINE, start_block=0, end_block=5, throughput=0.0,
                                  public_name="forged").model_dump(mode="json")
            fake = ServerRecord(state=ServerState.ONLINE, start_block=0, end_block=5, throughput=1e9,
                                public_name="forged").model_dump(mode="json")
            own = ServerRecord(state=ServerState.ONLINE, start_block=0, end_block=5, throughput=1.0,
                               public_name="forger").model_dump(mode="json")
            for claimed_public_key in (None, real_key):  # signed with the forger's key, naming its own or the victim's
                forger = await raw_dht(ForgingValidator(forger_key, claimed_public_key), str(tmp_path / "forger.key"))
                try:
                    expiration = time.time() + 600  # later than the real record's: it would win if it counted
                    keys = [block_key(model, b) for b in range(5)]
                    await forger[1].store_many(keys, [forged] * 5, expiration, subkeys=[victim] * 5)
                    await forger[1].store_many(keys, [fake] * 5, expiration, subkeys=[fake_peer] * 5)
                    if claimed_public_key is None:  # the forger's own, properly signed record counts
                        await forger[1].store_many(keys, [own] * 5, expiration, subkeys=[forger_id] * 5)
                    # The forged record is out there: a reader that does not check signatures believes it ...
                    unchecked = await raw_view(reader)
                    assert unchecked[victim].public_name == "forged" and fake_peer in unchecked
                    # ... Corolla's directory does not: the real record stands, the fake server does not exist.
                    view = await corolla_view()
                    assert view[victim].state == ServerState.ONLINE and view[victim].public_name == ""
                    assert fake_peer not in view
                    assert view[forger_id].public_name == "forger"
                finally:
                    await forger[1].shutdown()
                    await forger[0].shutdown()
        finally:
            await reader[1].shutdown()
            await reader[0].shutdown()
        # Honest peers refused to store the forgeries: with the forger gone, even a fresh unchecking reader sees
        # only the real record.
        reader = await raw_dht()
        try:
            unchecked = await raw_view(reader)
            assert unchecked[victim].public_name == "" and fake_peer not in unchecked
        finally:
            await reader[1].shutdown()
            await reader[0].shutdown()

    asyncio.run(attack())
    assert server.alive()
