"""Fault injection with real server processes: servers killed (SIGKILL), hung (SIGSTOP) or failing mid-session,
during decode and during prefill, with a replica up. Every trial's output must equal the failure-free output.

CI runs one trial per fault kind; COROLLA_LONG=1 runs 24 random trials (`make test-long`)."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import LONG, OUTPUT_DIR
from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.errors import CorollaError
from corolla.launch import LocalSwarm, Process
from tiny_models import make_tiny_llama

NEW_TOKENS = 14
SPANS = {"a1": (0, 3), "a2": (0, 3), "b1": (3, 6), "b2": (3, 6)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    span: tuple[int, int]
    identity: str
    port: int
    fail_file: str
    process: Process | None = None

    @property
    def peer_id(self) -> str:
        return self.process.log().split("ready: ")[1].split(" as ")[1].split()[0]


class FaultSwarm:
    def __init__(self, swarm: LocalSwarm, model_dir, workdir):
        self.swarm, self.model_dir = swarm, model_dir
        self.servers = {name: Server(name, span, str(workdir / f"{name}.key"), free_port(), str(workdir / f"{name}.fail"))
                        for name, span in SPANS.items()}

    def start(self, server: Server, wait: bool = True) -> None:
        args = ["--num-threads", "1", "--identity", server.identity, "--port", str(server.port),
                "--announce-period", "2", "--debug-fail-file", server.fail_file]
        server.process = self.swarm.start_server(self.model_dir, server.span, server.name, args, wait=wait)

    def by_peer(self, peer_id: str) -> Server:
        return next(s for s in self.servers.values() if s.process is not None and s.peer_id == peer_id)

    def heal(self) -> None:
        """Undo every fault: continue stopped servers, restart dead ones (same identity and port), clear errors."""
        for server in self.servers.values():
            if os.path.exists(server.fail_file):
                os.remove(server.fail_file)
            if server.process.alive():
                os.killpg(server.process.pid, signal.SIGCONT)
            else:
                self.swarm.stop(server.process)
                self.start(server)


@pytest.fixture(scope="module")
def fault_swarm(models_dir):
    model_dir = make_tiny_llama(models_dir / "tiny-faults", num_layers=6, seed=3)
    workdir = OUTPUT_DIR / "faults"
    with LocalSwarm(workdir) as swarm:
        swarm.start_dht()
        faults = FaultSwarm(swarm, model_dir, workdir)
        for server in faults.servers.values():
            faults.start(server, wait=False)
        for server in faults.servers.values():
            swarm.wait_for_line(server.process, "ready:", timeout=180)
        yield faults


@pytest.fixture(scope="module")
def reference_tokens(fault_swarm):
    reference = AutoModelForCausalLM.from_pretrained(fault_swarm.model_dir).eval()
    prompt = torch.randint(3, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    return prompt, reference.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)


def new_client(fault_swarm, **config):
    config = {"step_timeout": 3.0, "missing_blocks_wait": 20.0, "connect_timeout": 5.0, **config}
    return AutoDistributedModelForCausalLM.from_pretrained(
        fault_swarm.model_dir, initial_peers=fault_swarm.swarm.initial_peers, client_config=ClientConfig(**config))


def inject(fault_swarm, kind: str, server: Server) -> None:
    if kind == "kill":
        fault_swarm.swarm.kill(server.process)
    elif kind == "stop":  # the process and its p2p daemon hang; TCP still accepts bytes
        os.killpg(server.process.pid, signal.SIGSTOP)
    elif kind == "error":
        open(server.fail_file, "w").close()
    else:
        raise ValueError(kind)


def generate_with_fault(model, fault_swarm, prompt, kind: str, fault_step: int, hop_index: int):
    """Greedy decoding step by step; before step `fault_step`, inject the fault into the server of `hop_index`."""
    with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
        tokens = prompt
        for step in range(NEW_TOKENS):
            if step == fault_step:
                victim = fault_swarm.by_peer(session.route[hop_index].peer_id)
                inject(fault_swarm, kind, victim)
            with torch.no_grad():
                logits = model(tokens if step == 0 else tokens[:, -1:]).logits
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert session.failed_servers == [victim.peer_id]  # the fault was hit, once, and survived
        assert victim.peer_id not in {hop.peer_id for hop in session.route}
    return tokens


def generate_with_fault_in_prefill(model, fault_swarm, prompt, victim: Server):
    """Freeze the victim, start the prefill (its request is then in flight), kill the victim while it is pending."""
    os.killpg(victim.process.pid, signal.SIGSTOP)
    killer = threading.Timer(0.7, fault_swarm.swarm.kill, args=(victim.process,))
    killer.start()
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert session.failed_servers == [victim.peer_id]
        return tokens
    finally:
        killer.join()


def run_trial(fault_swarm, reference_tokens, kind: str, fault_step: int, hop_index: int):
    prompt, want = reference_tokens
    model = new_client(fault_swarm)
    try:
        began = time.monotonic()
        if kind == "prefill-kill":
            with model.inference_session(max_length=prompt.shape[1] + 1) as warm:  # learn the route it will take
                model(prompt[:, :1])
                victim = fault_swarm.by_peer(warm.route[hop_index].peer_id)
            got = generate_with_fault_in_prefill(model, fault_swarm, prompt, victim)
        else:
            got = generate_with_fault(model, fault_swarm, prompt, kind, fault_step, hop_index)
        elapsed = time.monotonic() - began
    finally:
        model.close()
        fault_swarm.heal()
    assert got.tolist() == want.tolist(), f"{kind} at step {fault_step}, hop {hop_index}: output changed"
    assert elapsed < 60


FAST_TRIALS = [("kill", 5, 1), ("stop", 3, 0), ("error", 7, 1), ("prefill-kill", 0, 1)]


def long_trials(count: int = 24):
    rng = random.Random(2026)
    kinds = ["kill", "stop", "error", "prefill-kill"]
    return [(kinds[i % 4], rng.randrange(1, NEW_TOKENS), rng.randrange(2)) for i in range(count)]


@pytest.mark.parametrize("kind, fault_step, hop_index", long_trials() if LONG else FAST_TRIALS)
def test_generation_survives_a_failing_server(fault_swarm, reference_tokens, kind, fault_step, hop_index):
    run_trial(fault_swarm, reference_tokens, kind, fault_step, hop_index)


def test_restarted_server_is_picked_up_again(fault_swarm, reference_tokens):
    """The only server left for blocks 3..5 dies mid-generation and comes back on the same address and peer id."""
    prompt, want = reference_tokens
    b1, b2 = fault_swarm.servers["b1"], fault_swarm.servers["b2"]
    fault_swarm.swarm.kill(b2.process)
    model = new_client(fault_swarm)
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS):
            tokens = prompt
            for step in range(NEW_TOKENS):
                if step == 4:
                    fault_swarm.swarm.kill(b1.process)
                    threading.Timer(1.0, fault_swarm.start, args=(b1, False)).start()
                with torch.no_grad():
                    logits = model(tokens if step == 0 else tokens[:, -1:]).logits
                tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
        assert tokens.tolist() == want.tolist()
    finally:
        model.close()
        fault_swarm.swarm.wait_for_line(b1.process, "ready:", timeout=60)
        fault_swarm.heal()


def test_losing_the_last_replica_fails_clearly_in_bounded_time(fault_swarm, reference_tokens):
    prompt, _ = reference_tokens
    model = new_client(fault_swarm, missing_blocks_wait=3.0)
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            with torch.no_grad():
                model(prompt)
            for server in (fault_swarm.servers["b1"], fault_swarm.servers["b2"]):
                fault_swarm.swarm.kill(server.process)
            began = time.monotonic()
            with pytest.raises(CorollaError, match=r"blocks 3\.\.5"):
                with torch.no_grad():
                    model(prompt[:, :1])
            assert time.monotonic() - began < 20
            assert session.route  # the session knew its route when it failed
    finally:
        model.close()
        fault_swarm.heal()
