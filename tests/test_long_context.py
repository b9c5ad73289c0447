"""Long prompts: prefilled in chunks through the cache (bounded attention memory) with the same results as one
pass, up to the model's own maximum length; beam search through the swarm."""

import threading

import psutil
import torch
from transformers import AutoModelForCausalLM

from conftest import start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.models.spec import SpanInputs
from corolla.server.engine import Step
from test_engine import make_engine
from tiny_models import make_tiny


def test_chunked_prefill_equals_one_pass(models_dir):
    path = make_tiny("llama", models_dir / "tiny-long", max_position_embeddings=4096)
    whole, chunked = (make_engine(path, 1, 4, total_tokens=2048, page_tokens=64) for _ in range(2))
    whole.backend.prefill_chunk, chunked.backend.prefill_chunk = 10_000, 64
    hidden_size = whole.backend.config.hidden_size
    prompt = torch.randn(2, 700, hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(700).unsqueeze(0).expand(2, -1)
    mask = torch.ones(2, 700, dtype=torch.int64)
    mask[1, :37] = 0  # left padding in the second row
    step = torch.randn(2, 1, hidden_size, generator=torch.Generator().manual_seed(1))
    results = []
    for engine in (whole, chunked):
        session = engine.open(1, 4, 2, 701)
        engine.reserve_now(session, 701)
        prefill = engine.run_now(Step(session, 0, SpanInputs(prompt, positions, mask, None)))
        decode = engine.run_now(Step(session, 700, SpanInputs(step, torch.tensor([[700], [700]]),
                                                              torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)],
                                                                        1), None)))
        stateless = engine.backend.run_sync(1, 4, SpanInputs(prompt, positions, mask, None))
        results.append((prefill, decode, stateless))
    for want, got in zip(*results):
        assert (want - got).abs().max() < 1e-4


def test_long_prompt_through_the_swarm(local_swarm, models_dir):
    path = make_tiny("llama", models_dir / "tiny-16k", max_position_embeddings=16384)
    servers = start_swarm(local_swarm, path, [(0, 1), (1, 4)], extra_args=["--prefill-chunk-tokens", "1024"])
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 320, (1, 16000), generator=torch.Generator().manual_seed(2))
    peak, stop = [0], threading.Event()

    def sample_memory():
        processes = [psutil.Process(s.pid) for s in servers]
        while not stop.wait(0.05):
            peak[0] = max(peak[0], *(p.memory_info().rss for p in processes))

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers)
    try:
        with model.inference_session(max_length=16002) as session, torch.no_grad():
            logits = model(ids).logits[:, -1]
            next_logits = model(logits.argmax(-1, keepdim=True)).logits[:, -1]
            assert session.position == 16001
    finally:
        model.close()
        stop.set()
        sampler.join()
    with torch.no_grad():
        want = reference(ids).logits[:, -1]
        want_next = reference(torch.cat([ids, want.argmax(-1, keepdim=True)], 1)).logits[:, -1]
    assert (logits - want).abs().max() < 1e-4 and (next_logits - want_next).abs().max() < 1e-4
    # One 16k x 16k float attention matrix for 4 heads alone would be 4 GiB.
    assert peak[0] < 1.5 * 2**30, f"a server peaked at {peak[0] / 2**20:.0f} MiB"


def test_beam_search_through_the_swarm(tiny_swarm, tiny_llama):
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=tiny_swarm.initial_peers)
    try:
        for ids in (torch.randint(3, 320, (1, 7)), torch.randint(3, 320, (2, 5))):
            settings = dict(max_new_tokens=12, num_beams=3, do_sample=False, num_return_sequences=2,
                            early_stopping=True)
            got = model.generate(ids, **settings)
            want = reference.generate(ids, **settings)
            assert got.tolist() == want.tolist()
    finally:
        model.close()
