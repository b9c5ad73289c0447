"""Private swarms with real processes: a swarm key and an allow-list of peer ids. Insiders generate as usual;
outsiders can neither join the DHT (so neither read the directory nor announce), nor serve, nor open a session on
a server even when they dial its address directly."""

import asyncio
import secrets

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.errors import CorollaError
from corolla.net.auth import generate_identity, peer_id_of_identity
from corolla.net.messages import INFERENCE_PROTOCOL, ErrorReply, OpenSession
from corolla.net.node import NetworkConfig, Node


def start_private_dht(swarm, args: list[str], timeout: float = 60) -> list[str]:
    return swarm.start_dht(timeout=timeout, extra_args=args)


@pytest.fixture
def identities(tmp_path):
    """name -> (identity file, peer id) for the server, the insider client and two outsiders."""
    result = {}
    for name in ("server", "client", "keyless", "unlisted", "intruder"):
        path = tmp_path / f"{name}.key"
        generate_identity(path)
        result[name] = (str(path), peer_id_of_identity(path))
    return result


def test_outsiders_can_neither_query_nor_serve(local_swarm, tiny_llama, identities, tmp_path):
    key_file = tmp_path / "swarm.key"
    key_file.write_text(secrets.token_hex(32))
    wrong_key_file = tmp_path / "wrong.key"
    wrong_key_file.write_text(secrets.token_hex(32))
    server_key, server_id = identities["server"]
    client_key, client_id = identities["client"]
    keyless_key, keyless_id = identities["keyless"]  # on every allow-list, but without the swarm key
    unlisted_key, unlisted_id = identities["unlisted"]  # holds the swarm key, but on no allow-list
    private = ["--swarm-key-file", str(key_file)]
    peers = start_private_dht(local_swarm, private + ["--allowed-peers", server_id, client_id, keyless_id])
    server = local_swarm.start_server(tiny_llama, (0, 5), "server", private + [
        "--identity", server_key, "--allowed-peers", client_id, keyless_id, "--num-threads", "1"], timeout=180)
    # An outsider cannot serve: a server with the key but not on the allow-list cannot even join.
    intruder = local_swarm.start_server(tiny_llama, (0, 5), "intruder", private + [
        "--identity", identities["intruder"][0], "--num-threads", "1"], wait=False)

    insider = NetworkConfig(initial_peers=tuple(peers), identity=client_key, swarm_key_file=str(key_file),
                            allowed_peers=(server_id, keyless_id))
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, peers, network=insider)
    try:
        ids = torch.randint(3, 320, (1, 7))
        reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
        want = reference.generate(ids, max_new_tokens=8, do_sample=False)
        assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == want.tolist()
        server_addrs = [addr for info in model.swarm.call(model.swarm.node._p2p.list_peers(), timeout=10)
                        if info.peer_id.to_base58() == server_id for addr in info.addrs]
    finally:
        model.close()
    assert server_addrs

    outsiders = {
        "no key, no list": NetworkConfig(initial_peers=tuple(peers)),
        "listed, no key": NetworkConfig(initial_peers=tuple(peers), identity=keyless_key),
        "listed, wrong key": NetworkConfig(initial_peers=tuple(peers), identity=keyless_key,
                                           swarm_key_file=str(wrong_key_file)),
        "key, not listed": NetworkConfig(initial_peers=tuple(peers), identity=unlisted_key,
                                         swarm_key_file=str(key_file)),
    }

    async def outsiders_cannot_join() -> None:
        for name, config in outsiders.items():
            with pytest.raises(CorollaError, match="could not join the swarm"):
                node = await Node.create(config, client_mode=True)
                await node.shutdown()  # only reached if it joined: the test fails
                pytest.fail(f"outsider ({name}) joined the private swarm")

    async def direct_dial(config: NetworkConfig) -> ErrorReply | None:
        """An outsider that knows the server's address opens an inference stream to it anyway."""
        node = await Node.create(config)  # alone: no initial peers
        try:
            await node._p2p._client.connect(PeerID.from_base58(server_id), [Multiaddr(str(a)) for a in server_addrs])
            stream = await node.connect(server_id, INFERENCE_PROTOCOL, timeout=10)
            try:  # the server may refuse and close before our first frame is out; its answer is still readable
                await stream.send(OpenSession(model_id="tiny-llama", start_block=0, end_block=5, max_length=16))
            except ConnectionError:
                pass
            try:
                return await stream.recv(timeout=15)
            except (EOFError, ConnectionError):
                return None
            finally:
                stream.close()
        finally:
            await node.shutdown()

    asyncio.run(outsiders_cannot_join())
    for config, why in [(NetworkConfig(identity=keyless_key), "did not prove it holds this private swarm's key"),
                        (NetworkConfig(identity=keyless_key, swarm_key_file=str(wrong_key_file)), "did not prove"),
                        (NetworkConfig(identity=unlisted_key, swarm_key_file=str(key_file)), "allow-list")]:
        reply = asyncio.run(direct_dial(config))
        assert isinstance(reply, ErrorReply) and reply.kind == "forbidden" and why in reply.message, reply

    log = server.log()
    assert log.count("refused a corolla/inference/1 stream") == 3
    assert f"opened by {client_id}" in log
    assert f"opened by {keyless_id}" not in log and f"opened by {unlisted_id}" not in log
    local_swarm.wait_for_line(intruder, "error: could not join the swarm", timeout=120)
    intruder.popen.wait(30)
    assert intruder.popen.returncode == 2
    assert server.alive()
