"""Servers on a CUDA device (skipped without one): LoRA gradients and generation through GPU servers equal plain peft.

Run on a GPU machine: `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import asyncio
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


def test_engine_replaying_real_graphs_equals_each_session_alone(models_dir):
    """The randomized differential test of tests/test_engine.py with real CUDA-graph capture (float32, no TF32):
    batched and lone steps of 1 to 16 tokens replayed from graphs, rollbacks, beam reorders, sessions ending and
    new ones reusing their pages; and the aliasing reproduction."""
    from test_engine import check_reproduction, make_engine, run_schedules
    from tiny_models import make_tiny_llama

    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_tiny_llama(models_dir / "tiny-llama-5", num_layers=5)
    engine = make_engine(model, 1, 4, graphs=True, device="cuda:0", capture=True)
    check_reproduction(engine, tolerance=1e-4)
    assert run_schedules(engine, range(30), [(1, 4), (2, 4)], tolerance=1e-4) > 500
    assert engine.graphs.captures > 10 and engine.graphs.replays > 200 and engine.stats.batched_requests > 100


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


def scripted_outputs(engine):
    """A fixed script over three sessions: prefills, batched decode steps, a batched 4-token step, a rollback."""
    from test_engine import new_step, run_together

    hidden_size = engine.backend.config.hidden_size
    generator = torch.Generator().manual_seed(7)

    def hidden(tokens):
        return torch.randn(1, tokens, hidden_size, generator=generator).to(engine.backend.dtype)

    async def main():
        sessions = [engine.open(1, 4, 1, 200) for _ in range(3)]
        outputs = []
        for index, session in enumerate(sessions):
            await engine.reserve(session, 120, timeout=0)
            outputs += await run_together(engine, [new_step(session, 0, hidden(30 + 7 * index))])
        for _ in range(4):
            outputs += await run_together(engine, [new_step(s, s.length, hidden(1)) for s in sessions])
        outputs += await run_together(engine, [new_step(s, s.length, hidden(4)) for s in sessions])
        outputs += await run_together(engine, [new_step(s, s.length - 2, hidden(1)) for s in sessions])
        return outputs

    return asyncio.run(main())


@pytest.mark.parametrize("device", gpus() or ["cuda:0"])
def test_graph_replays_equal_the_same_steps_run_eagerly(llama_8b_layers, device):
    """Bitwise: a replayed graph computes exactly what its captured code computes when run directly, on every GPU
    (an earlier version replayed on cuda:1 without waiting for its inputs)."""
    from test_engine import make_engine

    eager = make_engine(llama_8b_layers, 1, 4, graphs=True, device=device, dtype=torch.bfloat16, capture=False,
                        total_tokens=4096, page_tokens=64)
    graphed = make_engine(llama_8b_layers, 1, 4, graphs=True, device=device, dtype=torch.bfloat16, capture=True,
                          total_tokens=4096, page_tokens=64)
    for step, (want, got) in enumerate(zip(scripted_outputs(eager), scripted_outputs(graphed))):
        assert torch.equal(got, want), step
    assert graphed.graphs.captures == 2  # 3 sessions padded to 4 rows: steps of 1 token and of 4


def test_nf4_blocks_replay_graphs_equal_to_their_eager_steps(llama_8b_layers):
    """bitsandbytes' nf4 layers inside captured graphs (the 180B-class servers' decode path): capture must succeed
    (no fallback to eager) and replays equal the same steps run directly, bitwise."""
    from test_engine import make_engine

    settings = dict(device="cuda:0", dtype=torch.bfloat16, total_tokens=4096, page_tokens=64, quant="nf4")
    eager = make_engine(llama_8b_layers, 1, 4, graphs=True, capture=False, **settings)
    graphed = make_engine(llama_8b_layers, 1, 4, graphs=True, capture=True, **settings)
    for step, (want, got) in enumerate(zip(scripted_outputs(eager), scripted_outputs(graphed))):
        assert torch.equal(got, want), step
    assert graphed.graphs.capture and graphed.graphs.captures == 2


def test_falcon_graph_replays_equal_their_eager_steps(models_dir):
    """Rotary Falcon (the 180B's family) has a static decode: its replays equal the same steps run directly."""
    from test_engine import make_engine
    from tiny_models import make_family

    path = make_family("falcon_new", models_dir)
    settings = dict(device="cuda:0", dtype=torch.float32, total_tokens=4096, page_tokens=64)
    eager = make_engine(path, 1, 4, graphs=True, capture=False, **settings)
    graphed = make_engine(path, 1, 4, graphs=True, capture=True, **settings)
    for step, (want, got) in enumerate(zip(scripted_outputs(eager), scripted_outputs(graphed))):
        assert torch.equal(got, want), step
    assert graphed.graphs.captures == 2


@pytest.mark.parametrize("model", ["tiny_llama", "llama_8b_layers"])
def test_graphs_in_bfloat16_are_as_accurate_as_ordinary_steps(model, request):
    """In bfloat16 the graphs' attention (a masked kernel over a bucket of slots) rounds differently from the
    ordinary steps' (no mask), so both are compared with a float32 run: the graphs must be as close to it."""
    from test_engine import make_engine

    path = request.getfixturevalue(model)
    settings = dict(device="cuda:0", total_tokens=4096, page_tokens=64)
    want = scripted_outputs(make_engine(path, 1, 4, dtype=torch.float32, **settings))
    plain = scripted_outputs(make_engine(path, 1, 4, dtype=torch.bfloat16, **settings))
    graphed = make_engine(path, 1, 4, graphs=True, capture=True, dtype=torch.bfloat16, **settings)
    got = scripted_outputs(graphed)
    assert graphed.graphs.captures == 2
    for step, (w, p, g) in enumerate(zip(want, plain, got)):
        w, p, g = w.float(), p.float(), g.float()
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
        counts = {int(n) for n in re.findall(r"step graph captured: .* (\d+) new token", server.log())}
        assert 1 in counts and max(counts) > 1, counts  # graphs of decode steps and of verifying steps


def test_concurrent_generations_through_gpu_servers_equal_each_alone(local_swarm, tiny_llama, reference):
    """Eight clients generate at once through two GPU servers (their steps batched and replayed from graphs of
    several rows): each gets what transformers gives its prompt alone."""
    import threading

    torch.backends.cuda.matmul.allow_tf32 = False
    start_swarm(local_swarm, tiny_llama, [(0, 2), (2, 5)], ["--device", "cuda:0", "--dtype", "float32"])
    prompts = [torch.randint(3, 320, (1, 5 + index), generator=torch.Generator().manual_seed(index))
               for index in range(8)]
    models = [AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers)
              for _ in prompts]
    results = [None] * len(prompts)

    def generate(index):
        results[index] = models[index].generate(prompts[index], max_new_tokens=20, do_sample=False)

    threads = [threading.Thread(target=generate, args=(index,)) for index in range(len(prompts))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    finally:
        for model in models:
            model.close()
    for prompt, got in zip(prompts, results):
        assert got is not None and got.tolist() == reference.generate(prompt, max_new_tokens=20,
                                                                      do_sample=False).tolist()
