"""A swarm across homes on a namespace internet (netlab.py): servers behind NAT routers that forward nothing in,
reached through libp2p relays run by the public peers; slow uplinks, cut links and a dying bootstrap peer.

    public: relay0 (the bootstrap peer), relay1..relay4 (`corolla dht --reachability public`: libp2p reserves a
            relay slot at once only with four candidates, with fewer it waits 3 minutes; five, so that four are left
            when the bootstrap peer dies)
    home1: server A, blocks 0:3     home3: server C, blocks 0:3 (A's replica)
    home2: server B, blocks 3:5     home4: the client (and `corolla health`)

Every client runs as its own process in home4 (client_job.py) and is compared with plain transformers.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netlab import Host, Netlab, NetSwarm, unavailable_reason  # noqa: E402

REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"no namespace internet here: {REASON}")

OUTPUT_DIR = Path(__file__).resolve().parents[2] / "test-output" / "network"
CLIENT_JOB = Path(__file__).resolve().parent / "client_job.py"
PROMPT = [1, 5, 9, 14, 3, 7]
TOKENS = 8
SERVER_ARGS = ["--num-threads", "1", "--reachability", "private"]


@dataclass
class Homes:
    lab: Netlab
    swarm: NetSwarm
    relays: list[Host]
    peers: list[str]  # the relays' multiaddrs (initial peers)
    client: Host
    servers: dict[str, tuple[object, Host]] = field(default_factory=dict)  # name -> (process, host)
    peer_ids: dict[str, str] = field(default_factory=dict)  # name -> peer id

    def name_of(self, peer_id: str) -> str:
        return {v: k for k, v in self.peer_ids.items()}[peer_id]


def _peer_of(process) -> str:
    return process.log().split("ready: ")[1].split(" as ")[1].split()[0]


@pytest.fixture(scope="module")
def homes(tiny_llama):
    lab = Netlab()
    swarm = lab.swarm(OUTPUT_DIR)
    try:
        relays = [lab.add_public(f"relay{i}") for i in range(5)]
        swarm.on(relays[0]).start_dht(extra_args=["--reachability", "public"])
        boot = list(swarm.initial_peers)
        others = [swarm.on(host).spawn(f"relay{i + 1}", ["dht", "--reachability", "public", "--initial-peers",
                                                          *boot]) for i, host in enumerate(relays[1:])]
        peers = boot + [swarm.wait_for_line(p, "initial peers:", 60).split(":", 1)[1].split()[0] for p in others]
        swarm.initial_peers = peers
        world = Homes(lab, swarm, relays, peers, client=None)  # type: ignore[arg-type]
        hosts = {name: lab.add_home(f"home{i + 1}") for i, name in enumerate("ABC")}
        world.client = lab.add_home("home4")
        spans = {"A": (0, 3), "B": (3, 5), "C": (0, 3)}
        for name, host in hosts.items():
            world.servers[name] = (swarm.on(host).start_server(tiny_llama, spans[name], f"server{name}", SERVER_ARGS,
                                                               wait=False), host)
        for name, (process, _) in world.servers.items():
            swarm.wait_for_line(process, "ready:", 180)
            world.peer_ids[name] = _peer_of(process)
        yield world
    finally:
        swarm.close()
        lab.close()


@pytest.fixture(scope="module")
def expected(reference):
    import torch

    out = reference.generate(torch.tensor([PROMPT]), max_new_tokens=TOKENS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


def run_client(world: Homes, model: Path, *args: str, peers: list[str] | None = None, timeout: float = 120) -> dict:
    argv = [sys.executable, str(CLIENT_JOB), str(model), "--initial-peers", *(peers or world.peers[:1]),
            "--tokens", str(TOKENS), "--prompt-ids", *map(str, PROMPT), *args]
    done = subprocess.run(world.client.command(argv), capture_output=True, text=True, timeout=timeout)
    return _result(done.stdout, done.stderr)


def _result(stdout: str, stderr: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("result: "):
            return json.loads(line.removeprefix("result: "))
    notes = "\n".join(line for line in stderr.splitlines() if " corolla." in line)
    raise AssertionError(f"the client gave no result; its log:\n{notes[-4000:]}\n{stderr[-2000:]}")


def health(world: Homes, model: Path, peers: list[str] | None = None) -> dict:
    argv = [sys.executable, "-m", "corolla.cli", "health", str(model), "--json", "--initial-peers",
            *(peers or world.peers[:1]), "--rtt-timeout", "5"]
    done = subprocess.run(world.client.command(argv), capture_output=True, text=True, timeout=90)
    assert done.stdout.strip().startswith("{"), done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout)


def test_nat_servers_serve_through_relays_exactly(homes, tiny_llama, expected):
    """Three servers behind NAT, a client behind NAT: the tokens are plain transformers' and every server on the
    route is reached through a relay (the health map says so, with a measured round trip)."""
    result = run_client(homes, tiny_llama)
    assert result["tokens"] == expected
    assert result["failed"] == []
    assert {homes.name_of(peer) for peer in result["routes"][0]} in ({"A", "B"}, {"C", "B"})
    state = health(homes, tiny_llama)
    seen = {homes.name_of(s["peer_id"]): s for s in state["servers"]}
    assert set(seen) == {"A", "B", "C"}
    for name, server in seen.items():
        assert server["reached"] == "relayed", (name, server)
        assert server["rtt_ms"] is not None and server["rtt_ms"] > 0


@pytest.mark.parametrize("slow", ["C", "A"])
def test_routing_avoids_a_throttled_uplink(homes, tiny_llama, expected, slow):
    """One replica's uplink throttled to 1 Mbit/s: the client's padded pings see it and route through the other."""
    fast = {"A": "C", "C": "A"}[slow]
    homes.lab.throttle(homes.servers[slow][1], 1)
    try:
        result = run_client(homes, tiny_llama)
    finally:
        homes.lab.throttle(homes.servers[slow][1], None)
    assert result["tokens"] == expected
    names = [homes.name_of(peer) for peer in result["routes"][0]]
    assert names == [fast, "B"], names


def test_link_down_mid_generation_fails_over_and_comes_back(homes, tiny_llama, expected, tmp_path):
    """A home's link is cut between two steps of a generation: the client gives up on it within its step
    timeout, replays on the replica and produces the same tokens; with the link back, the server is used again."""
    homes.lab.throttle(homes.servers["C"][1], 1)  # the route starts through A
    go = tmp_path / "go"
    argv = [sys.executable, str(CLIENT_JOB), str(tiny_llama), "--initial-peers", homes.peers[0], "--tokens",
            str(TOKENS), "--prompt-ids", *map(str, PROMPT), "--pause-after", "3", "--go-file", str(go),
            "--step-timeout", "4", "--connect-timeout", "4"]
    client = subprocess.Popen(homes.client.command(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        line = ""
        while time.monotonic() < deadline and not line.startswith("paused"):
            line = client.stdout.readline()
            if not line and client.poll() is not None:
                break
        assert line.startswith("paused"), client.stderr.read()[-3000:] if client.poll() is not None else line
        homes.lab.throttle(homes.servers["C"][1], None)
        homes.lab.link_down(homes.servers["A"][1])
        began = time.monotonic()
        go.touch()
        stdout, stderr = client.communicate(timeout=90)
        recovered = time.monotonic() - began
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        homes.lab.link_up(homes.servers["A"][1])
    result = _result(stdout, stderr)
    assert result["tokens"] == expected
    assert [homes.name_of(p) for p in result["routes"][0]] == ["A", "B"]
    assert [homes.name_of(p) for p in result["failed"]] == ["A"]
    assert [homes.name_of(p) for p in result["routes"][1]] == ["C", "B"]
    # bound: one step timeout (4 s) on the cut stream, then re-routing with pings and a replay (generous on 2 CPUs)
    assert recovered < 4 + 20, recovered

    # The link is back: A re-announces and reserves relay slots again; with C slow, clients route through A.
    homes.lab.throttle(homes.servers["C"][1], 1)
    try:
        # 60 s was once not enough in a full `make test` (clients still opened a session at A, then its step timed
        # out and they went to C): libp2p's relay and connection backoffs after a cut link. Bounded, generous.
        deadline = time.monotonic() + 150
        while True:
            result = run_client(homes, tiny_llama)
            names = [homes.name_of(p) for p in result["routes"][0]]
            if names == ["A", "B"] or time.monotonic() > deadline:
                break
            time.sleep(3)
    finally:
        homes.lab.throttle(homes.servers["C"][1], None)
    assert result["tokens"] == expected
    assert names == ["A", "B"]


def test_bootstrap_peer_dies_and_a_new_server_still_joins(homes, tiny_llama, expected):
    """The bootstrap peer is killed: the swarm keeps serving through the other relays, and a new server (in a new
    home) joins through another peer given as --initial-peers."""
    boot = homes.swarm.processes[0]
    assert boot.name == "dht"
    homes.swarm.kill(boot)
    others = homes.peers[1:]
    result = run_client(homes, tiny_llama, peers=others[:1])
    assert result["tokens"] == expected

    host = homes.lab.add_home("home5")
    process = homes.swarm.on(host).start_server(tiny_llama, (0, 5), "serverD", SERVER_ARGS + ["--initial-peers",
                                                                                              *others], timeout=180)
    homes.peer_ids["D"] = _peer_of(process)
    result = run_client(homes, tiny_llama, "--allowed-servers", homes.peer_ids["D"], peers=others[1:2])
    assert result["tokens"] == expected
    assert [homes.name_of(p) for p in result["routes"][0]] == ["D"]
