"""Interleaved A/B of swarm decode latency between git revisions (or the working tree), on a shared machine.

Each variant gets its own local swarm (2 servers, `--num-threads 1`) and client process, started once; then every
round runs one greedy generation on each variant, alternating the order, so background load hits all variants
alike. Reports per-variant medians, the per-round paired difference against the first variant, and the CPU time
per token of all the variant's swarm processes (client, servers, p2p daemons).

    .venv/bin/python benchmarks/ab_latency.py a23c14e HEAD --rounds 10
    .venv/bin/python benchmarks/ab_latency.py HEAD HEAD:CLIENT_THREADS=1      # REV:VAR=VALUE sets an env variable
    .venv/bin/python benchmarks/ab_latency.py WORKTREE:CLIENT_LAYOUT=column WORKTREE:CLIENT_LAYOUT=rowdot
    .venv/bin/python benchmarks/ab_latency.py a23c14e HEAD --prompt-tokens 512 --new-tokens 2   # prefill

Model and method as benchmarks/swarm_latency.py (tiny-llama, 20-token prompt, 64 new tokens, ms/token = mean gap
between tokens 2..64; first token = time from the generate call to the first new token, so with a long prompt it
measures the prefill). The client process does no torch work before the swarm client, as a user's would.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(model_dir: Path, new_tokens: int, prompt_tokens: int) -> None:
    """Runs in a variant's process: a swarm and a client from that variant's code; one generation per stdin line."""
    import psutil
    import torch
    from swarm_latency import TimingStreamer

    from corolla import AutoDistributedModelForCausalLM
    from corolla.launch import LocalSwarm, split_blocks

    if os.environ.get("CLIENT_THREADS"):
        torch.set_num_threads(int(os.environ["CLIENT_THREADS"]))
    torch.manual_seed(1)
    input_ids = torch.cat([torch.tensor([[1]]), torch.randint(3, 32000, (1, prompt_tokens - 1))], dim=1)

    def cpu_seconds() -> float:
        total = 0.0
        for process in [psutil.Process()] + psutil.Process().children(recursive=True):
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def generate(model, n):
        streamer = TimingStreamer()
        began = time.perf_counter()
        out = model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer)
        gaps = [b - a for a, b in zip(streamer.times, streamer.times[1:])]
        return 1000 * statistics.mean(gaps), 1000 * (streamer.times[0] - began), out[0].tolist()

    with LocalSwarm(tempfile.mkdtemp(prefix="corolla-ab-")) as swarm:
        swarm.start_dht()
        server_args = json.loads(os.environ.get("SERVER_ARGS", '["--num-threads", "1"]'))
        swarm.start_servers(model_dir, split_blocks(8, 2), server_args)
        client_config = {}
        if os.environ.get("CLIENT_LAYOUT"):  # the LM head's weight layout (ClientConfig.weight_layout)
            from corolla.client.config import ClientConfig
            client_config["client_config"] = ClientConfig(weight_layout=os.environ["CLIENT_LAYOUT"])
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                **client_config)
        generate(model, 4)  # warm-up: routes, connections
        import corolla
        if not corolla.__file__.startswith(os.environ["PYTHONPATH"]):
            raise SystemExit(f"imported {corolla.__file__}, not the variant's tree")
        print("ready", flush=True)
        for _ in sys.stdin:
            before = cpu_seconds()
            ms, first_ms, tokens = generate(model, new_tokens)
            cpu = (cpu_seconds() - before) / new_tokens * 1000
            print(json.dumps({"ms": ms, "first_ms": first_ms, "cpu": cpu, "tokens": tokens}), flush=True)
        model.close()


def checkout(rev: str, into: Path) -> Path:
    """A copy of revision `rev` (or of the working tree for "WORKTREE")."""
    if rev == "WORKTREE":
        return ROOT
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="REV[:VAR=VALUE...] (REV: a git revision or WORKTREE)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=20)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.worker:
        return worker(Path(args.worker), args.new_tokens, args.prompt_tokens)
    if not args.variants:
        parser.error("name at least one variant")

    from swarm_latency import make_model

    workdir = Path(tempfile.mkdtemp(prefix="corolla-ab-"))
    model_dir = make_model(workdir / "tiny-llama")
    processes = []
    for index, spec in enumerate(args.variants):
        rev, *settings = spec.split(":")
        tree = checkout(rev, workdir / f"tree{index}")
        env = {**os.environ, "PYTHONPATH": str(tree), **dict(s.split("=", 1) for s in settings)}
        log = open(workdir / f"variant{index}.log", "w")
        # cwd = the variant's tree: servers start with `python -m corolla.cli`, which imports from the cwd first.
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(model_dir),
                                    "--new-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens)],
                                   env=env, cwd=tree, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        processes.append((spec, process))
    for spec, process in processes:
        if process.stdout.readline().strip() != "ready":
            raise SystemExit(f"variant {spec} did not start; see {workdir}/variant*.log")
    ms = {spec: [] for spec, _ in processes}
    first_ms = {spec: [] for spec, _ in processes}
    cpu = {spec: [] for spec, _ in processes}
    tokens = {}
    for round_ in range(args.rounds):
        for spec, process in processes if round_ % 2 == 0 else processes[::-1]:
            process.stdin.write("run\n")
            process.stdin.flush()
            result = json.loads(process.stdout.readline())
            ms[spec].append(result["ms"])
            first_ms[spec].append(result["first_ms"])
            cpu[spec].append(result["cpu"])
            tokens.setdefault(spec, result["tokens"])
        print(f"round {round_}: " + "  ".join(f"{spec}={values[-1]:.2f}" for spec, values in ms.items()), flush=True)
    for _, process in processes:
        process.stdin.close()
        process.wait(60)
    first = args.variants[0]
    print(f"\n{'variant':<40} {'median ms/token':>16} {'min':>7} {'CPU ms/token':>13} {'paired diff':>12} "
          f"{'rounds faster':>14} {'first token ms':>15} {'paired diff':>12} {'same tokens':>12}")
    for spec in ms:
        diffs = [b - a for a, b in zip(ms[first], ms[spec])]
        first_diffs = [b - a for a, b in zip(first_ms[first], first_ms[spec])]
        print(f"{spec:<40} {statistics.median(ms[spec]):>16.2f} {min(ms[spec]):>7.2f} "
              f"{statistics.median(cpu[spec]):>13.2f} {statistics.median(diffs):>+12.2f} "
              f"{sum(d < 0 for d in diffs):>8}/{len(diffs):<5} {statistics.median(first_ms[spec]):>15.1f} "
              f"{statistics.median(first_diffs):>+12.1f} {str(tokens[spec] == tokens[first]):>12}")


if __name__ == "__main__":
    sys.exit(main())
