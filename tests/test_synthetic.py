"""Synthetic weights (benchmarks only, corolla/models/synthetic.py): servers that build their blocks from the config
with random weights serve exactly those blocks, under a model name no normal client asks for."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import FalconConfig, FalconForCausalLM

from conftest import start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.errors import CorollaError, MissingBlocksError
from corolla.models.synthetic import synthetic_blocks, synthetic_name, write_synthetic_checkpoint

SEED = 3
CONFIG = dict(vocab_size=320, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_kv_heads=2,
              new_decoder_architecture=True, parallel_attn=True, bias=False, alibi=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)


def test_same_seed_same_blocks_and_different_seed_different_blocks():
    config = FalconConfig(**CONFIG)
    whole = synthetic_blocks(config, 0, 4, "cpu", torch.float32, SEED)
    tail = synthetic_blocks(config, 2, 4, "cpu", torch.float32, SEED)
    other = synthetic_blocks(config, 2, 4, "cpu", torch.float32, SEED + 1)
    for mine, again, different in zip(whole[2:], tail, other):
        for (name, tensor), again_tensor, different_tensor in zip(mine.state_dict().items(), again.state_dict().values(),
                                                                  different.state_dict().values()):
            assert torch.equal(tensor, again_tensor), name
            if tensor.ndim == 2:
                assert not torch.equal(tensor, different_tensor), name
    with pytest.raises(CorollaError, match="seed >= 0"):
        synthetic_name("x", -1)


def test_synthetic_servers_serve_their_random_blocks_only_under_their_own_name(local_swarm, tmp_path):
    config = FalconConfig(**CONFIG)
    model_dir = write_synthetic_checkpoint(config, tmp_path / "falcon-synthetic", SEED, torch.float32)
    start_swarm(local_swarm, model_dir, [(0, 2), (2, 4)], ["--synthetic-weights-seed", str(SEED), "--dtype",
                                                           "float32"])
    # The reference: transformers' own model with the client's tensors from the checkpoint and the same random blocks.
    reference = FalconForCausalLM(config).eval()
    reference.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    for index, block in enumerate(synthetic_blocks(config, 0, 4, "cpu", torch.float32, SEED)):
        reference.transformer.h[index].load_state_dict(block.state_dict())
    reference.tie_weights()
    ids = torch.randint(3, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=local_swarm.initial_peers,
                                                            model_name=synthetic_name(model_dir.name, SEED))
    try:
        got = model.generate(ids, max_new_tokens=6, do_sample=False)
        want = reference.generate(ids, max_new_tokens=6, do_sample=False)
        assert got.tolist() == want.tolist()
    finally:
        model.close()
    # A client asking for the model by its plain name finds no server: nothing routes it to random weights.
    plain = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=local_swarm.initial_peers,
                                                            client_config=ClientConfig(missing_blocks_wait=1.0))
    try:
        with pytest.raises(MissingBlocksError):
            plain.generate(ids, max_new_tokens=1, do_sample=False)
    finally:
        plain.close()
