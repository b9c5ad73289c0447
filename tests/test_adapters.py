"""Serving LoRA adapters (`corolla server --adapters`), choosing one per session, and adapters trained through the
swarm saved in PEFT format: plain peft loads them with the same logits, a Corolla server hosts them, the offline
hub carries them. Real server processes on 127.0.0.1."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import OUTPUT_DIR, start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.client.tuning import TuningConfig
from corolla.errors import CorollaError
from corolla.launch import LocalSwarm
from corolla.models.lora import LoraSettings


def make_adapter(base, directory, seed: int, targets: list[str]):
    """A plain-peft LoRA adapter with random (non-zero) weights, saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                          lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def adapters(reference, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"poet": make_adapter(reference, root / "poet", 1, ["q_proj", "v_proj"]),
            "coder": make_adapter(reference, root / "coder", 2, ["k_proj", "o_proj", "up_proj"])}


@pytest.fixture(scope="module")
def swarm(tiny_llama, adapters):
    """Blocks 0:2 twice (one server without adapters), 2:5 once; the others host both adapters."""
    hosted = ["--adapters", str(adapters["poet"]), str(adapters["coder"])]
    with LocalSwarm(OUTPUT_DIR / "test_adapters-swarm") as local:
        start_swarm(local, tiny_llama, [(0, 2)])
        local.start_servers(tiny_llama, [(0, 2), (2, 5)], ["--num-threads", "1", *hosted])
        yield local


@pytest.fixture(scope="module")
def client(swarm, tiny_llama):
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers)
    yield model
    model.close()


def peft_reference(reference, directory):
    return PeftModel.from_pretrained(copy.deepcopy(reference), directory).eval()


def test_hosted_adapters_are_announced_and_routed_to(client, adapters):
    servers = client.swarm.call(client.swarm.servers(refresh=True))
    hosting = {s.peer_id for s in servers if s.record.adapters}
    assert len(servers) == 3 and len(hosting) == 2
    assert all(sorted(s.record.adapters) == ["coder", "poet"] for s in servers if s.peer_id in hosting)
    for _ in range(4):  # both 0:2 servers are candidates without an adapter; with one, only the host
        with client.inference_session(max_length=8, active_adapter="poet") as session:
            session.step(torch.zeros(1, 1, 64))
            assert {hop.peer_id for hop in session.route} <= hosting


def test_hosted_adapter_logits_match_plain_peft(client, reference, adapters):
    ids = torch.randint(3, 320, (2, 9))
    for name in ("poet", "coder"):
        want = peft_reference(reference, adapters[name])(ids).logits
        client.active_adapter = name
        try:
            with torch.no_grad():
                got = client(ids).logits
        finally:
            client.active_adapter = None
        assert (got - want).abs().max() < 1e-4, name
    with torch.no_grad():
        plain = client(ids).logits
    assert (plain - reference(ids).logits).abs().max() < 1e-4


def test_sessions_with_different_adapters_do_not_mix(client, reference, adapters, tiny_llama, swarm):
    ids = torch.randint(3, 320, (1, 6))
    wants = {name: peft_reference(reference, adapters[name]).generate(ids, max_new_tokens=12, do_sample=False)
             for name in ("poet", "coder")}
    wants[None] = reference.generate(ids, max_new_tokens=12, do_sample=False)
    results, errors = {}, []

    def run(name):
        try:
            model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=swarm.initial_peers,
                                                                    active_adapter=name)
            try:
                results[name] = model.generate(ids, max_new_tokens=12, do_sample=False)
            finally:
                model.close()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(name,)) for name in wants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for name, want in wants.items():
        assert results[name].tolist() == want.tolist(), name
    assert len({tuple(w[0].tolist()) for w in wants.values()}) == 3  # the adapters really change the output


def test_unknown_adapter_is_named(client):
    client.swarm.config = ClientConfig(missing_blocks_wait=1.0)
    try:
        with pytest.raises(CorollaError, match="adapter 'painter'"):
            with client.inference_session(max_length=8, active_adapter="painter") as session:
                session.step(torch.zeros(1, 1, 64))
    finally:
        client.swarm.config = ClientConfig()


def test_trained_lora_saved_in_peft_format_loads_in_plain_peft_and_is_hosted(client, reference, tiny_llama,
                                                                            tmp_path, local_swarm):
    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    tuning = client.enable_tuning(TuningConfig("lora", lora=settings), seed=0)
    try:
        optimizer = torch.optim.Adam(tuning.parameters(), lr=1e-2)
        ids = torch.randint(3, 320, (2, 8))
        for _ in range(3):
            optimizer.zero_grad()
            client(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        with torch.no_grad():
            swarm_logits = client(ids).logits
        swarm_tokens = client.generate(ids[:1], max_new_tokens=10, do_sample=False)  # the session carries the LoRA
        tuning.save_pretrained(tmp_path / "trained")
    finally:
        client.tuning = None
    plain = peft_reference(reference, tmp_path / "trained")
    assert (plain(ids).logits - swarm_logits).abs().max() < 1e-4
    assert plain.generate(ids[:1], max_new_tokens=10, do_sample=False).tolist() == swarm_tokens.tolist()
    assert (reference(ids).logits - swarm_logits).abs().max() > 1e-3  # training changed something

    # The offline hub carries it; a Corolla server hosts it (by directory and by repo id); a client loads it back.
    hub = tmp_path / "hub"
    try:
        client.load_tuning(tmp_path / "trained")
        client.tuning.push_to_hub("alice/trained-lora", hub)
    finally:
        client.tuning = None
    start_swarm(local_swarm, tiny_llama, [(0, 5)],
                ["--adapters", str(tmp_path / "trained"), "alice/trained-lora", "--hub-dir", str(hub)])
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers)
    try:
        for name in ("trained", "alice/trained-lora"):
            model.active_adapter = name
            with torch.no_grad():
                assert (model(ids).logits - swarm_logits).abs().max() < 1e-4, name
        model.active_adapter = None
        model.load_tuning("alice/trained-lora", hub_dir=hub)
        with torch.no_grad():
            assert (model(ids).logits - swarm_logits).abs().max() < 1e-4
    finally:
        model.close()
