"""Servers on a CUDA device (skipped without one): LoRA gradients and generation through GPU servers equal plain peft.

Run on a GPU machine: `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import peft_twin, randomize_lora, start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.models.lora import LoraSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_lora_training_and_generation_through_gpu_servers(local_swarm, tiny_llama, reference):
    torch.backends.cuda.matmul.allow_tf32 = False  # the servers run float32 without TF32 (PyTorch's default)
    start_swarm(local_swarm, tiny_llama, [(0, 2), (2, 5)], ["--device", "cuda:0", "--dtype", "float32"])
    settings = LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers,
                                                            tuning_mode="lora", lora=settings, seed=0)
    try:
        randomize_lora(model.tuning)
        ids = torch.randint(3, 320, (3, 10), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        twin, params = peft_twin(reference, model.tuning, settings)
        want = twin(input_ids=ids, labels=ids).loss
        want.backward()
        assert abs(loss.item() - want.item()) < 1e-4
        for index, (weight, theirs) in enumerate(zip(model.tuning.lora_weights, params)):
            assert (weight.grad - theirs.grad).abs().max() < 1e-4, index
        tokens = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
        assert tokens.tolist() == twin.generate(ids[:1], max_new_tokens=8, do_sample=False).tolist()
    finally:
        model.close()


def test_decode_graphs_equal_ordinary_steps_on_gpu(tiny_llama):
    from test_graphs import SCRIPT_GRAPHS, compare, second_session

    torch.backends.cuda.matmul.allow_tf32 = False
    graphed, cache, first_run = compare(tiny_llama, "cuda:0", capture=True, tolerance=1e-4)
    assert graphed.graphs.captures == SCRIPT_GRAPHS  # each step length, at the first capacity and then past it
    del cache
    second_session(graphed, first_run, tolerance=1e-4)  # replays the first session's graphs over its cache
    assert graphed.graphs.captures == SCRIPT_GRAPHS + 1  # only the 3-token step had no graph at 512 tokens


@pytest.fixture(scope="module")
def llama_8b_layers(tmp_path_factory):
    """4 layers with Llama-3-8B's attention shape (hidden 4096, 32 heads, 8 KV heads of 128) and a small FFN."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("llama-8b-layers")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=4096, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def gpus() -> list[str]:
    return [f"cuda:{index}" for index in range(min(torch.cuda.device_count(), 2))]


@pytest.mark.parametrize("device", gpus() or ["cuda:0"])
def test_graph_replays_equal_the_same_steps_run_eagerly(llama_8b_layers, device):
    """Bitwise: a replayed graph computes exactly what its captured code computes when run directly, on every GPU
    (the first version replayed on cuda:1 without waiting for its inputs)."""
    from test_graphs import SCRIPT_GRAPHS, backends, run_script, session_script

    _, eager = backends(llama_8b_layers, 1, 4, device, capture=False, dtype=torch.bfloat16)
    _, graphed = backends(llama_8b_layers, 1, 4, device, capture=True, dtype=torch.bfloat16)
    script = session_script(eager.config.hidden_size)
    for step, (want, got) in enumerate(zip(run_script(eager, script, 1, 4)[0], run_script(graphed, script, 1, 4)[0])):
        assert torch.equal(got, want), step
    assert graphed.graphs.captures == SCRIPT_GRAPHS


@pytest.mark.parametrize("model", ["tiny_llama", "llama_8b_layers"])
def test_decode_graphs_in_bfloat16_are_as_accurate_as_ordinary_steps(model, request):
    """In bfloat16 the graphs' attention (a masked kernel over the static cache) rounds differently from the
    ordinary steps' (no mask), so both are compared with a float32 run: the graphs must be as close to it."""
    from test_graphs import SCRIPT_GRAPHS, backends, run_script, session_script

    path = request.getfixturevalue(model)
    reference, _ = backends(path, 1, 4, "cuda:0", dtype=torch.float32)
    ordinary, graphed = backends(path, 1, 4, "cuda:0", capture=True, dtype=torch.bfloat16)
    script = session_script(reference.config.hidden_size)
    want = run_script(reference, script, 1, 4)[0]
    plain = run_script(ordinary, script, 1, 4)[0]
    got = run_script(graphed, script, 1, 4)[0]
    assert graphed.graphs.captures == SCRIPT_GRAPHS
    for step, (w, p, g) in enumerate(zip(want, plain, got)):
        scale = w.abs().max().item()
        plain_error, graph_error = (p - w).abs().max().item(), (g - w).abs().max().item()
        assert graph_error <= 2 * plain_error + 1e-3 * scale, (step, graph_error, plain_error, scale)


def test_generation_through_gpu_servers_replaying_graphs_equals_transformers(local_swarm, tiny_llama, reference):
    torch.backends.cuda.matmul.allow_tf32 = False
    local_swarm.start_dht()
    devices = gpus()  # the second server on the second GPU where there is one
    servers = [local_swarm.start_server(tiny_llama, span, f"server{i}",
                                        ["--num-threads", "1", "--device", devices[i % len(devices)],
                                         "--dtype", "float32"])
               for i, span in enumerate([(0, 2), (2, 5)])]
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers)
    try:
        ids = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(5))
        tokens = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert tokens.tolist() == reference.generate(ids, max_new_tokens=24, do_sample=False).tolist()
        # Speculative decoding: the servers verify drafts of several tokens from graphs too, rolling back between.
        repeating = torch.tensor([[5, 6, 7, 8, 9] * 3])
        with model.inference_session(max_length=15 + 24 + 5) as session:
            drafted = model.generate(repeating, max_new_tokens=24, do_sample=False, prompt_lookup_num_tokens=4)
            steps = session._step_ids
        assert drafted.tolist() == reference.generate(repeating, max_new_tokens=24, do_sample=False).tolist()
        assert steps < 24  # drafts were accepted
    finally:
        model.close()
    for server in servers:
        counts = {int(n) for n in re.findall(r"decode graph captured: .* (\d+) new token", server.log())}
        assert 1 in counts and max(counts) > 1, counts  # graphs of decode steps and of verifying steps
