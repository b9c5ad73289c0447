"""Petals' client calls (issue 22), each against plain transformers' outputs on the tiny swarm."""

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.errors import CorollaError

GREEDY = dict(do_sample=False)


def greedy(model, ids, new_tokens, **kwargs):
    # min_new_tokens: the tiny model's random weights may pick EOS, which would end a call early
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **GREEDY, **kwargs)


def prompt(batch=1, length=7, seed=3):
    return torch.randint(3, 320, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_from_pretrained_takes_transformers_names(tiny_swarm, tiny_llama, reference):
    peers = tiny_swarm.initial_peers
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=peers, torch_dtype=torch.float32,
                                                            low_cpu_mem_usage=True, trust_remote_code=False,
                                                            device_map=None)
    try:
        assert model.dtype == torch.float32
        ids = prompt()
        assert greedy(model, ids, 6).tolist() == greedy(reference, ids, 6).tolist()
    finally:
        model.close()
    for kwargs, error, match in [
        (dict(device_map="auto"), CorollaError, "device_map='auto'.*run on the servers"),
        (dict(trust_remote_code=True), CorollaError, "trust_remote_code=True.*never a repository's own code"),
        (dict(load_in_8bit=True), CorollaError, "load_in_8bit.*servers' choice"),
        (dict(revision="main"), CorollaError, "revision"),
        (dict(dtype=torch.float32, torch_dtype=torch.float32), CorollaError, "both dtype and torch_dtype"),
        (dict(torch_dtype="float64"), CorollaError, "dtype must be one of"),
        (dict(no_such_argument=1), TypeError, "unexpected keyword argument 'no_such_argument'"),
    ]:
        with pytest.raises(error, match=match):
            AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=peers, **kwargs)


def test_generate_continues_a_session_from_its_last_token(client, reference):
    """Petals: a later generate() in the session continues from its last generated token; None = no new input."""
    ids = prompt(batch=2)
    want = greedy(reference, ids, 10)
    with torch.no_grad(), client.inference_session(max_length=7 + 10 + 4 + 3, batch_size=2) as session:
        first = greedy(client, ids, 5)
        assert first.tolist() == want[:, :12].tolist()  # the first call returns the prompt too
        second = greedy(client, None, 5)
        assert second.tolist() == want[:, 12:].tolist()  # later ones: only their own tokens
        assert session.output_ids.tolist() == want.tolist()
        assert session.position == 7 + 10 - 1  # the last token is sent by the next call
        # New tokens after the generated ones: returned with what follows them.
        extra = prompt(batch=2, length=4, seed=4)
        third = greedy(client, extra, 3)
        both = greedy(reference, torch.cat([want, extra], dim=1), 3)
        assert third.tolist() == both[:, 17:].tolist()


def test_generate_with_no_arguments_in_a_session(client, reference):
    ids = prompt(seed=5)
    assert client.generation_config.max_length is None  # so transformers' default applies: 20 new tokens
    with torch.no_grad(), client.inference_session(max_length=7 + 3 + 20):
        first = greedy(client, ids, 3)
        rest = client.generate(min_new_tokens=20)  # greedy by default
    assert rest.shape == (1, 20)
    assert torch.cat([first, rest], dim=1).tolist() == greedy(reference, ids, 23).tolist()


def test_generate_takes_a_session_argument(client, reference):
    ids = prompt(seed=6)
    want = greedy(reference, ids, 8)
    with torch.no_grad(), client.inference_session(max_length=15) as session:  # transformers refused session=
        assert greedy(client, ids, 4, session=session).tolist() == want[:, :11].tolist()
        assert greedy(client, None, 4, session=session).tolist() == want[:, 11:].tolist()
    # Without `with`: the session is not the active one, generate() uses it because it is given; closed by hand.
    session = client.inference_session(max_length=15)
    try:
        assert client.active_session is None
        assert greedy(client, ids, 4, session=session).tolist() == want[:, :11].tolist()
        assert greedy(client, None, 4, session=session).tolist() == want[:, 11:].tolist()
        assert session.position == 14
    finally:
        session.close()
    with pytest.raises(CorollaError, match="closed"):
        greedy(client, None, 1, session=session)


def test_generate_after_forward_calls_needs_the_whole_sequence(client, reference):
    ids = prompt(seed=7)
    want = greedy(reference, ids, 4)
    with torch.no_grad(), client.inference_session(max_length=12):
        client(ids[:, :5])  # tokens sent by forward(): generate() cannot know them
        with pytest.raises(CorollaError, match="sent by forward"):
            greedy(client, None, 2)
        with pytest.raises(CorollaError, match="whole sequence"):
            greedy(client, ids[:, 5:], 2)
        assert greedy(client, ids, 4).tolist() == want.tolist()  # Corolla's rule: the whole sequence so far


def test_empty_steps_contact_no_server(client, reference):
    ids = prompt(seed=8)
    with torch.no_grad():
        want = reference(ids).logits
        with client.inference_session(max_length=7) as session:
            empty = session.step(torch.zeros(1, 0, 64))
            assert empty.shape == (1, 0, 64) and session.position == 0
            assert session.route == [] and session._step_ids == 0  # no server was contacted
            assert client(ids[:, :0]).logits.shape == (1, 0, 320)
            head = client(ids[:, :4]).logits
            steps = session._step_ids
            assert session.step(torch.zeros(1, 0, 64)).shape == (1, 0, 64)
            assert session._step_ids == steps and session.position == 4
            tail = client(ids[:, 4:]).logits
    assert (torch.cat([head, tail], dim=1) - want).abs().max() < 1e-4


def test_config_holds_the_active_adapter(client):
    assert client.config.active_adapter is None
    client.active_adapter = "poet"
    try:
        assert client.config.active_adapter == "poet"
        session = client.inference_session(max_length=4)  # not stepped: the tiny swarm hosts no adapter
        assert session.extras.adapter == "poet"
        session.close()
        client.config.active_adapter = "coder"  # Petals' place to set it, too
        assert client.active_adapter == "coder"
    finally:
        client.active_adapter = None
