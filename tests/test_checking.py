"""Output checking: a server that lies about its outputs is caught, not used again, and reported; the output of
the generation stays exact. A server whose outputs are not even finite is failed over without any checking."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.client.remote import _check_output, _RetryableRemoteError, wire_signature
from corolla.client.routing import Hop
from corolla.net.wire import WireTensor
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_non_finite_outputs_are_a_server_fault(dtype):
    """NaN or Inf in a server's output raises the error that makes the client try another server."""
    sent = torch.zeros(1, 3, 4, dtype=dtype)
    hop = Hop("peer", 3, 5)
    for bad in (None, float("nan"), float("inf"), -float("inf")):
        output = torch.ones(1, 3, 4, dtype=dtype)
        if bad is not None:
            output[0, 1, 2] = bad
        wire = WireTensor.from_torch(output)
        if bad is None:
            assert torch.equal(_check_output(wire, wire_signature(sent, "native"), sent, hop), output)
        else:
            with pytest.raises(_RetryableRemoteError, match=r"blocks 3\.\.4.*non-finite"):
                _check_output(wire, wire_signature(sent, "native"), sent, hop)


def test_server_returning_non_finite_outputs_is_failed_over(local_swarm, models_dir, caplog):
    """A server whose outputs are Inf is treated as faulty without output checking: banned, its blocks re-routed to
    a healthy replica (which gets the history replayed), in inference sessions and stateless forwards alike."""
    path = make_tiny_llama(models_dir / "tiny-non-finite", num_layers=5, seed=11)
    local_swarm.start_dht()
    common = ["--num-threads", "1"]
    # The faulty server answers fastest, so inference routing picks it; its healthy replica is slower.
    plan = {"head": ((0, 3), []), "faulty": ((3, 5), ["--debug-perturb-outputs", "inf"]),
            "healthy": ((3, 5), ["--debug-delay-ms", "20"])}
    processes = {name: local_swarm.start_server(path, span, name, common + args, wait=False)
                 for name, (span, args) in plan.items()}
    for process in processes.values():
        local_swarm.wait_for_line(process, "ready:", timeout=180)
    faulty = peer_of(processes["faulty"])
    reference = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(3, 320, (1, 8), generator=torch.Generator().manual_seed(5))
    want = reference.generate(ids, max_new_tokens=10, do_sample=False)
    config = ClientConfig(step_timeout=10.0, missing_blocks_wait=10.0, call_timeout=60.0)

    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                            client_config=config)
    try:
        with model.inference_session(max_length=18) as session:
            got = model.generate(ids, max_new_tokens=10, do_sample=False)
            assert session.failed_servers == [faulty]
            assert faulty not in {hop.peer_id for hop in session.route}
        assert got.tolist() == want.tolist()
    finally:
        model.close()

    # Stateless forwards draw their route at random (weighted by throughput): a fresh client (no bans yet) runs
    # them until one has gone through the faulty server; each result must be exact all the same.
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local_swarm.initial_peers,
                                                            client_config=config)
    try:
        with torch.no_grad():
            want_logits = reference(ids).logits
            for _ in range(30):
                caplog.clear()
                with caplog.at_level("WARNING", logger="corolla.client.remote"):
                    got_logits = model(ids).logits
                assert (got_logits - want_logits).abs().max() < 1e-4
                if any(faulty in r.getMessage() and "non-finite" in r.getMessage() for r in caplog.records):
                    break
            else:
                raise AssertionError(f"30 forwards never went through the faulty server {faulty}")
    finally:
        model.close()
