"""Aggregate decode throughput of a Corolla swarm under concurrent sessions: 1, 8, 32 and 64 sessions at once,
spread over several client processes, against the single-session tokens/s, in one run.

Setup (as benchmarks/gpu_swarm.py, setup "swarm1"): the Llama-3-8B shape with random weights (--preset; "tiny"
checks the script on a CPU in seconds), a sharded checkpoint under --workdir, 2 servers on one device (each serves
half of the layers), clients on the same device. The servers' --cache-tokens is sized for the largest concurrency
(sessions x (prompt + new tokens), with a margin), their --max-batch-size and --max-sessions-per-peer likewise.

For each N in --sessions: P = min(N, --processes) client processes (this script with --client), N sessions spread
over them. Each process loads AutoDistributedModelForCausalLM once, runs one warm-up generation, then waits at a
start barrier (a file the parent writes, holding a start time a little in the future) so that every session of
every process starts together; each session (a thread) runs one greedy generate(prompt, NEW new tokens) whose
streamer stamps every token with time.time() (one clock for all processes). The parent computes:

  * aggregate tokens/s (steady state): the window from the moment every session has produced its first token to
    the moment the first session produces its last one; tokens produced inside the window / its length. All N
    sessions are decoding throughout it (prefills are outside it).
  * tokens/s over the whole wall: every new token (N x NEW) / (last token - start), prefills included.
  * per-session ms/token: median over sessions of each session's mean gap between its tokens 2..NEW.
  * ratio: aggregate tokens/s / the 1-session figure.

    python3 benchmarks/swarm_concurrency.py                       # 8B shape on cuda:0, N = 1 8 32 64
    python3 benchmarks/swarm_concurrency.py --preset tiny --device cpu --sessions 1 4 --processes 2 \\
        --new-tokens 16 --prompt-tokens 16                        # a quick check on CPU

Every wait is bounded (--server-timeout, --client-timeout); every process started is stopped by its PID (servers
by LocalSwarm, clients by their process group). --deadline-s skips the N not yet started once that much time has
passed. JSON goes to --json, or $OUT/swarm_concurrency.json where $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's corolla, not an installed one
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from gpu_swarm import DTYPES, PRESETS, write_checkpoint  # noqa: E402
from swarm_latency import TimingStreamer  # noqa: E402

RESULT_PREFIX = "RESULT "
READY_PREFIX = "READY "


class WallClockStreamer(TimingStreamer):
    """TimingStreamer with time.time() stamps: comparable across processes."""

    def put(self, value):
        if self.first:  # generate() first hands the prompt to the streamer
            self.first = False
            return
        self.times.append(time.time())


def prompt_ids(prompt_tokens: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([[1]]), torch.randint(3, vocab, (1, prompt_tokens - 1), generator=generator)],
                     dim=1)


# ----------------------------------------------------------------------------------------------- client process

def client_main(spec: dict) -> None:
    """One client process: load once, warm up, report READY, wait for the go file, run its sessions in threads,
    print one RESULT line (JSON)."""
    from corolla import AutoDistributedModelForCausalLM

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = DTYPES[spec["dtype"]]
    device = spec["device"]
    began = time.time()
    model = AutoDistributedModelForCausalLM.from_pretrained(spec["model_dir"], initial_peers=spec["initial_peers"],
                                                           dtype=dtype)
    model = model.to(device)
    try:
        load_s = time.time() - began
        ids = [prompt_ids(spec["prompt_tokens"], spec["vocab"], spec["seed"] + i).to(device)
               for i in range(spec["sessions"])]
        with torch.inference_mode():  # warm-up: routes, connections, allocator, kernels' first launches
            model.generate(ids[0], max_new_tokens=4, min_new_tokens=4, do_sample=False)
        print(f"{READY_PREFIX}{json.dumps({'load_s': load_s, 'warm_s': time.time() - began})}", flush=True)

        go = Path(spec["go_file"])
        deadline = time.monotonic() + spec["barrier_timeout"]
        while not go.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no start signal ({go}) within {spec['barrier_timeout']:.0f} s")
            time.sleep(0.005)
        start_at = None
        while start_at is None:  # the parent writes the file atomically, but be safe
            try:
                start_at = float(go.read_text())
            except ValueError:
                time.sleep(0.005)

        results: list[dict | None] = [None] * spec["sessions"]

        def session(i: int) -> None:
            streamer = WallClockStreamer()
            delay = start_at - time.time()
            if delay > 0:
                time.sleep(delay)
            started = time.time()
            try:
                with torch.inference_mode():
                    model.generate(ids[i], max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                                   do_sample=False, streamer=streamer)
                results[i] = dict(start=started, times=streamer.times)
            except Exception as e:  # reported, not raised: the other sessions' figures still count
                results[i] = dict(start=started, times=streamer.times, error=repr(e))

        threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(spec["sessions"])]
        for t in threads:
            t.start()
        run_deadline = time.monotonic() + spec["run_timeout"] + max(0.0, start_at - time.time())
        for t in threads:
            t.join(max(0.0, run_deadline - time.monotonic()))
        missing = [i for i, r in enumerate(results) if r is None]
        for i in missing:
            results[i] = dict(start=start_at, times=[], error=f"not finished within {spec['run_timeout']:.0f} s")
        print(f"{RESULT_PREFIX}{json.dumps({'sessions': results, 'load_s': load_s})}", flush=True)
    finally:
        if not any(t.is_alive() for t in locals().get("threads", [])):
            model.close()
    sys.stdout.flush()
    os._exit(0)  # do not wait for straggling threads or the network loop


# ----------------------------------------------------------------------------------------------- parent

class Client:
    def __init__(self, index: int, spec: dict, log_path: Path):
        self.index = index
        self.log_path = log_path
        log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--client", json.dumps(spec)],
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True, env=env)
        log.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def line(self, prefix: str) -> str | None:
        for line in self.log().splitlines():
            if line.startswith(prefix):
                return line[len(prefix):]
        return None

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL to the client's whole process group (itself and its p2p daemon), by its PID."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass


def wait_all(clients: list[Client], prefix: str, timeout: float, what: str) -> list[dict]:
    deadline = time.monotonic() + timeout
    found: dict[int, dict] = {}
    while len(found) < len(clients):
        for c in clients:
            if c.index in found:
                continue
            line = c.line(prefix)
            if line is not None:
                found[c.index] = json.loads(line)
            elif c.popen.poll() is not None:
                raise RuntimeError(f"client {c.index} exited (code {c.popen.returncode}) before {what}; its log "
                                   f"({c.log_path}) ends with:\n{c.tail()}")
        if len(found) == len(clients):
            break
        if time.monotonic() > deadline:
            late = [c for c in clients if c.index not in found]
            raise TimeoutError(f"{len(late)} client(s) not {what} within {timeout:.0f} s; client {late[0].index}'s "
                               f"log ({late[0].log_path}) ends with:\n{late[0].tail()}")
        time.sleep(0.05)
    return [found[c.index] for c in clients]


def analyse(sessions: list[dict], new_tokens: int) -> dict:
    """Figures from every session's token stamps (see the module's docstring)."""
    errors = [s["error"] for s in sessions if s.get("error")]
    complete = [s for s in sessions if not s.get("error") and len(s["times"]) == new_tokens]
    result = dict(sessions=len(sessions), complete=len(complete), errors=errors[:5], error_count=len(errors))
    if not complete:
        return result
    start = min(s["start"] for s in sessions)
    firsts = [s["times"][0] for s in complete]
    lasts = [s["times"][-1] for s in complete]
    window0, window1 = max(firsts), min(lasts)
    in_window = sum(1 for s in complete for t in s["times"] if window0 < t <= window1)
    gaps_ms = [1000 * statistics.mean(b - a for a, b in zip(s["times"], s["times"][1:])) for s in complete
               if len(s["times"]) > 1]
    total_tokens = sum(len(s["times"]) for s in complete)
    result.update(
        aggregate_tokens_per_s=in_window / (window1 - window0) if window1 > window0 and in_window else None,
        window_s=window1 - window0, window_tokens=in_window,
        wall_tokens_per_s=total_tokens / (max(lasts) - start),
        wall_s=max(lasts) - start,
        decode_tokens_per_s=sum(len(s["times"]) - 1 for s in complete) / (max(lasts) - min(firsts))
        if max(lasts) > min(firsts) else None,
        ms_per_token_median=statistics.median(gaps_ms) if gaps_ms else None,
        ms_per_token_min=min(gaps_ms) if gaps_ms else None, ms_per_token_max=max(gaps_ms) if gaps_ms else None,
        first_token_s_median=statistics.median(f - s["start"] for f, s in zip(firsts, complete)),
        first_token_s_max=max(f - s["start"] for f, s in zip(firsts, complete)),
        start_spread_s=max(s["start"] for s in sessions) - start,
    )
    return result


def run_concurrency(n: int, args, swarm, model_dir: Path, rundir: Path, dtype_name: str) -> dict:
    processes = max(1, min(n, args.processes))
    per = [n // processes + (1 if i < n % processes else 0) for i in range(processes)]
    rundir.mkdir(parents=True, exist_ok=True)
    go_file = rundir / "go"
    go_file.unlink(missing_ok=True)
    clients: list[Client] = []
    began = time.perf_counter()
    try:
        seed = 1000
        for i, count in enumerate(per):
            spec = dict(initial_peers=swarm.initial_peers, model_dir=str(model_dir), device=args.device,
                        dtype=dtype_name, sessions=count, prompt_tokens=args.prompt_tokens,
                        new_tokens=args.new_tokens, seed=seed, vocab=PRESETS[args.preset]["vocab_size"],
                        go_file=str(go_file), barrier_timeout=args.client_timeout + 60,
                        run_timeout=args.run_timeout, threads=args.client_threads)
            seed += count
            clients.append(Client(i, spec, rundir / f"client{i}.log"))
        ready = wait_all(clients, READY_PREFIX, args.client_timeout, "ready")
        ready_s = time.perf_counter() - began
        tmp = rundir / "go.tmp"
        tmp.write_text(repr(time.time() + args.start_delay))
        tmp.rename(go_file)  # atomic: a client never reads a half-written start time
        outputs = wait_all(clients, RESULT_PREFIX, args.run_timeout + args.start_delay + 30, "finished")
        for c in clients:
            try:
                c.popen.wait(30)
            except subprocess.TimeoutExpired:
                pass
    finally:
        for c in clients:
            c.kill()  # whatever is left of each client's group (an exited client's p2p daemon, or all on error)
    sessions = [s for out in outputs for s in out["sessions"]]
    result = analyse(sessions, args.new_tokens)
    result.update(processes=processes, sessions_per_process=per, clients_ready_s=ready_s,
                  client_load_s=[r["load_s"] for r in ready], total_s=time.perf_counter() - began)
    return result


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--client":
        client_main(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda:0", help="the servers' and the clients' device")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 (cuda), float32 (cpu)")
    parser.add_argument("--workdir", default="/tmp/corolla-gpu-swarm", help="checkpoint and logs (local disk)")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 8, 32, 64], help="concurrencies to measure")
    parser.add_argument("--processes", type=int, default=8, help="most client processes (each runs N/P sessions)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", type=int, default=2, help="servers on the device, each a span of the layers")
    parser.add_argument("--server-threads", type=int, default=None, help="servers' torch CPU threads (--num-threads)")
    parser.add_argument("--client-threads", type=int, default=None, help="each client's torch CPU threads")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="extra server flags (last on the command line), e.g. --no-cuda-graphs")
    parser.add_argument("--server-timeout", type=float, default=300.0)
    parser.add_argument("--client-timeout", type=float, default=300.0, help="clients' load and warm-up")
    parser.add_argument("--run-timeout", type=float, default=300.0, help="one concurrency's generation")
    parser.add_argument("--start-delay", type=float, default=0.5, help="seconds between the start signal and start")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="skip concurrencies not yet started once this many seconds have passed")
    parser.add_argument("--json", default=None, help="default: $OUT/swarm_concurrency.json where $OUT is set")
    args = parser.parse_args()

    from corolla.launch import LocalSwarm

    began = time.perf_counter()
    on_cuda = args.device.startswith("cuda")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_cuda else "float32")]
    dtype_name = str(dtype).removeprefix("torch.")
    workdir = Path(args.workdir)
    json_path = args.json or (os.path.join(os.environ["OUT"], "swarm_concurrency.json") if os.environ.get("OUT")
                              else None)
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if on_cuda else "cpu"
    import transformers
    layers = PRESETS[args.preset]["num_hidden_layers"]
    bounds = [round(i * layers / args.servers) for i in range(args.servers + 1)]
    spans = list(zip(bounds[:-1], bounds[1:]))
    most = max(args.sessions)
    # Every session holds prompt + new tokens; the warm-ups (4 new tokens each) may overlap the previous N's closing
    # sessions; a 25% margin plus one prompt's worth per process for them.
    cache_tokens = math.ceil(1.25 * most * (args.prompt_tokens + args.new_tokens)
                             + args.processes * (args.prompt_tokens + 8)) + 256
    server_flags = ["--device", args.device, "--dtype", dtype_name, "--cache-tokens", str(cache_tokens),
                    "--max-batch-size", str(max(64, most)), "--max-sessions-per-peer", str(max(32, most))]
    report = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
              "preset": args.preset, "config": PRESETS[args.preset], "dtype": dtype_name, "spans": spans,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "processes": args.processes,
              "server_flags": server_flags + list(args.server_args), "results": {}}
    print(f"{device_name}, torch {torch.__version__}, transformers {transformers.__version__}; servers {spans} "
          f"{' '.join(report['server_flags'])}", flush=True)

    def save():
        if json_path:
            Path(json_path).write_text(json.dumps(report, indent=1))

    model_dir = write_checkpoint(workdir / f"llama-{args.preset}-random", args.preset, dtype,
                                 args.device if on_cuda else "cpu")
    name = f"concurrency-{time.strftime('%Y%m%d-%H%M%S')}"
    with LocalSwarm(workdir / name) as swarm:
        t0 = time.perf_counter()
        swarm.start_dht()
        servers = [swarm.start_server(model_dir, span, f"server{i}",
                                      server_flags + ["--throughput-cache", str(workdir / f"throughput-conc{i}.json")]
                                      + (["--num-threads", str(args.server_threads)] if args.server_threads else [])
                                      + list(args.server_args), wait=False)
                   for i, span in enumerate(spans)]
        for process in servers:
            swarm.wait_for_line(process, "ready:", args.server_timeout)
        report["servers_start_s"] = time.perf_counter() - t0
        print(f"swarm ready in {report['servers_start_s']:.0f} s (logs in {workdir / name})", flush=True)
        for n in args.sessions:
            elapsed = time.perf_counter() - began
            if args.deadline_s is not None and elapsed > args.deadline_s:
                print(f"[N={n}] skipped: {elapsed:.0f} s past the {args.deadline_s:.0f} s deadline", flush=True)
                report["results"][str(n)] = {"skipped": "deadline"}
                save()
                continue
            dead = [p.name for p in servers if not p.alive()]
            if dead:
                print(f"[N={n}] skipped: server(s) {dead} exited", flush=True)
                report["results"][str(n)] = {"skipped": f"servers exited: {dead}"}
                save()
                continue
            print(f"[N={n}] running ({elapsed:.0f} s in)", flush=True)
            try:
                r = run_concurrency(n, args, swarm, model_dir, workdir / name / f"n{n}", dtype_name)
            except Exception as e:  # keep the other concurrencies' figures
                import traceback
                traceback.print_exc()
                report["results"][str(n)] = {"error": repr(e)}
                save()
                continue
            report["results"][str(n)] = r
            agg = r.get("aggregate_tokens_per_s")
            print(f"[N={n}] {r['processes']} processes, {r['complete']}/{n} sessions complete"
                  + (f", {r['error_count']} errors e.g. {r['errors'][0]}" if r["error_count"] else "")
                  + (f"; aggregate {agg:.1f} tokens/s over {r['window_s']:.2f} s ({r['window_tokens']} tokens)"
                     if agg else "; no steady-state window")
                  + (f", wall {r['wall_tokens_per_s']:.1f} tokens/s, median {r['ms_per_token_median']:.1f} ms/token, "
                     f"first token median {r['first_token_s_median'] * 1000:.0f} ms, start spread "
                     f"{r['start_spread_s'] * 1000:.0f} ms, {r['total_s']:.0f} s" if r["complete"] else ""),
                  flush=True)
            save()

    results = report["results"]
    base = (results.get("1") or {}).get("aggregate_tokens_per_s")
    print(f"\n{device_name}; Llama {args.preset} shape, {dtype_name}, random weights; 2 servers on {args.device}; "
          f"greedy, prompt {args.prompt_tokens}, {args.new_tokens} new tokens; up to {args.processes} client processes")
    print("| sessions | processes | aggregate tokens/s | wall tokens/s | per-session ms/token | ratio to 1 session |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sessions:
        r = results.get(str(n), {})
        if "complete" not in r:
            print(f"| {n} | - | {r.get('skipped') or r.get('error', 'not run')} | | | |")
            continue
        agg = r.get("aggregate_tokens_per_s")
        ms = r.get("ms_per_token_median")
        print(f"| {n} | {r['processes']} | {f'{agg:.1f}' if agg else '-'} | {r.get('wall_tokens_per_s', 0):.1f} | "
              f"{f'{ms:.1f}' if ms else '-'} | {f'{agg / base:.2f}x' if agg and base else '-'} |")
        if agg and base:
            r["ratio_to_1"] = agg / base
    report["total_s"] = time.perf_counter() - began
    save()


if __name__ == "__main__":
    main()
