"""One model, one swarm: a directory, a Hub repo id and the cache's snapshot folder of the same files give the
same model id in the server, the client, the API (and so the demo) and `corolla credits` (models/hub_source.py's
swarm_identity). No network: HF_HUB_OFFLINE=1, the "Hub" is a cache folder of this test, the client's swarm a stub."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tiny_models import make_tiny_llama
from corolla.api import served
from corolla.api.config import ApiConfig
from corolla.client import model as client_model
from corolla.credits.commands import _model_id as credits_model_id
from corolla.hub import push
from corolla.models.hub_source import open_model
from corolla.net.node import NetworkConfig
from corolla.server.config import ServerConfig
from corolla.server.server import Server

REPO = "org/tiny"


class _StubSwarm:
    """Stands in for the client's SwarmClient: records the model id it was made for, joins nothing."""

    def __init__(self, network, model_id: str, num_blocks: int, config):
        self.model_id, self.num_blocks, self.config = model_id, num_blocks, config

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The same files as a directory `tiny`, as the repo `org/tiny` of a Hugging Face cache, and as that cache's
    snapshot folder (named after a commit)."""
    root = tmp_path_factory.mktemp("identity")
    directory = make_tiny_llama(root / "tiny", num_layers=2)
    snapshot = push(directory, REPO, hub_dir=root / "cache")
    assert snapshot.name != "tiny"  # the folder's own name would give another id
    return {"directory": str(directory), "repo": REPO, "snapshot": str(snapshot), "cache": str(root / "cache")}


@pytest.fixture
def offline_hub(sources, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", sources["cache"])
    monkeypatch.setattr(client_model, "SwarmClient", _StubSwarm)
    monkeypatch.setattr(served, "load_tokenizer", lambda model_dir: None)


@pytest.mark.parametrize("given", ["directory", "repo", "snapshot"])
@pytest.mark.parametrize("model_name", [None, "chosen"])
def test_every_command_names_the_servers_swarm(offline_hub, sources, given, model_name):
    model = sources[given]
    server = Server(ServerConfig(model=model, model_name=model_name), NetworkConfig())
    assert server.model_id.startswith(f"{model_name or 'tiny'}-")
    # The same id whichever way the files were given.
    assert server.model_id == Server(ServerConfig(model=sources["directory"], model_name=model_name),
                                     NetworkConfig()).model_id

    credits = credits_model_id(argparse.Namespace(model=model, model_id=None, model_name=model_name))
    assert credits == server.model_id  # a delegation names the swarm whose receipts it signs

    network = NetworkConfig(initial_peers=("/ip4/127.0.0.1/tcp/9/p2p/QmUnused",))  # never dialled: a stub swarm
    client, _, name = served.load_model(ApiConfig(model=model, model_name=model_name), network)
    assert client.swarm.model_id == server.model_id
    assert client.swarm_name == name == server.model_id.rsplit("-", 1)[0]  # the API (and demo) serve this name
