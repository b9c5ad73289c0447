"""Configurable limits are enforced with clear errors: sessions per client, request size."""

import threading

import pytest
import torch

from conftest import start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.errors import CorollaError


def test_sessions_per_client_and_request_size(local_swarm, tiny_llama):
    start_swarm(local_swarm, tiny_llama, [(0, 5)], extra_args=["--max-sessions-per-peer", "2",
                                                                "--max-request-mb", "0.05"])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        tiny_llama, initial_peers=local_swarm.initial_peers,
        client_config=ClientConfig(max_retries=0, missing_blocks_wait=1.0))
    # Sessions are per thread: two threads hold one each, then a third is refused.

    errors, sessions_open, release = [], threading.Barrier(3), threading.Event()

    def hold():
        try:
            with model.inference_session(max_length=8), torch.no_grad():
                model(torch.tensor([[5, 6]]))
                sessions_open.wait(30)
                release.wait(30)
        except Exception as e:  # reported below
            errors.append(e)
            sessions_open.abort()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        sessions_open.wait(30)  # two sessions are open now
        with pytest.raises(CorollaError, match="too many open sessions: 2 of max_sessions_per_peer=2"):
            with model.inference_session(max_length=8), torch.no_grad():
                model(torch.tensor([[5, 6]]))
        release.set()
        for thread in threads:
            thread.join(30)
        assert not errors
        # 0.05 MiB per message: 300 tokens x 64 floats = 77 KB of activations is refused, with the reason.
        with pytest.raises(CorollaError, match="exceeds the limit of 52428 bytes"):
            with torch.no_grad():
                model(torch.randint(3, 320, (1, 300)))
        assert model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2).shape == (1, 5)  # still serving
    finally:
        release.set()
        model.close()
