"""Every supported family through a real swarm: two server processes split each tiny model at an uneven block
boundary (1 + 3 blocks). Logits equal plain transformers (fp32, CPU) to 1e-4, greedy generation of 20 tokens is
token-identical, and so is a batch of 3 prompts of different lengths (left padding + attention_mask).

One bootstrap peer serves the whole module; each family gets its own two servers, started concurrently. While one
family is tested, the next family's servers are already starting (process start-up dominates the run time)."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import OUTPUT_DIR
from corolla import AutoDistributedModelForCausalLM
from corolla.launch import LocalSwarm
from tiny_models import FAMILY_CONFIGS, VOCAB, make_family

FAMILIES = list(FAMILY_CONFIGS)
SPANS = [(0, 1), (1, 4)]  # uneven: 1 block, then 3
NEW_TOKENS = 20


class FamilyServers:
    """Servers per family in one local swarm: started ahead of use, stopped in the background after use."""

    def __init__(self, swarm: LocalSwarm, models_dir):
        self.swarm, self.models_dir = swarm, models_dir
        self.started: dict[str, list] = {}
        self.stopping: list[threading.Thread] = []

    def path(self, family: str):
        return make_family(family, self.models_dir)

    def start(self, family: str) -> list:
        if family not in self.started:
            self.started[family] = [
                self.swarm.start_server(self.path(family), span, f"{family}-server{i}", ["--num-threads", "1"],
                                        wait=False)
                for i, span in enumerate(SPANS)]
        return self.started[family]

    def ready(self, family: str) -> None:
        for process in self.start(family):
            self.swarm.wait_for_line(process, "ready:", timeout=180)

    def stop(self, family: str) -> None:
        for process in self.started.get(family, []):
            thread = threading.Thread(target=self.swarm.stop, args=(process,), daemon=True)
            thread.start()
            self.stopping.append(thread)

    def join(self) -> None:
        for thread in self.stopping:
            thread.join(timeout=30)


@pytest.fixture(scope="module")
def servers(models_dir):
    with LocalSwarm(OUTPUT_DIR / "family-swarms") as swarm:
        swarm.start_dht()
        pool = FamilyServers(swarm, models_dir)
        try:
            yield pool
        finally:
            pool.join()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, servers):
    """(client, reference) for one family."""
    name = request.param
    servers.ready(name)
    following = FAMILIES.index(name) + 1
    if following < len(FAMILIES):
        servers.start(FAMILIES[following])  # warms up while this family is tested
    path = servers.path(name)
    client = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=servers.swarm.initial_peers)
    try:
        yield client, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    finally:
        client.close()
        servers.stop(name)


def test_logits_match_transformers(family):
    client, reference = family
    ids = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = client(ids).logits, reference(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_greedy_generation_is_token_identical(family):
    client, reference = family
    ids = torch.randint(3, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    got = client.generate(ids, **settings)
    want = reference.generate(ids, **settings)
    assert want.shape[1] == 9 + NEW_TOKENS
    assert got.tolist() == want.tolist()


def test_padded_batch_generation_is_token_identical(family):
    client, reference = family
    generator = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (length,), generator=generator) for length in (3, 8, 12)]
    ids = torch.zeros(3, 12, dtype=torch.long)  # left padding with pad id 0
    mask = torch.zeros(3, 12, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 12 - len(prompt):] = prompt
        mask[row, 12 - len(prompt):] = 1
    settings = dict(attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    got = client.generate(ids, **settings)
    want = reference.generate(ids, **settings)
    assert want.shape == (3, 12 + NEW_TOKENS)
    assert got.tolist() == want.tolist()
