"""Petals 2.2 and Corolla side by side, in one run, on the same model files (issue 8).

One invocation measures, one after the other on this machine:
  * plain transformers `generate` in this process (our .venv), and the same in the Petals venv
    (transformers 4.33, Petals' own pin) for reference;
  * Corolla swarms on 127.0.0.1: 2 servers, 3 servers, and 2 servers with an injected one-way delay on every
    message each server receives and every reply it sends (servers' `--debug-delay-ms`, default 10 and 50 ms);
  * a Petals 2.2.0.post1 swarm on 127.0.0.1: DHT + 2 servers started through the anchor's `loopback.py`
    (NAT port mapping off, 127.0.0.1 only) with the Petals venv's python, exactly as the anchor's run_swarm.sh
    does, measured by a client run in the Petals venv that uses the anchor's `bench_client.py` functions.

Model: the anchor's tiny-llama (`make_models.py`: hidden 512, 8 blocks, random weights, seed 0, float32), the
same files for every setup. Method (the anchor's): greedy, the anchor's 20-token prompt, 64 new tokens
timestamped by a streamer, decode ms/token = mean gap between tokens 2..64, first token = prefill of 20 + the
1st token; one 4-token warm-up, then the median of --runs runs. Prefill: a --prefill-tokens prompt (BOS +
random ids, fixed seed), time to the first generated token, median of --runs after a warm-up; tokens/s =
prompt length / that time. "tokens == local": the 64 greedy tokens and the prefill prompt's first 2 tokens
equal those of local transformers in this venv.

Processes of the Petals swarm are started in their own process groups and stopped by PID (SIGINT to the
leader, then SIGKILL to each remaining member of its group); every wait is bounded. Corolla's processes are
started and stopped by corolla.launch.LocalSwarm. Sockets of every swarm process are listed (`ss`) while the
swarm runs; any non-loopback address is reported.

    .venv/bin/python benchmarks/petals_compare.py [--runs 5] [--new-tokens 64] [--prefill-tokens 512]
        [--delays 10 50] [--anchor-dir ../shared/anchors/petals] [--petals-venv DIR] [--models DIR]
        [--json out.json]
    .venv/bin/python benchmarks/petals_compare.py --interleave 6     # decode only, Corolla and Petals alternating

Needs the anchor's Petals venv (`make bench-petals` makes it with the anchor's setup.sh). The anchor's model is
made with its make_models.py (Petals venv) when missing. Defaults: --anchor-dir from $COROLLA_PETALS_ANCHOR or
../shared/anchors/petals next to the repo; --petals-venv and --models under $ANCHORS (the anchor's own variable,
default ~/.cache/corolla-anchors).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Nothing above this line may need more than the standard library: this file also runs in the Petals venv
# (`_petals-client`), which has neither corolla nor transformers 5.

REPO = Path(__file__).resolve().parent.parent
ANCHORS_CACHE = Path(os.environ.get("ANCHORS", "~/.cache/corolla-anchors")).expanduser()
DEFAULT_ANCHOR_DIR = Path(os.environ.get("COROLLA_PETALS_ANCHOR", REPO.parent / "shared" / "anchors" / "petals"))
PETALS_PREFIX = "tiny-llama-hf"  # the anchor's DHT prefix for a local model folder (run_swarm.sh: NAME-llama-hf)
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# The Petals-venv side: `<petals-venv>/bin/python petals_compare.py _petals-client ...`


def petals_client_main(argv: list[str]) -> None:
    """Runs in the Petals venv. Uses the anchor's bench_client.py (its loopback guard, model loading, timed
    generate and warm-up + median method) on the given prompts, through the swarm or (--local) in-process."""
    parser = argparse.ArgumentParser(prog="petals_compare.py _petals-client")
    parser.add_argument("--anchor-dir", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--prefix")
    parser.add_argument("--peers")
    parser.add_argument("--local", action="store_true", help="plain transformers in this venv, no swarm")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--inputs", required=True, help="JSON {prompt: [ids], prefill: [ids]}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, args.anchor_dir)
    import bench_client as anchor  # noqa: E402  (the anchor's client, imported from where it is)
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    inputs = json.loads(Path(args.inputs).read_text())
    ids = torch.tensor([inputs["prompt"]])
    long_ids = torch.tensor([inputs["prefill"]])
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "anchor_prompt_ids": anchor.prompt_ids(args.model)[0].tolist()}
    if args.local:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    else:
        import hivemind
        import petals

        res.update(petals=petals.__version__, hivemind=hivemind.__version__)
        model, res["client_load_s"] = anchor.load_swarm_model(args)  # loopback.install() first, then Petals
    res["generation"] = anchor.bench_generation(model, ids, args)
    anchor.run_generate(model, long_ids, 2)  # warm-up, as for decode
    prefill = [anchor.run_generate(model, long_ids, 2) for _ in range(args.runs)]
    res["prefill"] = {"first_token_s": statistics.median(r["first_token_s"] for r in prefill),
                      "runs_first_token_s": [r["first_token_s"] for r in prefill], "tokens": prefill[0]["tokens"]}
    if not args.local:
        anchor.close_swarm_model(model)
    Path(args.out).write_text(json.dumps(res, indent=1))
    anchor._exit_now()  # stops this client's own children (DHT process, p2pd) by PID, exits at once


# ------------------------------------------------------------------------------------------------------------
# Processes (Petals side): own process group each, stopped by PID, every wait bounded


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


class Proc:
    def __init__(self, name: str, cmd: list[str], workdir: Path, env: dict):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "w") as log_file:
            self.popen = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env=env)
        self.pid = self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float, fail: str | None = None) -> re.Match:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern, re.MULTILINE)
        while time.monotonic() < deadline:
            match = regex.search(self.log())
            if match:
                return match
            if fail and re.search(fail, self.log(), re.MULTILINE):
                raise RuntimeError(f"{self.name} failed (/{fail}/ in {self.log_path}):\n{self.tail(8)}")
            if self.popen.poll() is not None:
                match = regex.search(self.log())
                if match:
                    return match
                raise RuntimeError(f"{self.name} exited (rc {self.popen.returncode}) before /{pattern}/; "
                                   f"{self.log_path} ends with:\n{self.tail()}")
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: no /{pattern}/ within {timeout:.0f} s; {self.log_path} ends with:\n"
                           f"{self.tail()}")

    def stop(self, grace: float = 20) -> list[int]:
        """SIGINT to the leader (Petals/hivemind shut down gracefully), wait, then SIGKILL, one PID at a time,
        whatever is left in its process group. Returns the PIDs that had to be killed."""
        if self.popen.poll() is None:
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        killed = []
        for pid in group_members(self.pid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 10  # SIGKILLed members disappear once reaped
        while group_members(self.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        return killed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def netcheck(pids: set[int]) -> dict:
    """TCP/UDP sockets of these processes (ss); any address that is not loopback is listed."""
    try:
        out = subprocess.run(["ss", "-tunapH"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": repr(e)}
    lines = [line for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]
    bad = set()
    for line in lines:
        for addr in line.split()[4:6]:
            if addr in ("*:*", "0.0.0.0:*", "[::]:*"):  # the peer column of a listening socket
                continue
            host = addr.rsplit(":", 1)[0].strip("[]").split("%")[0]
            host = host[7:] if host.startswith("::ffff:") else host
            if not (host.startswith("127.") or host == "::1"):
                bad.add(addr)
    return {"sockets": len(lines), "non_loopback": sorted(bad)}


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat[stat.rfind(")") + 2:].split()[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# ------------------------------------------------------------------------------------------------------------
# Measurements


def run_petals_client(args, petals_py: Path, model_dir: Path, inputs_path: Path, workdir: Path, env: dict,
                      name: str, extra: list[str]) -> dict:
    out = workdir / f"{name}.json"
    client = Proc(name, [str(petals_py), str(Path(__file__).resolve()), "_petals-client", "--anchor-dir",
                         str(args.anchor_dir), "--model", str(model_dir), "--runs", str(args.runs), "--new-tokens",
                         str(args.new_tokens), "--inputs", str(inputs_path), "--out", str(out), *extra,
                         *(["--threads", str(args.client_threads)] if args.client_threads else [])],
                  workdir, env)
    try:
        client.popen.wait(args.client_timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{name} did not finish within {args.client_timeout} s; {client.log_path} ends with:\n"
                           f"{client.tail()}")
    finally:
        client.stop(grace=10)
    if not out.is_file():
        raise RuntimeError(f"{name} failed (rc {client.popen.returncode}); {client.log_path} ends with:\n"
                           f"{client.tail()}")
    return json.loads(out.read_text())


def measure_petals_swarm(args, petals_py: Path, model_dir: Path, num_blocks: int, spans, inputs_path: Path,
                         workdir: Path, env: dict, rounds: int = 1, between=None) -> dict:
    """Start the Petals swarm, run the Petals client `rounds` times (a fresh client process each time), calling
    `between(round)` before each client run (interleaved measurements of something else), stop the swarm.
    Returns the first client run's result, the others under "rounds" (all of them)."""
    loopback = str(args.anchor_dir / "loopback.py")
    bench = str(args.anchor_dir / "bench_client.py")
    procs: list[Proc] = []
    result: dict = {}
    try:
        port = free_port()
        dht = Proc("petals-dht", [str(petals_py), loopback, "dht", "--host_maddrs", f"/ip4/127.0.0.1/tcp/{port}",
                                  "--identity_path", str(workdir / "dht.id")], workdir, env)
        procs.append(dht)
        dht.wait_for("Running a DHT instance", 90)
        peer = dht.wait_for(rf"/ip4/127\.0\.0\.1/tcp/{port}/p2p/[A-Za-z0-9]+", 10).group(0)
        # the anchor's watcher: reports when every block has a fresh ONLINE record (started before the servers)
        watcher = Proc("petals-watch", [str(petals_py), bench, "wait-online", "--prefix", PETALS_PREFIX, "--peers",
                                        peer, "--blocks", f"0:{num_blocks}", "--timeout", str(args.start_timeout)],
                       workdir, env)
        procs.append(watcher)
        watcher.wait_for("^WATCHING", 90)
        began = time.monotonic()
        servers = []
        for i, (start, end) in enumerate(spans):
            server = Proc(f"petals-server{i}", [
                str(petals_py), loopback, "server", str(model_dir), "--dht_prefix", PETALS_PREFIX,
                "--initial_peers", peer, "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
                "--identity_path", str(workdir / f"server{i}.id"), "--block_indices", f"{start}:{end}",
                "--torch_dtype", "float32", "--device", "cpu", "--throughput", "100"], workdir, env)
            procs.append(server)
            servers.append(server)
        for server in servers:
            server.wait_for(r"\[INFO\] Started$", args.start_timeout, fail=r"^terminate called")
        if watcher.wait_for("^(ONLINE|TIMEOUT)", args.start_timeout).group(1) != "ONLINE":
            raise RuntimeError("Petals servers were not ONLINE in the DHT in time")
        result["servers_online_s"] = time.monotonic() - began
        watcher.stop(grace=10)
        pids = set()
        for proc in procs:
            pids.update(group_members(proc.pid))
        result["netcheck"] = netcheck(pids)
        log(f"  Petals swarm up ({result['servers_online_s']:.1f} s); sockets: {result['netcheck']}")
        result["rounds"] = []
        for index in range(rounds):
            if between is not None:
                between(index)
            result["rounds"].append(run_petals_client(args, petals_py, model_dir, inputs_path, workdir, env,
                                                      f"petals-client-{index}",
                                                      ["--prefix", PETALS_PREFIX, "--peers", peer]))
        result.update(result["rounds"][0])
    finally:
        for proc in reversed(procs):
            killed = proc.stop()
            if killed:
                log(f"  {proc.name}: SIGKILLed left-over PIDs {killed}")
        left = [pid for proc in procs for pid in group_members(proc.pid)]
        result["left_over_pids"] = left
        if left:
            log(f"  WARNING: processes still alive after stopping the Petals swarm: {left}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anchor-dir", type=Path, default=DEFAULT_ANCHOR_DIR,
                        help="the Petals anchor folder (setup.sh, make_models.py, loopback.py, bench_client.py); "
                             "env COROLLA_PETALS_ANCHOR (default: %(default)s)")
    parser.add_argument("--petals-venv", type=Path, default=ANCHORS_CACHE / "petals-venv",
                        help="venv made by the anchor's setup.sh (default: %(default)s)")
    parser.add_argument("--models", type=Path, default=ANCHORS_CACHE / "models",
                        help="the anchor's models folder; tiny-llama is made there if missing (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--servers", type=int, nargs="+", default=[2, 3], help="Corolla swarm sizes")
    parser.add_argument("--delays", type=float, nargs="*", default=[10.0, 50.0],
                        help="Corolla 2 servers with this --debug-delay-ms (one-way, per message)")
    parser.add_argument("--server-threads", type=int, default=1, help="Corolla servers' --num-threads (as "
                                                                       "swarm_latency.py)")
    parser.add_argument("--client-threads", type=int, default=None,
                        help="torch threads of the clients and local runs, both venvs (default: torch's choice, "
                             "as the anchor)")
    parser.add_argument("--no-petals", action="store_true", help="skip everything that needs the Petals venv")
    parser.add_argument("--petals-attempts", type=int, default=2, help="start the Petals swarm again (fresh "
                                                                        "processes) if an attempt fails")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds, per swarm start")
    parser.add_argument("--client-timeout", type=float, default=900, help="seconds, per Petals client run")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="instead of the table: Corolla (2 servers) and Petals (2 servers) both kept up, their "
                             "decode measured in alternating order for ROUNDS rounds (--runs runs each), ratio per "
                             "round: load bursts on a shared machine then hit both alike")
    parser.add_argument("--json", default=None, help="write every figure here")
    args = parser.parse_args()
    args.anchor_dir = args.anchor_dir.resolve()

    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from swarm_latency import time_generation  # noqa: E402  (the same timing code as `make bench`)

    from corolla import AutoDistributedModelForCausalLM
    from corolla.launch import LocalSwarm, split_blocks

    if args.client_threads:
        torch.set_num_threads(args.client_threads)

    petals_py = args.petals_venv / "bin" / "python"
    model_dir = args.models / "tiny-llama"
    env = {**os.environ, **OFFLINE_ENV}
    if not args.no_petals:
        for need in ("setup.sh", "make_models.py", "loopback.py", "bench_client.py"):
            if not (args.anchor_dir / need).is_file():
                sys.exit(f"no {need} in {args.anchor_dir} (--anchor-dir / COROLLA_PETALS_ANCHOR)")
        if not petals_py.is_file():
            sys.exit(f"no Petals venv at {args.petals_venv}: run `make bench-petals` or "
                     f"VENV={args.petals_venv} {args.anchor_dir}/setup.sh")
    if not (model_dir / "config.json").is_file():
        if args.no_petals:
            sys.exit(f"no model at {model_dir}: run the anchor's make_models.py with the Petals venv")
        log(f"making the anchor's tiny-llama in {args.models} (its make_models.py, Petals venv) ...")
        subprocess.run([str(petals_py), str(args.anchor_dir / "make_models.py"), "--out", str(args.models),
                        "--only", "tiny"], check=True, timeout=600, env=env)

    sys.path.insert(0, str(args.anchor_dir))
    from bench_client import PROMPT  # noqa: E402  (the anchor's prompt text)

    load_before = load_note()
    log(f"load average before: {load_before}")
    workdir = Path(tempfile.mkdtemp(prefix="corolla-petals-compare-"))
    config = json.loads((model_dir / "config.json").read_text())
    num_blocks = config["num_hidden_layers"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(1)
    prefill_ids = torch.cat([torch.tensor([[1]]), torch.randint(3, config["vocab_size"],
                                                               (1, args.prefill_tokens - 1), generator=generator)], 1)
    inputs_path = workdir / "inputs.json"
    inputs_path.write_text(json.dumps({"prompt": prompt_ids[0].tolist(), "prefill": prefill_ids[0].tolist()}))
    n_prompt = prompt_ids.shape[1]
    rows: list[dict] = []
    failures: list[str] = []  # Petals swarm attempts that failed (reported, then the next attempt)

    def add_row(name: str, kind: str, decode_ms: float, first_s: float, prefill_s: float, tokens: list[int],
                prefill_tokens: list[int], **extra) -> dict:
        row = {"setup": name, "kind": kind, "ms_per_token": decode_ms, "first_token_s": first_s,
               "prefill_first_token_s": prefill_s, "prefill_tokens_per_s": args.prefill_tokens / prefill_s,
               "tokens": tokens, "prefill_tokens": prefill_tokens, "load_avg": load_note(), **extra}
        rows.append(row)
        log(f"  {name}: {decode_ms:.2f} ms/token, first token {first_s * 1000:.1f} ms, prefill "
            f"{args.prefill_tokens} in {prefill_s * 1000:.0f} ms (load {row['load_avg']})")
        return row

    def our_measure(model) -> tuple:
        ms, first, out = time_generation(model, prompt_ids, args.new_tokens, args.runs)
        _, prefill_first, prefill_out = time_generation(model, prefill_ids, 2, args.runs)
        return ms, first, prefill_first, out[n_prompt:], prefill_out[args.prefill_tokens:]

    def petals_row(name: str, kind: str, res: dict, **extra) -> dict:
        gen = res["generation"]
        return add_row(name, kind, gen["median"]["ms_per_token_decode"], gen["median"]["first_token_s"],
                       res["prefill"]["first_token_s"], gen["tokens"], res["prefill"]["tokens"],
                       versions={k: res.get(k) for k in ("torch", "transformers", "petals", "hivemind")},
                       anchor_prompt_ids_equal=res["anchor_prompt_ids"] == prompt_ids[0].tolist(), **extra)

    def corolla(servers: int, delay: float) -> None:
        name = f"Corolla, {servers} servers" + (f", +{delay:g} ms/msg" if delay else "")
        log(f"{name} ...")
        extra = ["--num-threads", str(args.server_threads)] + (["--debug-delay-ms", str(delay)] if delay else [])
        with LocalSwarm(workdir / f"corolla-{servers}-{delay:g}") as swarm:
            swarm.start_dht()
            swarm.start_servers(model_dir, split_blocks(num_blocks, servers), extra, timeout=args.start_timeout)
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
            try:
                measured = our_measure(model)
                pids = {os.getpid()} | descendants(os.getpid())
                for process in swarm.processes:
                    pids.update(group_members(process.pid))
                net = netcheck(pids)
            finally:
                model.close()
        add_row(name, "corolla", *measured, servers=servers, delay_ms=delay, netcheck=net)

    if args.interleave:
        interleaved(args, petals_py, model_dir, num_blocks, prompt_ids, inputs_path, workdir, env, load_before)
        return
    try:
        log("local transformers (this venv) ...")
        local = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        add_row(f"local transformers {transformers.__version__}", "local", *our_measure(local))
        del local
        if not args.no_petals:
            log("local transformers (Petals venv) ...")
            res = run_petals_client(args, petals_py, model_dir, inputs_path, workdir, env, "petals-venv-local",
                                    ["--local"])
            petals_row(f"local transformers {res['transformers']} (Petals venv)", "local-petals-venv", res)
        corolla(2, 0.0)
        if not args.no_petals:
            for attempt in range(1, args.petals_attempts + 1):
                log(f"Petals, 2 servers (attempt {attempt}) ...")
                attempt_dir = workdir / f"petals-{attempt}"
                attempt_dir.mkdir()
                try:
                    res = measure_petals_swarm(args, petals_py, model_dir, num_blocks, split_blocks(num_blocks, 2),
                                               inputs_path, attempt_dir, env)
                except RuntimeError as e:
                    log(f"  Petals attempt {attempt} failed: {e}")
                    failures.append(f"attempt {attempt}: {str(e).splitlines()[0]}")
                    continue
                petals_row("Petals 2.2, 2 servers", "petals", res, servers=2, netcheck=res["netcheck"],
                           left_over_pids=res["left_over_pids"], client_load_s=res.get("client_load_s"),
                           attempt=attempt)
                break
        for servers in args.servers:
            if servers != 2:
                corolla(servers, 0.0)
        for delay in args.delays:
            corolla(2, delay)
    finally:
        load_after = load_note()
        log(f"load average after: {load_after}; logs in {workdir}")

    report(args, rows, load_before, load_after, n_prompt)
    for failure in failures:
        print(f"  Petals swarm {failure}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model_dir": str(model_dir), "prompt_ids": prompt_ids[0].tolist(), "runs": args.runs,
            "new_tokens": args.new_tokens, "prefill_tokens": args.prefill_tokens,
            "server_threads": args.server_threads, "client_threads": torch.get_num_threads(),
            "load_avg_before": load_before, "load_avg_after": load_after, "cores": os.cpu_count(),
            "torch": torch.__version__, "transformers": transformers.__version__, "rows": rows,
            "petals_failed_attempts": failures}, indent=1))


def interleaved(args, petals_py, model_dir, num_blocks, prompt_ids, inputs_path, workdir, env, load_before) -> None:
    """--interleave: both 2-server swarms up; each round measures Corolla and Petals (order alternating)."""
    from swarm_latency import time_generation  # (main put benchmarks/ on the path)

    from corolla import AutoDistributedModelForCausalLM
    from corolla.launch import LocalSwarm, split_blocks

    n_prompt = prompt_ids.shape[1]
    corolla_rounds: list[dict] = []
    with LocalSwarm(workdir / "corolla-interleaved") as swarm:
        swarm.start_dht()
        swarm.start_servers(model_dir, split_blocks(num_blocks, 2), ["--num-threads", str(args.server_threads)],
                            timeout=args.start_timeout)
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        try:
            def measure_corolla(index: int) -> None:
                ms, first, out = time_generation(model, prompt_ids, args.new_tokens, args.runs)
                corolla_rounds.append({"ms_per_token": ms, "first_token_s": first, "tokens": out[n_prompt:],
                                       "load_avg": load_note()})
                log(f"  round {index}: Corolla {ms:.2f} ms/token")

            def before_petals(index: int) -> None:
                # Corolla first in even rounds, after the Petals client in odd ones: C0 P0 P1 C1 C2 P2 P3 C3 ...
                if index % 2 == 0:
                    if index > 0:
                        measure_corolla(index - 1)
                    measure_corolla(index)

            log("Petals swarm, interleaved with Corolla ...")
            petals = measure_petals_swarm(args, petals_py, model_dir, num_blocks, split_blocks(num_blocks, 2),
                                          inputs_path, workdir, env, rounds=args.interleave, between=before_petals)
            if args.interleave % 2 == 0:
                measure_corolla(args.interleave - 1)  # the last round's Corolla turn, after its Petals client
        finally:
            model.close()
    load_after = load_note()
    petals_ms = [r["generation"]["median"]["ms_per_token_decode"] for r in petals["rounds"]]
    ratios = [c["ms_per_token"] / p for c, p in zip(corolla_rounds, petals_ms)]
    same = all(c["tokens"] == r["generation"]["tokens"] for c, r in zip(corolla_rounds, petals["rounds"]))
    print(f"\nCorolla and Petals 2.2, 2 servers each, both swarms up, {args.interleave} rounds in alternating order "
          f"(Corolla first in even rounds); each figure the median of {args.runs} runs of {args.new_tokens} tokens "
          f"(the anchor's method). Load average before {load_before}, after {load_after} ({os.cpu_count()} cores).")
    print(f"{'round':>5} {'Corolla ms/token':>17} {'Petals ms/token':>16} {'Corolla / Petals':>17}")
    for index, (c, p, r) in enumerate(zip(corolla_rounds, petals_ms, ratios)):
        print(f"{index:>5} {c['ms_per_token']:>17.2f} {p:>16.2f} {r:>16.2f}x")
    print(f"median: Corolla {statistics.median(c['ms_per_token'] for c in corolla_rounds):.2f}, Petals "
          f"{statistics.median(petals_ms):.2f} ms/token; ratio median {statistics.median(ratios):.2f}x, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}x, {sum(r <= 0.5 for r in ratios)}/{len(ratios)} rounds at most 0.5x; "
          f"greedy tokens equal between the two in every round: {'yes' if same else 'NO'}; Petals sockets: "
          f"{petals['netcheck']}")
    if petals.get("left_over_pids"):
        print(f"  Petals processes left over: {petals['left_over_pids']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "mode": "interleave", "rounds": args.interleave, "runs": args.runs, "new_tokens": args.new_tokens,
            "load_avg_before": load_before, "load_avg_after": load_after, "corolla": corolla_rounds,
            "petals_ms_per_token": petals_ms, "ratios": ratios, "tokens_equal": same}, indent=1))


def report(args, rows: list[dict], load_before: str, load_after: str, n_prompt: int) -> None:
    local = next(r for r in rows if r["kind"] == "local")
    petals = next((r for r in rows if r["kind"] == "petals"), None)
    base2 = next((r for r in rows if r["kind"] == "corolla" and r["servers"] == 2 and not r["delay_ms"]), None)

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f}x" if b else "-"

    import torch

    print(f"\ntiny-llama of the Petals anchor (hidden 512, 8 blocks, random weights), float32, CPU, loopback; "
          f"prompt {n_prompt} tokens, {args.new_tokens} new, median of {args.runs}; prefill prompt "
          f"{args.prefill_tokens} tokens; {torch.get_num_threads()} torch threads in the clients, "
          f"{args.server_threads} in Corolla's servers. Ratios are time ratios (>1 = slower). "
          f"Load average before {load_before}, after {load_after} ({os.cpu_count()} cores).")
    header = (f"{'setup':<44} {'ms/token':>8} {'1st tok':>8} {'prefill':>8} {'prefill':>8} {'decode':>7} "
              f"{'decode':>7} {'prefill':>7} {'prefill':>7} {'tokens':>7}")
    header2 = (f"{'':<44} {'':>8} {'ms':>8} {'ms':>8} {'tok/s':>8} {'/local':>7} {'/Petals':>7} {'/local':>7} "
               f"{'/Petals':>7} {'==local':>7}")
    print(header)
    print(header2)
    for r in rows:
        same = r["tokens"] == local["tokens"] and r["prefill_tokens"] == local["prefill_tokens"]
        vs_petals = r["kind"] == "corolla" and not r.get("delay_ms")
        print(f"{r['setup']:<44} {r['ms_per_token']:>8.2f} {r['first_token_s'] * 1000:>8.1f} "
              f"{r['prefill_first_token_s'] * 1000:>8.0f} {r['prefill_tokens_per_s']:>8.0f} "
              f"{ratio(r['ms_per_token'], local['ms_per_token']):>7} "
              f"{ratio(r['ms_per_token'], petals['ms_per_token'] if petals and vs_petals else None):>7} "
              f"{ratio(r['prefill_first_token_s'], local['prefill_first_token_s']):>7} "
              f"{ratio(r['prefill_first_token_s'], petals['prefill_first_token_s'] if petals and vs_petals else None):>7} "
              f"{'yes' if same else 'NO':>7}")
    notes = []
    own_local = next((r for r in rows if r["kind"] == "local-petals-venv"), None)
    if petals and own_local:
        notes.append(f"Petals / local transformers of its own venv: decode "
                     f"{petals['ms_per_token'] / own_local['ms_per_token']:.2f}x, prefill "
                     f"{petals['prefill_first_token_s'] / own_local['prefill_first_token_s']:.2f}x")
    if base2:
        for r in rows:
            if r["kind"] == "corolla" and r.get("delay_ms"):
                added = r["ms_per_token"] - base2["ms_per_token"]
                notes.append(f"+{r['delay_ms']:g} ms per message: +{added:.1f} ms/token over Corolla 2 servers = "
                             f"{added / r['delay_ms']:.2f} one-way delays per token")
    for r in rows:
        net = r.get("netcheck")
        if net is not None:
            notes.append(f"{r['setup']}: {net.get('sockets')} sockets, non-loopback: "
                         f"{', '.join(net.get('non_loopback') or []) or 'none'}")
        if r.get("anchor_prompt_ids_equal") is False:
            notes.append(f"{r['setup']}: the anchor's tokenizer gives other prompt ids (the same ids were used)")
        if r.get("left_over_pids"):
            notes.append(f"{r['setup']}: processes left over: {r['left_over_pids']}")
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_petals-client":
        petals_client_main(sys.argv[2:])
    else:
        sys.exit(main())
