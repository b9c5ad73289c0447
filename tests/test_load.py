"""Load: many concurrent client sessions against a local swarm of real server processes.

Long mode (COROLLA_LONG=1): 64 sessions for 3 minutes; CI: 16 sessions for 20 s. Shown: no failed request (and
every output equals plain transformers'), the servers' memory does not keep growing (RSS of each server process
and its p2p daemon, sampled every second: the last third of the run against the first), the cache stays within
its budget (each server's announced cache_tokens_left in [0, budget] at every sample) and is all free again at
the end.
"""

from __future__ import annotations

import random
import statistics
import threading
import time

import psutil
import torch
from transformers import AutoModelForCausalLM

from conftest import LONG, start_swarm
from corolla import AutoDistributedModelForCausalLM

SESSIONS = 64 if LONG else 16
# Model objects (one peer and network thread each); sessions are spread over them. 8 sessions per client stays well
# under the servers' --max-sessions-per-peer even while a finished session's close is still on its way.
CLIENTS = 8 if LONG else 2
DURATION = 180.0 if LONG else 20.0
CACHE_TOKENS = 4096  # per server: 64 sessions of <= 64 tokens fill it exactly (pages of 64 tokens)
MAX_NEW_TOKENS = 24


def test_many_concurrent_sessions(local_swarm, tiny_llama):
    servers = start_swarm(local_swarm, tiny_llama, [(0, 3), (3, 5)],
                          extra_args=["--announce-period", "1", "--cache-tokens", str(CACHE_TOKENS)])
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = [torch.randint(3, 320, (1, 4 + i % 5), generator=torch.Generator().manual_seed(i)) for i in range(12)]
    wanted = [reference.generate(p, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)[0].tolist() for p in prompts]
    clients = [AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, local_swarm.initial_peers)
               for _ in range(CLIENTS)]
    deadline = time.monotonic() + DURATION
    lock = threading.Lock()
    done: list[int] = []  # tokens per finished request
    failures: list[str] = []
    in_flight = [0]

    def generate_loop(model, rng: random.Random) -> None:
        """transformers' generate(), each call a new inference session."""
        while time.monotonic() < deadline:
            i = rng.randrange(len(prompts))
            new = rng.randint(4, MAX_NEW_TOKENS)
            got = model.generate(prompts[i], max_new_tokens=new, do_sample=False)[0].tolist()
            if got != wanted[i][:len(got)] or len(got) != prompts[i].shape[1] + new:
                raise AssertionError(f"generate output differs for prompt {i}")
            with lock:
                done.append(new)

    def step_loop(model, rng: random.Random) -> None:
        """Token by token inside one session, then a rollback and a second continuation."""
        while time.monotonic() < deadline:
            i = rng.randrange(len(prompts))
            ids = prompts[i]
            with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + MAX_NEW_TOKENS) as session:
                tokens = ids[0].tolist()
                logits = model(ids).logits
                for _ in range(rng.randint(4, MAX_NEW_TOKENS)):
                    tokens.append(int(logits[0, -1].argmax()))
                    logits = model(torch.tensor([tokens[-1:]])).logits
                if tokens != wanted[i][:len(tokens)]:
                    raise AssertionError(f"step output differs for prompt {i}")
                with lock:
                    done.append(len(tokens) - ids.shape[1])
                assert session.position == len(tokens)

    def worker(index: int) -> None:
        rng = random.Random(index)
        model = clients[index % CLIENTS]
        with lock:
            in_flight[0] += 1
        try:
            (generate_loop if index % 2 else step_loop)(model, rng)
        except Exception as e:  # reported below
            with lock:
                failures.append(f"session thread {index}: {type(e).__name__}: {e}")
        finally:
            with lock:
                in_flight[0] -= 1

    processes = [psutil.Process(s.pid) for s in servers]
    rss: dict[int, list[float]] = {p.pid: [] for p in processes}
    cache_seen: list[dict[str, int]] = []
    peer_ids = {s.log().split("ready: ")[1].split(" as ")[1].split()[0] for s in servers}
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(SESSIONS)]
    began = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        while time.monotonic() < deadline:
            for process in processes:
                family = [process, *process.children(recursive=True)]
                rss[process.pid].append(sum(p.memory_info().rss for p in family) / 2**20)
            view = {r.peer_id: r.record.cache_tokens_left
                    for r in clients[0].swarm.call(clients[0].swarm.servers(refresh=True), timeout=30)}
            cache_seen.append(view)
            time.sleep(1.0)
        for thread in threads:
            thread.join(120)
        assert not any(t.is_alive() for t in threads), "a session thread hung"
        elapsed = time.monotonic() - began
        print(f"\nload: {SESSIONS} concurrent sessions for {elapsed:.0f} s: {len(done)} requests, {sum(done)} tokens "
              f"({sum(done) / elapsed:.0f} tokens/s), {len(failures)} failed")
        assert not failures, failures[:5]
        assert len(done) >= SESSIONS

        # The cache never went over budget: every server announced itself with 0 <= left <= budget, every time.
        for view in cache_seen:
            assert peer_ids <= set(view), f"a server's record was missing or invalid: {view}"
            assert all(0 <= view[p] <= CACHE_TOKENS for p in peer_ids), view
        lowest = min(view[p] for view in cache_seen for p in peer_ids)
        print(f"load: lowest announced cache left {lowest} of {CACHE_TOKENS} tokens")
        assert lowest < CACHE_TOKENS  # the budget was really in use

        # Memory is bounded: the last third of the run is not above the first third (beyond allocator noise).
        for pid, samples in rss.items():
            third = max(1, len(samples) // 3)
            first, last = statistics.mean(samples[:third]), statistics.mean(samples[-third:])
            print(f"load: server {pid} RSS first third {first:.0f} MiB, last third {last:.0f} MiB, "
                  f"max {max(samples):.0f} MiB")
            assert last <= first * 1.10 + 30, f"server {pid} memory keeps growing: {first:.0f} -> {last:.0f} MiB"

        # All sessions are closed: the whole budget is free again.
        end = time.monotonic() + 20
        while True:
            view = {r.peer_id: r.record.cache_tokens_left
                    for r in clients[0].swarm.call(clients[0].swarm.servers(refresh=True), timeout=30)}
            if all(view.get(p) == CACHE_TOKENS for p in peer_ids):
                break
            assert time.monotonic() < end, f"cache not released after the load: {view}"
            time.sleep(0.5)
        assert all(s.alive() for s in servers)
    finally:
        for model in clients:
            model.close()
