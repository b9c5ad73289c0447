"""Credits under contention on a real local swarm (processes on 127.0.0.1): 1 contributor client and 8 free-rider
clients (8 peer identities, one session each) saturating the same server, once on a server with credits (it trusts the contributor's home server A, and
the contributor's client holds A's delegation) and once on a server started with --no-credits (first come, first
served). Both servers run one step at a time (--max-batch-size 1), so they are contended as soon as two steps wait.

Prints: the contributor's decode p50 alone and under contention (ratio), the free riders' share of the steps and
the longest gap between two steps of one free rider, the same with credits off, an uncontended run (every client
thinks between steps: free riders' p50 against the contributor's, throughput against credits off), and the cost of
receipts per step (signing + checking one receipt every RECEIPT_EVERY_STEPS steps, against a decode step; and the
contributor's idle p50 with receipts against without).

    python benchmarks/credits_contention.py                # ~8 minutes on 2 loaded CPU cores
    python benchmarks/credits_contention.py --steps 150 --rounds 1   # ~2 minutes

It is a benchmark, not a test: CPU numbers move with whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from corolla.client.config import ClientConfig  # noqa: E402
from corolla.client.remote import InferenceSession  # noqa: E402
from corolla.client.swarm import SwarmClient  # noqa: E402
from corolla.credits.payer import RECEIPT_EVERY_STEPS, save_delegation  # noqa: E402
from corolla.credits.receipts import Latest, check_receipt, delegate, sign_receipt  # noqa: E402
from corolla.launch import LocalSwarm  # noqa: E402
from corolla.models.checkpoint import load_config, model_id  # noqa: E402
from corolla.net.auth import generate_identity, load_identity, peer_id_of_identity  # noqa: E402
from corolla.net.node import NetworkConfig  # noqa: E402

RIDERS = 8
PROMPT = 8
HIDDEN = 512


def make_model(path: Path) -> Path:
    """A Llama of 8 blocks of hidden 512 (~25M block parameters): a decode step costs a few ms on one CPU thread,
    so the server, not the clients, is what the sessions wait for."""
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=320, hidden_size=HIDDEN, intermediate_size=1376, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
        LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path


class Clients:
    def __init__(self, swarm: LocalSwarm, model: Path, server: str, identity: str | None, delegation: str | None,
                 credits: bool = True, riders: int = RIDERS):
        config = load_config(model)
        self.model_id = model_id(config, model.name)

        def client(**kwargs) -> SwarmClient:
            return SwarmClient(NetworkConfig(initial_peers=tuple(swarm.initial_peers), **kwargs), self.model_id,
                               config.num_hidden_layers,
                               ClientConfig(allowed_servers=(server,), delegation_file=delegation, credits=credits))

        self.contributor = client(identity=identity)
        # One client (one fresh peer identity) per free rider, as the test has it: the server sees 8 peers.
        self.riders = [SwarmClient(NetworkConfig(initial_peers=tuple(swarm.initial_peers)), self.model_id,
                                   config.num_hidden_layers, ClientConfig(allowed_servers=(server,)))
                       for _ in range(riders)]

    def close(self) -> None:
        self.contributor.close()
        for rider in self.riders:
            rider.close()


def run_phase(clients: Clients, steps: int, riders: int, think: float = 0.0) -> dict:
    """The contributor's decode step latencies while `riders` free-rider sessions step as fast as they can
    (or with `think` seconds between steps); rider step times inside the contributor's window."""
    stop, ready = threading.Event(), threading.Barrier(riders + 1, timeout=120)
    rider_times: list[list[float]] = [[] for _ in range(riders)]
    rider_latency: list[float] = []
    x = torch.randn(1, 1, HIDDEN)

    def rider(index: int) -> None:
        session = InferenceSession(clients.riders[index], max_length=1100)
        try:
            session.step(torch.randn(1, PROMPT, HIDDEN))
            ready.wait()
            while not stop.is_set():
                if session.position >= 1000:
                    session.rollback_to(PROMPT)
                began = time.perf_counter()
                session.step(x)
                rider_times[index].append(time.perf_counter())
                rider_latency.append(rider_times[index][-1] - began)
                if think:
                    time.sleep(think)
        finally:
            session.close()

    threads = [threading.Thread(target=rider, args=(i,), daemon=True) for i in range(riders)]
    for thread in threads:
        thread.start()
    session = InferenceSession(clients.contributor, max_length=PROMPT + steps + 1)
    latencies = []
    try:
        session.step(torch.randn(1, PROMPT, HIDDEN))
        if riders:
            ready.wait()
        window = time.perf_counter()
        for _ in range(steps):
            began = time.perf_counter()
            session.step(x)
            latencies.append(time.perf_counter() - began)
            if think:
                time.sleep(think)
        window = (window, time.perf_counter())
    finally:
        stop.set()
        session.close()
        for thread in threads:
            thread.join(30)
    inside = [[t for t in times if window[0] <= t <= window[1]] for times in rider_times]
    gaps = [max(b - a for a, b in zip([window[0], *times], [*times, window[1]])) for times in inside]
    rider_steps = sum(len(times) for times in inside)
    seconds = window[1] - window[0]
    return dict(p50=statistics.median(latencies), rider_share=rider_steps / max(1, rider_steps + steps),
                slowest_rider_steps=min((len(t) for t in inside), default=0), longest_gap=max(gaps, default=0.0),
                rider_p50=statistics.median(rider_latency) if rider_latency else 0.0,
                throughput=(steps + rider_steps) / seconds)


def receipt_cost(step_seconds: float) -> dict:
    """Signing (client) + checking (server) one receipt, per step, against one decode step."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_identity(Path(tmp) / "key")
        key = load_identity(Path(tmp) / "key")
    receipts, began = [], time.perf_counter()
    for i in range(1, 101):
        receipts.append(sign_receipt(key, "m", "QmPayee", 10 * i, i))
    sign = (time.perf_counter() - began) / 100
    began = time.perf_counter()
    previous = None
    for receipt in receipts:
        check_receipt(receipt, "m", "QmPayee", time.time(), previous)
        previous = Latest(receipt.sequence, receipt.block_tokens)
    check = (time.perf_counter() - began) / 100
    per_step = (sign + check) / RECEIPT_EVERY_STEPS
    return dict(sign_ms=sign * 1e3, check_ms=check * 1e3, per_step_share=per_step / step_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="contributor decode steps per phase")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every phase on both servers")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="corolla-credits-bench-"))
    model = make_model(workdir / "bench-llama")
    for name in ("a", "contributor1", "contributor2"):
        if not (workdir / f"{name}.key").exists():
            generate_identity(workdir / f"{name}.key")
    home = peer_id_of_identity(workdir / "a.key")
    swarm_id = model_id(load_config(model), model.name)
    for name in ("contributor1", "contributor2"):
        save_delegation(workdir / f"{name}.delegation",
                        delegate(load_identity(workdir / "a.key"), peer_id_of_identity(workdir / f"{name}.key"),
                                 swarm_id, time.time() + 3600))
    with LocalSwarm(workdir / "logs") as swarm:
        swarm.start_dht()
        # One weight layout for both: `auto` measures at start-up, both servers at once on a loaded machine, and in
        # two runs it gave the two servers different layouts (rowdot ~10 GB/s against column ~20 GB/s), so a step cost
        # ~30 ms on one and ~17 ms on the other: the throughput comparison measured that, not credits.
        common = ["--num-threads", "1", "--max-batch-size", "1", "--weight-layout", "row", "--credits-ledger"]
        credited = swarm.start_server(model, (0, 8), "server-credits",
                                      [*common, str(workdir / "credits.sqlite"), "--trusted-peers", home], wait=False)
        fcfs = swarm.start_server(model, (0, 8), "server-fcfs", [*common, str(workdir / "fcfs.sqlite"), "--no-credits"],
                                  wait=False)
        peers = {}
        for name, process in (("credits", credited), ("fcfs", fcfs)):
            line = swarm.wait_for_line(process, "ready:", 300)
            peers[name] = line.split(" as ")[1].split()[0]
        clients = {name: Clients(swarm, model, peers[name], str(workdir / f"{key}.key"),
                                 str(workdir / f"{key}.delegation"))
                   for name, key in (("credits", "contributor1"), ("fcfs", "contributor2"))}
        plain = Clients(swarm, model, peers["credits"], None, None, credits=False, riders=0)  # idle phases only
        results: dict = {}
        try:
            for each in (*clients.values(), plain):
                run_phase(each, 20, 0)  # warm-up: routes, streams, first steps
            think = None
            # Rounds alternate which server goes first, so that a change in the machine's load (other programs)
            # does not land on one side only; medians over rounds are printed.
            for round_index in range(args.rounds):
                names = ("credits", "fcfs") if round_index % 2 == 0 else ("fcfs", "credits")
                for name in names:
                    idle = run_phase(clients[name], args.steps, 0)
                    think = think or 40 * idle["p50"]  # the same think time on both servers
                    results.setdefault((name, "idle"), []).append(idle)
                    results.setdefault((name, "contended"), []).append(run_phase(clients[name], args.steps, RIDERS))
                    results.setdefault((name, "uncontended"), []).append(
                        run_phase(clients[name], args.steps // 6, RIDERS, think=think))
                    if name == "credits":
                        results.setdefault(("plain", "idle"), []).append(run_phase(plain, args.steps, 0))
        finally:
            for each in (*clients.values(), plain):
                each.close()

    def median(name: str, phase: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name, phase])

    cost = receipt_cost(median("credits", "idle", "p50"))
    print(f"workdir {workdir}; medians over {args.rounds} rounds")
    for name in ("credits", "fcfs"):
        idle, busy = median(name, "idle", "p50"), median(name, "contended", "p50")
        print(f"[{name}] contributor p50 idle {idle * 1e3:.2f} ms, contended {busy * 1e3:.2f} ms (x{busy / idle:.2f}); "
              f"free riders' share of steps {median(name, 'contended', 'rider_share'):.1%}, slowest rider "
              f"{median(name, 'contended', 'slowest_rider_steps'):.0f} steps, longest rider gap "
              f"{median(name, 'contended', 'longest_gap') * 1e3:.0f} ms")
        calm, calm_riders = median(name, "uncontended", "p50"), median(name, "uncontended", "rider_p50")
        print(f"[{name}] uncontended (think {think * 1e3:.0f} ms): contributor p50 {calm * 1e3:.2f} ms, free riders "
              f"p50 {calm_riders * 1e3:.2f} ms (x{calm_riders / calm:.3f}), throughput "
              f"{median(name, 'uncontended', 'throughput'):.1f} steps/s")
    for phase in ("contended", "uncontended"):
        on, off = median("credits", phase, "throughput"), median("fcfs", phase, "throughput")
        print(f"throughput {phase}: credits {on:.1f} / first come first served {off:.1f} steps/s = {on / off:.3f}")
    with_receipts, without = median("credits", "idle", "p50"), median("plain", "idle", "p50")
    print(f"receipts: sign {cost['sign_ms']:.2f} ms + check {cost['check_ms']:.3f} ms per receipt, one per "
          f"{RECEIPT_EVERY_STEPS} steps = {cost['per_step_share']:.2%} of an idle decode step; idle p50 with receipts "
          f"{with_receipts * 1e3:.2f} ms vs the same server, client without credits {without * 1e3:.2f} ms "
          f"(x{with_receipts / without:.3f})")


if __name__ == "__main__":
    main()
