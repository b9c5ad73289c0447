"""A live server's cache budget: pages taken as sessions grow, a full cache answers with a clear error after the
client's wait, and everything is returned when sessions end."""

import time

import pytest
import torch

from conftest import start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.errors import CorollaError
from test_lifecycle import swarm_view


def test_full_cache_gives_a_clear_error_and_frees_on_close(local_swarm, tiny_llama):
    start_swarm(local_swarm, tiny_llama, [(0, 5)], extra_args=["--cache-tokens", "128", "--announce-period", "1"])
    config = ClientConfig(cache_wait=1.0, missing_blocks_wait=1.0, max_retries=1)
    first = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers,
                                                            client_config=config)
    second = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers,
                                                             client_config=config)
    try:
        with first.inference_session(max_length=128) as holder:
            with torch.no_grad():
                first(torch.randint(3, 320, (1, 100)))  # 2 pages of 64 tokens: the whole budget
            time.sleep(2.5)
            record = next(iter(swarm_view(local_swarm.initial_peers, tiny_llama, "tiny-llama").values()))
            assert record.cache_tokens_left == 0
            began = time.monotonic()
            with pytest.raises(CorollaError, match=r"server cache full: no server of blocks 0\.\.4 has room for 16"):
                with second.inference_session(max_length=16), torch.no_grad():
                    second(torch.randint(3, 320, (1, 5)))
            assert 1.0 <= time.monotonic() - began < 15
            assert holder.position == 100
            # A session that could never fit is refused at once, naming the largest one that could.
            began = time.monotonic()
            with pytest.raises(CorollaError, match=r"a session of 1000000000000 tokens \(max_length x batch\) can "
                                                   r"never fit: the largest the swarm can hold is 128 tokens"):
                with second.inference_session(max_length=10**12), torch.no_grad():
                    second(torch.randint(3, 320, (1, 5)))
            assert time.monotonic() - began < 1.0
        time.sleep(2.5)
        record = next(iter(swarm_view(local_swarm.initial_peers, tiny_llama, "tiny-llama").values()))
        assert record.cache_tokens_left == 128  # the closed session's pages are back
    finally:
        first.close()
        second.close()
    # Two sessions share the budget page by page; the one that outgrows the rest waits, then gets the server's answer.
    first = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers,
                                                            client_config=config)
    second = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers,
                                                             client_config=config)
    try:
        with first.inference_session(max_length=128), second.inference_session(max_length=16), torch.no_grad():
            first(torch.randint(3, 320, (1, 60)))  # page 1
            second(torch.randint(3, 320, (1, 5)))  # page 2
            began = time.monotonic()
            with pytest.raises(CorollaError, match="server cache full: needed 6 more tokens, 0 of 128 free after "
                                                   "waiting 1 s"):
                first(torch.randint(3, 320, (1, 10)))  # 70 tokens: a third page that does not exist
            assert time.monotonic() - began >= 1.0
    finally:
        first.close()
        second.close()
    fresh = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=local_swarm.initial_peers)
    try:
        assert fresh.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)
    finally:
        fresh.close()
