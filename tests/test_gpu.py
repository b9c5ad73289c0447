"""Servers on a CUDA device (skipped without one): LoRA gradients and generation through GPU servers equal plain peft.

Run on a GPU machine: `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

from conftest import peft_twin, start_swarm
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
        with torch.no_grad():
            for weight in model.tuning.lora_weights:
                weight.normal_(0, 0.3)
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
