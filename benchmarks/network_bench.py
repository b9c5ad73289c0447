"""ms/token and bytes on the wire per token across homes, in one run, on a namespace internet (tests/network/netlab.py).

    public: 4 relays (`corolla dht --reachability public`, the first is the bootstrap peer) and server "direct"
    home1:  server "relayed" (behind NAT, --reachability private)
    home2:  server "throttled" (behind NAT, its uplink limited with tbf to --mbit)
    home3:  the client (behind NAT)

Each server holds every block of a small random Llama (hidden size --hidden, so that one token's activations weigh
what a mid-sized model's do). For each (server, wire format) a client session generates --short tokens (connection,
prompt), pauses, and then runs the decode steps up to --long alone; over those steps:
    ms/token    = their time / their number (best of --repeat sessions)
    bytes/token = bytes sent plus received on the server's link (its one hop to the client, or to the relay), read
                  from the kernel's interface counters of that link (mean of the sessions)

    sudo .venv/bin/python benchmarks/network_bench.py [--mbit 2] [--hidden 1024]

Needs root, iproute2 and nftables (`make netbench`). Numbers on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "network"))
sys.path.insert(0, str(ROOT))

from netlab import Host, Netlab, unavailable_reason  # noqa: E402

CLIENT_JOB = ROOT / "tests" / "network" / "client_job.py"


def make_model(path: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


def link_bytes(lab: Netlab, host: Host) -> int:
    """Bytes sent plus received on the host's link to the public segment (the router's WAN for a home)."""
    namespace, device = lab._wan(host)
    total = 0
    for counter in ("tx_bytes", "rx_bytes"):
        out = subprocess.run(["ip", "netns", "exec", namespace, "cat", f"/sys/class/net/{device}/statistics/{counter}"],
                             capture_output=True, text=True, timeout=10, check=True)
        total += int(out.stdout)
    return total


def run_client(lab: Netlab, client: Host, server_host: Host, model: Path, peers: list[str], server: str,
               short: int, long: int, wire: str, workdir: Path) -> tuple[float, float]:
    """One session: `short` tokens (connection, prompt), then the counters, then `long - short` decode steps alone.
    Returns (ms/token, bytes/token on the server's link) of those decode steps."""
    go = workdir / f"go-{time.monotonic_ns()}"
    argv = [sys.executable, str(CLIENT_JOB), str(model), "--initial-peers", *peers, "--tokens", str(long),
            "--pause-after", str(short), "--go-file", str(go), "--wire-format", wire, "--allowed-servers", server]
    process = subprocess.Popen(client.command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not line.startswith("paused"):
            raise RuntimeError(f"client failed before pausing:\n{process.communicate(timeout=60)[1][-3000:]}")
        before = link_bytes(lab, server_host)
        go.touch()
        stdout, stderr = process.communicate(timeout=300)
        moved = link_bytes(lab, server_host) - before
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    for line in stdout.splitlines():
        if line.startswith("result: "):
            result = json.loads(line.removeprefix("result: "))
            if len(result["tokens"]) != long:
                raise RuntimeError(f"generation stopped early ({len(result['tokens'])} tokens)")
            return result["rest_ms_per_token"], moved / (long - short)
    raise RuntimeError(f"client failed:\n{stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbit", type=float, default=2.0, help="the throttled uplink, Mbit/s")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=2, help="sessions per (server, wire format)")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        sys.exit(f"cannot build the namespace internet: {reason}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="corolla-netbench-"))
    model = make_model(workdir / f"llama-h{args.hidden}-l{args.layers}", args.hidden, args.layers)
    rows = []
    with Netlab() as lab:
        swarm = lab.swarm(workdir / "logs")
        try:
            relays = [lab.add_public(f"relay{i}") for i in range(4)]
            swarm.on(relays[0]).start_dht(extra_args=["--reachability", "public"])
            boot = list(swarm.initial_peers)
            others = [swarm.on(h).spawn(f"relay{i + 1}", ["dht", "--reachability", "public", "--initial-peers",
                                                           *boot]) for i, h in enumerate(relays[1:])]
            peers = boot + [swarm.wait_for_line(p, "initial peers:", 60).split(":", 1)[1].split()[0] for p in others]
            swarm.initial_peers = peers
            hosts = {"direct": lab.add_public("direct"), "relayed": lab.add_home("relayed"),
                     "throttled": lab.add_home("throttled", uplink_mbit=args.mbit)}
            client = lab.add_home("client")
            processes = {
                name: swarm.on(host).start_server(model, None, name, [
                    "--num-threads", "1", "--reachability", "public" if name == "direct" else "private"], wait=False)
                for name, host in hosts.items()}
            peer_ids = {}
            for name, process in processes.items():
                line = swarm.wait_for_line(process, "ready:", 300)
                peer_ids[name] = line.split(" as ")[1].split()[0]
            plan = [("direct", "native"), ("relayed", "native"), ("throttled", "native"), ("throttled", "float16"),
                    ("throttled", "bfloat16"), ("throttled", "int8")]
            for name, wire in plan:
                runs = [run_client(lab, client, hosts[name], model, peers[:1], peer_ids[name], args.short, args.long,
                                   wire, workdir) for _ in range(args.repeat)]
                ms = min(ms for ms, _ in runs)
                per_token = sum(moved for _, moved in runs) / len(runs)
                rows.append({"server": name, "wire": wire, "ms_per_token": round(ms, 2),
                             "bytes_per_token": round(per_token)})
                print(f"{name:>9}  {wire:>8}  {ms:8.2f} ms/token  {per_token:9.0f} bytes/token on its link",
                      flush=True)
        finally:
            swarm.close()
    base = {r["server"]: r["ms_per_token"] for r in rows if r["wire"] == "native"}
    print(f"\nrelayed / direct: {base['relayed'] / base['direct']:.2f}x;  throttled ({args.mbit:g} Mbit/s) / "
          f"direct: {base['throttled'] / base['direct']:.2f}x")
    throttled = {r["wire"]: r["ms_per_token"] for r in rows if r["server"] == "throttled"}
    print("on the throttled uplink, vs native float32: " + ", ".join(
        f"{wire} {throttled[wire] / throttled['native']:.2f}x" for wire in ("float16", "bfloat16", "int8")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
