"""Credits through real server processes on 127.0.0.1: an operator's client pays server A; the honest server H,
which trusts only that operator's client, reads A's published receipts from the DHT and gives A standing; a client
delegated by A then pays H as A; H publishes what it earned and served, and keeps it over a restart."""

import time

import pytest
import torch

from conftest import OUTPUT_DIR, peer_of
from corolla.client.config import ClientConfig
from corolla.client.remote import InferenceSession, RemoteSequence
from corolla.client.swarm import SwarmClient
from corolla.client.training import RemoteBlocksFunction, RemoteTraining
from corolla.credits.book import credits_key
from corolla.credits.payer import RECEIPT_EVERY_STEPS, save_delegation
from corolla.credits.receipts import delegate, identity_of
from corolla.launch import LocalSwarm
from corolla.models.checkpoint import load_config, model_id
from corolla.net.auth import generate_identity, load_identity, peer_id_of_identity
from corolla.net.directory import read_servers
from corolla.net.node import NetworkConfig
from corolla.net.wire import decode

PROMPT, DECODE = 8, 2 * RECEIPT_EVERY_STEPS + 3  # tokens per client session


@pytest.fixture(scope="module")
def credits_swarm(tiny_llama, tmp_path_factory):
    keys = tmp_path_factory.mktemp("credit-keys")
    for name in ("a", "h", "operator", "contributor"):
        generate_identity(keys / f"{name}.key")
    operator = peer_id_of_identity(keys / "operator.key")
    with LocalSwarm(OUTPUT_DIR / "test_credits_swarm") as swarm:
        swarm.start_dht()
        common = ["--num-threads", "1", "--announce-period", "1"]
        a = swarm.start_server(tiny_llama, (0, 5), "server-a", [*common, "--identity", str(keys / "a.key"),
                                                                "--credits-ledger", str(keys / "a.sqlite")],
                               wait=False)
        h_args = [*common, "--identity", str(keys / "h.key"), "--credits-ledger", str(keys / "h.sqlite"),
                  "--trusted-peers", operator]
        h = swarm.start_server(tiny_llama, (0, 5), "server-h", h_args, wait=False)
        for server in (a, h):
            swarm.wait_for_line(server, "ready:", 180)
        yield swarm, keys, {"a": peer_of(a), "h": peer_of(h), "operator": operator}, h, h_args


def _client(swarm, tiny_llama, only: str, identity=None, delegation=None) -> SwarmClient:
    config = load_config(tiny_llama)
    return SwarmClient(NetworkConfig(initial_peers=tuple(swarm.initial_peers), identity=identity),
                       model_id(config, tiny_llama.name), config.num_hidden_layers,
                       ClientConfig(allowed_servers=(only,), delegation_file=delegation))


def _generate(client: SwarmClient) -> None:
    """A prompt then DECODE one-token steps of random hidden states; closing sends the last receipts."""
    generator = torch.Generator().manual_seed(0)
    session = InferenceSession(client, max_length=PROMPT + DECODE)
    try:
        session.step(torch.randn(1, PROMPT, 64, generator=generator))
        for _ in range(DECODE):
            session.step(torch.randn(1, 1, 64, generator=generator))
    finally:
        session.close()


def _record(client: SwarmClient, server: str, check, timeout: float = 30.0) -> dict:
    """`server`'s credits record once `check(record)` holds (the servers publish every second)."""
    key = credits_key(client.model_id)
    deadline = time.monotonic() + timeout
    while True:
        found = client.call(client.node.get([key]), timeout=30).get(key, {})
        record = found.get(server, (None,))[0]
        if record is not None and check(record):
            return record
        if time.monotonic() > deadline:
            raise AssertionError(f"{server}'s credits record never satisfied the check; last: {record}")
        time.sleep(0.5)


def test_standing_flows_from_a_trusted_client_through_a_delegation(credits_swarm, tiny_llama):
    swarm, keys, peers, h, _ = credits_swarm
    work = (PROMPT + DECODE) * 5  # block-tokens of one session over the 5 blocks

    operator = _client(swarm, tiny_llama, peers["a"], identity=str(keys / "operator.key"))
    try:
        _generate(operator)  # the operator of H uses A: A earns receipts signed by a key H trusts
        assert operator.payer.totals[peers["a"]] == work
        # A publishes every second: an earlier record may still hold the receipt sent mid-session (every 16 steps).
        a_record = _record(operator, peers["a"],
                           lambda r: len(r["receipts"]) == 1 and decode(r["receipts"][0]).block_tokens == work)
        assert decode(a_record["receipts"][0]).block_tokens == work
        # H refreshes from A's published records: wait for the one with A's final receipt.
        h_record = _record(operator, peers["h"], lambda r: r["standing"].get(peers["a"], 0) >= work * (1 - 1e-3))
        assert h_record["standing"][peers["a"]] == pytest.approx(work, rel=1e-3)  # hop 1: in full (decay: a week)
    finally:
        operator.close()

    delegation = keys / "contributor.delegation"
    save_delegation(delegation, delegate(load_identity(keys / "a.key"), peer_id_of_identity(keys / "contributor.key"),
                                         operator.model_id, time.time() + 3600))
    contributor = _client(swarm, tiny_llama, peers["h"], identity=str(keys / "contributor.key"),
                          delegation=str(delegation))
    free_rider = _client(swarm, tiny_llama, peers["h"])
    try:
        _generate(contributor)
        _generate(free_rider)
        log = h.log()  # H placed the contributor's session as A's, and the other as a free rider's
        assert f"credits: {contributor.payer.peer_id} opens a session as {peers['a']}, standing {work} " in log
        assert f"credits: {free_rider.payer.peer_id} opens a session as {free_rider.payer.peer_id}, a free rider" in log
        h_record = _record(contributor, peers["h"], lambda r: len(r["receipts"]) == 2 and all(
            decode(receipt).block_tokens == work for receipt in r["receipts"]))  # both final receipts published
        receipts = {decode(r).payer: decode(r) for r in h_record["receipts"]}
        paid_as_a = receipts[contributor.payer.peer_id]
        assert identity_of(paid_as_a) == peers["a"] and paid_as_a.block_tokens == work
        assert receipts[free_rider.payer.peer_id].block_tokens == work
        assert h_record["served_block_tokens"] == 2 * work
        servers = {s.peer_id: s.record for s in contributor.call(
            read_servers(contributor.node, contributor.model_id, 5), timeout=30)}
        assert servers[peers["h"]].served_block_tokens == 2 * work  # what `corolla health` and the map show
    finally:
        contributor.close()
        free_rider.close()


def test_forward_and_backward_work_is_receipted_with_the_next_request(credits_swarm, tiny_llama):
    """Training earns credit: a forward and a backward through A's 5 blocks, then one more request; it carries the
    receipt for both (backward counts twice), which A accepts against what it served this client and publishes."""
    swarm, _, peers, _, _ = credits_swarm
    client = _client(swarm, tiny_llama, peers["a"])
    try:
        batch, tokens = 2, 6
        hidden = torch.randn(batch, tokens, 64, requires_grad=True)
        positions = torch.arange(tokens).expand(batch, tokens)
        training = RemoteTraining(RemoteSequence(client))
        RemoteBlocksFunction.apply(training, positions, None, None, None, None, (), hidden, None).sum().backward()
        assert hidden.grad is not None
        expected = batch * tokens * 5 + batch * tokens * 5 * 2  # forward + backward (twice), block-tokens
        assert client.payer.totals[peers["a"]] == expected
        RemoteSequence(client).forward(torch.randn(1, 1, 64))  # its request carries the receipt for both
        assert client.payer.totals[peers["a"]] == expected + 5  # this one is signed for with the next request
        me = client.payer.peer_id
        record = _record(client, peers["a"], lambda r: any(decode(x).payer == me for x in r["receipts"]))
        paid = [decode(x) for x in record["receipts"] if decode(x).payer == me]
        assert [r.block_tokens for r in paid] == [expected]
    finally:
        client.close()


def test_a_servers_ledger_survives_its_restart(credits_swarm, tiny_llama):
    swarm, keys, peers, h, h_args = credits_swarm
    client = _client(swarm, tiny_llama, peers["h"])
    try:
        before = _record(client, peers["h"], lambda r: r["served_block_tokens"] > 0)
        swarm.stop(h)
        restarted = swarm.start_server(tiny_llama, (0, 5), "server-h-again", h_args)
        assert peer_of(restarted) == peers["h"]
        # The restarted H publishes the same receipts and served work from its ledger, and A's standing again
        # (recomputed from A's record in the DHT).
        after = _record(client, peers["h"], lambda r: peers["a"] in r["standing"] and r["started"] > before["started"])
        assert after["receipts"] == before["receipts"]
        assert after["served_block_tokens"] == before["served_block_tokens"]
    finally:
        client.close()
