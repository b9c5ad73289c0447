"""Research access (issue 22): the remote blocks as a sliceable module, every layer's hidden states, and edits
between blocks, each against plain transformers (with forward hooks doing the same thing) on three families.

One local swarm serves the module: per family, two server processes split the tiny 4-block model at 0:2 | 2:4, so
slices run over one server, across the boundary, or inside one server's span. Llama has a second server of 2:4, and
both of its 2:4 servers fail their steps while a file exists (a slice's failover). GPT-2's servers run prompts in
chunks of 4 tokens, so edits and recorded hidden states are also checked across chunk boundaries."""

import contextlib
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import OUTPUT_DIR, peer_of
from corolla import AutoDistributedModelForCausalLM
from corolla.client import remote
from corolla.client.edits import Replace, Steer
from corolla.errors import BadRequestError, CorollaError, EditError
from corolla.launch import LocalSwarm
from corolla.models.spec import family_for
from corolla.net.messages import ForwardRequest, HiddenEdit
from corolla.net.wire import FRAME_SLACK_BYTES, WireTensor
from corolla.server.handlers import parse_edits
from tiny_models import VOCAB, make_family

FAMILIES = ["llama", "bloom", "gpt2"]  # rotary; ALiBi with an embedding norm; learned positions
SPANS = [(0, 2), (2, 4)]
BLOCKS = 4
CLOSE = 1e-4


class Swarm:
    def __init__(self, local: LocalSwarm):
        self.local, self.initial_peers = local, local.initial_peers
        self.fail_files: dict[str, str] = {}  # peer id -> the file that makes its steps fail while it exists


@pytest.fixture(scope="module")
def swarm(models_dir):
    workdir = OUTPUT_DIR / "research-api-swarm"
    with LocalSwarm(workdir) as local:
        local.start_dht()
        plan = [(family, span, f"{family}-server{i}") for family in FAMILIES for i, span in enumerate(SPANS)]
        plan.append(("llama", (2, 4), "llama-spare"))
        started, failing = [], {}
        for family, span, name in plan:
            args = ["--num-threads", "1"] + (["--prefill-chunk-tokens", "4"] if family == "gpt2" else [])
            if family == "llama" and span == (2, 4):
                failing[name] = str(workdir / f"{name}.fail")
                args += ["--debug-fail-file", failing[name]]
            started.append((name, local.start_server(make_family(family, models_dir), span, name, args, wait=False)))
        for _, server in started:
            local.wait_for_line(server, "ready:", 240)
        result = Swarm(local)
        result.fail_files = {peer_of(server): failing[name] for name, server in started if name in failing}
        yield result


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, swarm, models_dir):
    """(client, reference) for one family."""
    path = make_family(request.param, models_dir)
    client = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers)
    try:
        yield client, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    finally:
        client.close()


def ids_for(batch=2, length=9, seed=5):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def layer(reference, index):
    return reference.get_submodule(family_for(reference.config).block_path(index))


@contextlib.contextmanager
def hooks(reference, edit_output=None, block0_input=None):
    """Forward hooks on transformers' own layers: `edit_output[i](hidden) -> hidden` after layer i; records every
    layer's output (after its edit) in the yielded list. `block0_input`: replaces what enters layer 0 (a leaf to
    take gradients with respect to)."""
    outputs, handles = [], []
    edit_output = edit_output or {}

    def after(index):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if index in edit_output:
                hidden = edit_output[index](hidden)
            outputs.append(hidden)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    def replace_input(module, args, kwargs):
        if args:
            return (block0_input, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": block0_input}

    try:
        for index in range(BLOCKS):
            handles.append(layer(reference, index).register_forward_hook(after(index)))
        if block0_input is not None:
            handles.append(layer(reference, 0).register_forward_pre_hook(replace_input, with_kwargs=True))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def reference_states(reference, ids, **hook_args):
    """transformers' hidden_states tuple and each layer's raw output (before the final norm), with hooks."""
    with torch.no_grad(), hooks(reference, **hook_args) as outputs:
        result = reference(ids, output_hidden_states=True)
    return result, outputs


def close(a, b):
    return a.shape == b.shape and float((a - b).abs().max()) < CLOSE


def test_petals_module_names(family):
    client, reference = family
    transformer = client.transformer
    spec = family_for(client.config)
    assert transformer.word_embeddings is client.get_input_embeddings()
    assert client.lm_head is client.get_output_embeddings()
    assert torch.equal(client.lm_head.weight, reference.get_output_embeddings().weight)
    assert torch.equal(transformer.ln_f.weight, reference.get_submodule(spec.final_norm_path).weight)
    norm = transformer.word_embeddings_layernorm
    if spec.embedding_norm_path:  # BLOOM
        assert torch.equal(norm.weight, reference.get_submodule(spec.embedding_norm_path).weight)
    else:
        assert isinstance(norm, torch.nn.Identity)
    h = transformer.h
    assert len(h) == BLOCKS and h is client.blocks
    assert (h[1:3].start, h[1:3].end, len(h[1:3])) == (1, 3, 2)
    assert (h[-1].start, h[2][0].start, len(h[1:][1:])) == (3, 2, 2)
    assert [block.start for block in h] == [0, 1, 2, 3]
    # Not registered twice: the model's parameters and state are its client parts', once.
    assert len(list(client.parameters())) == len({id(p) for p in client.client_parts.parameters()})
    with pytest.raises(CorollaError, match="step 1 only"):
        h[::2]
    with pytest.raises(CorollaError, match="holds no block"):
        h[3:1]
    with pytest.raises(IndexError):
        h[BLOCKS]


def test_slices_chained_equal_the_full_chain_and_transformers(family):
    client, reference = family
    ids = ids_for()
    want, outputs = reference_states(reference, ids)
    h = client.transformer.h
    with torch.no_grad():
        x = client.embed(ids)
        assert close(x, want.hidden_states[0])
        full = h(x)
        for cuts in ([0, 4], [0, 1, 4], [0, 2, 3, 4], [0, 1, 2, 3, 4]):
            hidden = x
            for begin, end in zip(cuts, cuts[1:]):
                hidden = h[begin:end](hidden) if end - begin > 1 else h[begin](hidden)
                assert close(hidden, outputs[end - 1]), (cuts, begin, end)
            assert close(hidden, full)
        assert close(full, outputs[-1])
        assert close(client.transformer.ln_f(full), want.hidden_states[-1])
        assert close(client.lm_head(client.transformer.ln_f(full)), want.logits)
        assert h[1:3](x[:, :0]).shape == (2, 0, x.shape[-1])  # empty input: no server contacted


def test_gradients_through_slices_equal_local_ones(family):
    client, reference = family
    ids = ids_for(seed=6)
    with torch.no_grad():
        x = client.embed(ids)
    weight = torch.randn(2, 9, x.shape[-1], generator=torch.Generator().manual_seed(1))
    # transformers: the same input entering layer 0, a loss on layer 2's output
    leaf = x.clone().requires_grad_(True)
    with hooks(reference, block0_input=leaf) as outputs:
        reference(ids)
    want = torch.autograd.grad((outputs[2] * weight).sum(), leaf)[0]
    h = client.transformer.h
    for cuts in ([0, 3], [0, 1, 3], [0, 2, 3]):
        ours = x.clone().requires_grad_(True)
        hidden = ours
        for begin, end in zip(cuts, cuts[1:]):
            hidden = h[begin:end](hidden)
        (hidden * weight).sum().backward()
        assert close(ours.grad, want), cuts
    assert float(want.abs().max()) > 1e-3  # a gradient that could differ
    # With edits: the servers' recomputed forwards apply them too.
    values = torch.randn(2, 1, x.shape[-1], generator=torch.Generator().manual_seed(3))
    vector = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(4))

    def replaced(hidden):
        hidden = hidden.clone()
        hidden[:, [4]] = values
        return hidden

    leaf = x.clone().requires_grad_(True)
    with hooks(reference, edit_output={0: replaced, 1: lambda hidden: hidden * 1 + vector},
               block0_input=leaf) as outputs:
        reference(ids)
    plain, want = want, torch.autograd.grad((outputs[2] * weight).sum(), leaf)[0]
    ours = x.clone().requires_grad_(True)
    hidden = h[:2](ours, edits=[Replace(layer=0, positions=[4], values=values), Steer(layer=1, vector=vector)])
    (h[2](hidden) * weight).sum().backward()
    assert close(ours.grad, want) and not close(plain, want)


def test_output_hidden_states_equal_transformers(family):
    client, reference = family
    ids = ids_for(seed=7)
    want, _ = reference_states(reference, ids)
    with torch.no_grad():
        got = client(ids, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == BLOCKS + 1
    for index, (ours, theirs) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert close(ours, theirs), index
    assert close(got.logits, want.logits)
    with torch.no_grad():
        assert client(ids).hidden_states is None


def test_hidden_states_are_asked_for_as_many_blocks_as_a_reply_holds(family, monkeypatch):
    """A client whose replies hold one block's outputs asks each server for one block at a time (instead of a reply
    too large to read): the states are still transformers'."""
    client, reference = family
    ids = ids_for(seed=8)
    want, _ = reference_states(reference, ids)
    per_block = ids.numel() * client.config.hidden_size * 4  # float32 activations
    monkeypatch.setattr(remote, "MAX_REPLY_BYTES", FRAME_SLACK_BYTES + per_block)
    asked, call = [], remote.RemoteSequence._call

    async def spy(self, hop, *args, **kwargs):
        asked.append(hop.end - hop.start)
        return await call(self, hop, *args, **kwargs)

    monkeypatch.setattr(remote.RemoteSequence, "_call", spy)
    with torch.no_grad():
        got = client(ids, output_hidden_states=True)
    assert asked == [1] * BLOCKS  # the servers hold 2 blocks each
    for index, (ours, theirs) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert close(ours, theirs), index


def test_steering_and_replacement_equal_transformers_hooks(family):
    client, reference = family
    ids = ids_for(seed=8)
    width = client.config.hidden_size
    generator = torch.Generator().manual_seed(2)
    vector, everywhere = torch.randn(width, generator=generator), torch.randn(width, generator=generator)
    values = torch.randn(2, 2, width, generator=generator)
    edits = [Replace(layer=1, positions=[1, 6], values=values), Steer(layer=1, vector=vector, positions=[2, 6]),
             Steer(layer=2, vector=everywhere)]

    def layer1(hidden):
        hidden = hidden.clone()
        hidden[:, [1, 6]] = values
        hidden[:, [2, 6]] += vector
        return hidden

    want, outputs = reference_states(reference, ids, edit_output={1: layer1, 2: lambda hidden: hidden + everywhere})
    plain, _ = reference_states(reference, ids)
    assert not close(want.logits, plain.logits)  # the edits change the result
    with torch.no_grad():
        got = client(ids, edits=edits, output_hidden_states=True)
    assert close(got.logits, want.logits)
    # Hidden states after the edits (what the next block sees). transformers' own tuple shows them so or not
    # depending on whether its capturing hooks were installed before or after the user's: compare with ours.
    assert close(got.hidden_states[0], want.hidden_states[0])
    for ours, theirs in zip(got.hidden_states[1:-1], outputs[:-1]):
        assert close(ours, theirs)
    assert close(got.hidden_states[-1], want.hidden_states[-1])
    # The same edits on a slice: only those of its blocks may be given.
    with torch.no_grad():
        x = client.embed(ids)
        hidden = client.transformer.h[:2](x, edits=edits[:2])
        hidden = client.transformer.h[2:](hidden, edits=edits[2:])
    assert close(client.head(hidden), want.logits)


def test_a_slice_session_equals_stepping_the_same_layers_locally(family):
    client, reference = family
    ids = ids_for(seed=9)
    _, outputs = reference_states(reference, ids)
    x, want = outputs[0], outputs[2]  # what enters block 1, what leaves block 2
    with torch.no_grad(), client.transformer.h[1:3].inference_session(max_length=12, batch_size=2) as session:
        first = session.step(x[:, :5])
        assert session.step(x[:, 5:5]).shape == (2, 0, x.shape[-1])  # empty step
        rest = [session.step(x[:, i:i + 1]) for i in range(5, 9)]
        assert session.position == 9 and [hop.start for hop in session.route][0] == 1
        assert session.route[-1].end == 3
    assert close(torch.cat([first, *rest], dim=1), want)


def test_edit_errors_are_named(family):
    client, _ = family
    if client.config.model_type != "llama":
        pytest.skip("checked once")
    ids = ids_for(length=5)
    width = client.config.hidden_size
    cases = [
        (Steer(layer=BLOCKS, vector=torch.zeros(width)), "layer 4 is not among the blocks run, 0..3"),
        (Steer(layer=0, vector=torch.zeros(width + 1)), "shape \\[64\\]"),
        (Steer(layer=0, vector=torch.zeros(width), positions=[5]), "positions must be distinct token indices"),
        (Replace(layer=0, positions=[1, 1], values=torch.zeros(2, 2, width)), "distinct"),
        (Replace(layer=0, positions=[1], values=torch.zeros(1, 1, width)), "shape \\[2, 1, 64\\]"),
        (Steer(layer=0, vector=torch.full((width,), float("nan"))), "NaN"),
    ]
    with torch.no_grad():
        for edit, match in cases:
            with pytest.raises(EditError, match=match):
                client(ids, edits=[edit])
        with pytest.raises(EditError, match="not among the blocks run, 2..3"):
            client.transformer.h[2:](client.embed(ids), edits=[Steer(layer=1, vector=torch.zeros(width))])
        with client.inference_session(max_length=8):
            with pytest.raises(CorollaError, match="outside an inference session"):
                client(ids, output_hidden_states=True)
        with pytest.raises(CorollaError, match="attention weights stay on the servers"):
            client(ids, output_attentions=True)


def test_servers_check_edits():
    """What a server answers to edits a client did not check (the handler's parser, no swarm needed)."""
    def request(*edits):
        return ForwardRequest(model_id="m", start_block=2, end_block=4, hidden=WireTensor.from_torch(torch.zeros(1, 3, 8)),
                              edits=list(edits))

    def edit(kind="steer", block=2, positions=None, values=torch.zeros(8)):
        return HiddenEdit(kind=kind, block=block, positions=positions, values=WireTensor.from_torch(values))

    parsed = parse_edits(request(edit(positions=[0, 2]), edit("replace", 3, [1], torch.ones(1, 1, 8))), 1, 3, 8)
    assert [e.block for e in parsed] == [2, 3] and parsed[1].values.shape == (1, 1, 8)
    for bad, match in [
        (edit(block=1), "edits\\[0\\]: block 1 is not among the request's blocks 2..3"),
        (edit(positions=[3]), "positions must be distinct token indices in \\[0, 3\\)"),
        (edit(positions=[1, 1]), "distinct"),
        (edit("replace"), "a replace edit needs positions"),
        (edit("replace", positions=[0], values=torch.zeros(1, 2, 8)), "shape \\[1, 1, 8\\]"),
        (edit(values=torch.zeros(8, dtype=torch.int64)), "float tensor"),
        (edit(values=torch.full((8,), float("inf"))), "NaN or Inf"),
    ]:
        with pytest.raises(BadRequestError, match=match):
            parse_edits(request(bad), 1, 3, 8)


def test_a_slice_session_fails_over_to_another_server(family, swarm):
    """The server of a slice's session fails mid-session: the slice re-routes over its own blocks, replays, and the
    outputs stay those of the same layers run locally."""
    client, reference = family
    if client.config.model_type != "llama":
        pytest.skip("one family has the spare server")
    ids = ids_for(seed=10)
    _, outputs = reference_states(reference, ids)
    x, want = outputs[1], outputs[3]  # what enters block 2, what leaves block 3
    with torch.no_grad(), client.transformer.h[2:4].inference_session(max_length=12, batch_size=2) as session:
        first = session.step(x[:, :5])
        victim = session.route[0].peer_id
        open(swarm.fail_files[victim], "w").close()
        try:
            rest = [session.step(x[:, i:i + 1]) for i in range(5, 9)]
        finally:
            os.remove(swarm.fail_files[victim])
        assert session.failed_servers == [victim]
        assert [(hop.start, hop.end) for hop in session.route] == [(2, 4)] and session.route[0].peer_id != victim
    assert close(torch.cat([first, *rest], dim=1), want)
