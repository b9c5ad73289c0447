"""Output checking: a server that lies about its outputs is caught, not used again, and reported; the output of
the generation stays exact."""

import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from test_lifecycle import peer_of
from tiny_models import make_tiny_llama


def test_lying_server_is_caught_and_blocked(local_swarm, models_dir):
    path = make_tiny_llama(models_dir / "tiny-liar", num_layers=5, seed=7)
    local_swarm.start_dht()
    common = ["--num-threads", "1"]
    # The liar answers fastest, so routing picks it; the honest replicas are slower.
    plan = {"head": ((0, 3), []), "liar": ((3, 5), ["--debug-perturb-outputs", "0.5"]),
            "honest1": ((3, 5), ["--debug-delay-ms", "20"]), "honest2": ((3, 5), ["--debug-delay-ms", "20"])}
    processes = {name: local_swarm.start_server(path, span, name, common + args, wait=False)
                 for name, (span, args) in plan.items()}
    for process in processes.values():
        local_swarm.wait_for_line(process, "ready:", timeout=180)
    liar = peer_of(processes["liar"])
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(3))
    want = reference.generate(ids, max_new_tokens=10, do_sample=False)

    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local_swarm.initial_peers, client_config=ClientConfig(check_outputs=True, check_share=1.0))
    try:
        with model.inference_session(max_length=18) as session:
            got = model.generate(ids, max_new_tokens=10, do_sample=False)
            assert session.failed_servers[:1] == [liar]  # caught at its first step
            assert liar not in {hop.peer_id for hop in session.route}
        assert got.tolist() == want.tolist()
        assert liar in model.swarm.blocked and "disagree" in model.swarm.blocked[liar]
        assert model.swarm.blocked.keys() == {liar}  # no honest server was blocked
        assert session.checker.checks >= 10
    finally:
        model.close()
