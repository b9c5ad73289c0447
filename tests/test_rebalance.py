"""Servers that place themselves: --num-blocks takes the gap, and a server moves when a gap opens later."""

import time

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.net.records import ServerState
from test_lifecycle import swarm_view
from tiny_models import make_tiny_llama


def spans(view):
    return sorted((r.start_block, r.end_block) for r in view.values() if r.state == ServerState.ONLINE)


def test_servers_take_gaps_and_move_when_one_opens(local_swarm, models_dir):
    path = make_tiny_llama(models_dir / "tiny-rebalance", num_layers=6, seed=5)
    local_swarm.start_dht()
    common = ["--num-threads", "1", "--announce-period", "1", "--rebalance-period", "3"]
    first = local_swarm.start_server(path, None, "first", ["--num-blocks", "3", *common])
    second = local_swarm.start_server(path, None, "second", ["--num-blocks", "3", *common])
    view = swarm_view(local_swarm.initial_peers, path, "tiny-rebalance")
    assert spans(view) == [(0, 3), (3, 6)]  # the second server took the gap, not the first's blocks

    third = local_swarm.start_server(path, None, "third", ["--num-blocks", "3", *common])
    time.sleep(8)  # a few rebalancing periods: nobody should move (no clear gain, and each alone serves a span)
    assert "rebalancing" not in first.log() + second.log()

    # The server alone on one span dies: one of the two sharing the other span must move into the gap.
    alone = second if spans_of(third) == (0, 3) else first
    local_swarm.kill(alone)
    deadline = time.monotonic() + 45
    while spans(swarm_view(local_swarm.initial_peers, path, "tiny-rebalance")) != [(0, 3), (3, 6)]:
        assert time.monotonic() < deadline, "no server moved into the gap"
        time.sleep(1)
    movers = [p for p in (first, second, third) if p is not alone and "rebalancing: moving" in p.log()]
    assert len(movers) == 1
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers)
    try:
        assert model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3).shape == (1, 6)
    finally:
        model.close()


def spans_of(process):
    line = [l for l in process.log().splitlines() if l.startswith("ready: ")][-1]
    start, end = line.split("blocks ")[1].split()[0].split(":")
    return int(start), int(end)
