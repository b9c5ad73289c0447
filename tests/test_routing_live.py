"""Routing through real servers: the client measures round trips and picks the faster chain."""

import time

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from tiny_models import make_tiny_llama


def peer_of(process):
    return process.log().split("ready: ")[1].split(" as ")[1].split()[0]


def test_route_avoids_a_slowed_server_and_allowed_servers_is_obeyed(local_swarm, models_dir):
    path = make_tiny_llama(models_dir / "tiny-route", num_layers=4, seed=4)
    local_swarm.start_dht()
    names = {"fast_head": ((0, 2), []), "fast_tail": ((2, 4), []),
             "slow_tail": ((2, 4), ["--debug-delay-ms", "60"])}
    processes = {name: local_swarm.start_server(path, span, name, ["--num-threads", "1", *args], wait=False)
                 for name, (span, args) in names.items()}
    for process in processes.values():
        local_swarm.wait_for_line(process, "ready:", timeout=180)
    peers = {name: peer_of(process) for name, process in processes.items()}
    ids = torch.randint(3, 320, (1, 8))

    def timed_generation(config: ClientConfig):
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                                client_config=config)
        try:
            with model.inference_session(max_length=24) as session:
                began = time.perf_counter()
                out = model.generate(ids, max_new_tokens=10, do_sample=False)
                return out, [hop.peer_id for hop in session.route], time.perf_counter() - began
        finally:
            model.close()

    out_fast, route_fast, fast_s = timed_generation(ClientConfig())
    assert route_fast == [peers["fast_head"], peers["fast_tail"]]
    forced = ClientConfig(allowed_servers=(peers["fast_head"], peers["slow_tail"]))
    out_slow, route_slow, slow_s = timed_generation(forced)
    assert route_slow == [peers["fast_head"], peers["slow_tail"]]
    assert out_fast.tolist() == out_slow.tolist()
    assert slow_s > fast_s + 10 * 0.05  # 11 steps, each paying the 60 ms delay on the slow chain
