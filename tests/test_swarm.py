"""End to end through real server processes on 127.0.0.1: exactness against plain transformers, concurrency,
errors a person can act on."""

import subprocess
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.errors import CorollaError, MissingBlocksError


def test_forward_logits_match(client, reference):
    ids = torch.randint(3, 320, (2, 11))
    with torch.no_grad():
        got, want = client(ids).logits, reference(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_greedy_generation_is_token_identical(client, reference):
    ids = torch.randint(3, 320, (1, 9))
    got = client.generate(ids, max_new_tokens=20, do_sample=False)
    want = reference.generate(ids, max_new_tokens=20, do_sample=False)
    assert got.tolist() == want.tolist()


def test_servers_announce_the_weight_layout(tiny_swarm):
    logs = [p.log() for p in tiny_swarm.processes if p.name.startswith("server")]
    assert ["weight layout column" in log for log in logs] == [True, False, True]
    assert "weight layout rowdot" in logs[1]


def test_greedy_generation_with_the_two_thread_lm_head(client, reference, monkeypatch):
    import corolla.client.model as client_model

    monkeypatch.setattr(client_model, "_SPLIT_MIN_BYTES", 0)  # the tiny head is far below the real threshold
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    ids = torch.randint(3, 320, (1, 9))
    got = client.generate(ids, max_new_tokens=20, do_sample=False)
    want = reference.generate(ids, max_new_tokens=20, do_sample=False)
    assert got.tolist() == want.tolist()
    assert client._head_pool is not None  # it did run on two threads


def test_sampling_settings_match_with_the_same_seed(client, reference):
    ids = torch.randint(3, 320, (1, 5))
    settings = dict(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=40, top_p=0.9,
                    repetition_penalty=1.3)
    torch.manual_seed(123)
    got = client.generate(ids, **settings)
    torch.manual_seed(123)
    want = reference.generate(ids, **settings)
    assert got.tolist() == want.tolist()


def test_inference_session_steps_token_by_token(client, reference):
    ids = torch.randint(3, 320, (1, 12))
    with torch.no_grad():
        want = reference(ids).logits
        with client.inference_session(max_length=12) as session:
            prefix = client(ids[:, :6]).logits
            steps = [client(ids[:, i:i + 1]).logits for i in range(6, 12)]
            assert session.position == 12
            assert [(hop.start, hop.end) for hop in session.route] == [(0, 2), (2, 4), (4, 5)]
    got = torch.cat([prefix, *steps], dim=1)
    assert (got - want).abs().max() < 1e-4


def test_session_rolls_back_to_an_earlier_position(client, reference):
    ids = torch.randint(3, 320, (1, 8))
    other = torch.randint(3, 320, (1, 3))
    with torch.no_grad():
        want = reference(torch.cat([ids[:, :5], other], dim=1)).logits[:, -3:]
        with client.inference_session(max_length=16) as session:
            client(ids)
            hidden = client.embed(other)
            out = session.step(hidden, start=5)  # drop the last 3 tokens, continue from position 5
            got = client.head(out)
            assert session.position == 8
    assert (got - want).abs().max() < 1e-4


def test_speculative_decoding_with_a_local_draft_model(client, reference, tiny_llama, models_dir):
    """transformers' assisted generation with a small local model drafting (same tokenizer) verifies the drafts
    through the swarm and rolls the servers back: greedy output stays the plain one whatever the drafts."""
    from tiny_models import make_tiny_llama

    twin = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()  # drafts that are all right
    other = AutoModelForCausalLM.from_pretrained(make_tiny_llama(models_dir / "tiny-draft", num_layers=2,
                                                                 seed=1)).eval()  # drafts mostly wrong
    ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(5))
    want = reference.generate(ids, max_new_tokens=20, do_sample=False)
    steps = {}
    for name, draft in (("twin", twin), ("other", other)):
        # 4 tokens a draft, even where the random weights' drafts are unsure (read from the draft model's config)
        draft.generation_config.update(num_assistant_tokens=4, num_assistant_tokens_schedule="constant",
                                       assistant_confidence_threshold=0.0)
        with client.inference_session(max_length=12 + 20 + 5) as session:
            got = client.generate(ids, max_new_tokens=20, do_sample=False, assistant_model=draft)
            steps[name] = session._step_ids
        assert got.tolist() == want.tolist(), name
    assert steps["twin"] == 4  # each step: 4 drafted tokens accepted + its own (the first one with the prompt)
    assert steps["other"] > steps["twin"]


def test_two_clients_generate_concurrently(tiny_swarm, tiny_llama, client, reference):
    prompts = [torch.randint(3, 320, (1, 6)), torch.randint(3, 320, (1, 10))]
    alone = [client.generate(p, max_new_tokens=24, do_sample=False).tolist() for p in prompts]
    second = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=tiny_swarm.initial_peers)
    results, errors = [None, None], []

    def run(index, model):
        try:
            results[index] = model.generate(prompts[index], max_new_tokens=24, do_sample=False).tolist()
        except Exception as e:  # surfaced below
            errors.append(e)

    try:
        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate([client, second])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        second.close()
    assert not errors
    assert results == alone
    assert alone[0] == reference.generate(prompts[0], max_new_tokens=24, do_sample=False).tolist()


def test_missing_blocks_error_names_the_range(local_swarm, models_dir):
    from tiny_models import make_tiny_llama

    path = make_tiny_llama(models_dir / "tiny-gap", num_layers=5, seed=1)
    start_swarm(local_swarm, path, [(0, 3)])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers, client_config=ClientConfig(missing_blocks_wait=2.0))
    try:
        began = time.monotonic()
        with pytest.raises(MissingBlocksError, match=r"blocks 3\.\.4 \(waited 2\.0 s\)"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
        assert time.monotonic() - began < 15
    finally:
        model.close()


def test_server_death_is_survived_with_a_replica_and_named_without(local_swarm, models_dir):
    from tiny_models import make_tiny_llama

    path = make_tiny_llama(models_dir / "tiny-fail", num_layers=5, seed=2)
    servers = start_swarm(local_swarm, path, [(0, 3), (3, 5), (3, 5)])
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 320, (1, 6))
    want = reference.generate(ids, max_new_tokens=12, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers,
        client_config=ClientConfig(missing_blocks_wait=2.0, step_timeout=10.0))
    by_peer = {}
    for process in servers[1:]:
        by_peer[process.log().split(" as ")[-1].split()[0]] = process
    try:
        with model.inference_session(max_length=32) as session:
            tokens = ids
            for step in range(12):
                if step == 5:  # kill the server this session uses for blocks 3..4, mid-generation
                    local_swarm.kill(by_peer[session.route[-1].peer_id])
                with torch.no_grad():
                    logits = model(tokens if step == 0 else tokens[:, -1:]).logits
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert tokens.tolist() == want.tolist()

        survivor = next(p for p in by_peer.values() if p.alive())
        local_swarm.kill(survivor)
        began = time.monotonic()
        with pytest.raises(CorollaError, match=r"server \w+ \(blocks 3\.\.4\) failed .* blocks 3\.\.4"):
            model.generate(ids, max_new_tokens=4, do_sample=False)
        assert time.monotonic() - began < 30
    finally:
        model.close()


def test_cli_rejects_a_path_that_is_not_a_model(tmp_path):
    result = subprocess.run([sys.executable, "-m", "corolla.cli", "server", str(tmp_path), "--blocks", "0:1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "is not a model directory" in result.stderr
