"""Server and bootstrap-peer lifecycle, seen through the DHT: announce, refresh, expiry, offline on shutdown,
stable identities; the demo shuts everything down on Ctrl-C."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import psutil

from conftest import peer_of, start_swarm
from corolla.models.checkpoint import load_config, model_id
from corolla.net.directory import read_servers
from corolla.net.node import NetworkConfig, Node
from corolla.net.records import ServerState


def swarm_view(initial_peers, model_dir, name):
    async def read():
        node = await Node.create(NetworkConfig(initial_peers=tuple(initial_peers)), client_mode=True)
        try:
            config = load_config(model_dir)
            return await read_servers(node, model_id(config, name), config.num_hidden_layers)
        finally:
            await node.shutdown()

    return {server.peer_id: server.record for server in asyncio.run(read())}


def test_announce_offline_on_shutdown_and_expiry_after_a_crash(local_swarm, tiny_llama):
    servers = start_swarm(local_swarm, tiny_llama, [(0, 3), (3, 5)], extra_args=["--announce-period", "1"])
    graceful, crashed = servers
    view = swarm_view(local_swarm.initial_peers, tiny_llama, "tiny-llama")
    assert {peer_of(p) for p in servers} <= set(view)
    record = view[peer_of(graceful)]
    assert (record.state, record.start_block, record.end_block) == (ServerState.ONLINE, 0, 3)
    assert record.version and record.throughput > 0 and record.cache_tokens_left > 0

    deadline = time.monotonic() + 15  # the first server pings the one serving the blocks after its span
    while peer_of(crashed) not in swarm_view(local_swarm.initial_peers, tiny_llama, "tiny-llama")[
            peer_of(graceful)].next_pings:
        assert time.monotonic() < deadline, "no round trip to the next server was announced"
        time.sleep(0.5)

    local_swarm.stop(graceful)  # SIGTERM: the server announces itself offline before leaving
    assert graceful.popen.returncode == 0
    assert swarm_view(local_swarm.initial_peers, tiny_llama, "tiny-llama")[peer_of(graceful)].state == ServerState.OFFLINE

    local_swarm.kill(crashed)  # SIGKILL: no goodbye; its record must expire (3 announce periods)
    deadline = time.monotonic() + 15
    while peer_of(crashed) in swarm_view(local_swarm.initial_peers, tiny_llama, "tiny-llama"):
        assert time.monotonic() < deadline, "a crashed server's record did not expire"
        time.sleep(0.5)


def test_dht_identity_gives_a_stable_peer_id(local_swarm, tmp_path):
    identity = str(tmp_path / "dht.key")
    first = local_swarm.start_dht(identity=identity)
    local_swarm.stop(local_swarm.processes[-1])
    second = local_swarm.start_dht(identity=identity)
    assert first[0].split("/p2p/")[1] == second[0].split("/p2p/")[1]
    assert first[0].startswith("/ip4/127.0.0.1/tcp/")


def test_demo_stops_every_process_on_ctrl_c(tmp_path):
    # A long answer, so that Ctrl-C arrives mid-generation.
    demo = subprocess.Popen([sys.executable, "-m", "corolla.cli", "demo", "--workdir", str(tmp_path),
                             "--prompt", "Write a long story about a dragon who learns to cook.",
                             "--max-new-tokens", "400"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output = ""
        deadline = time.monotonic() + 300
        while "Assistant:" not in output:
            assert time.monotonic() < deadline and demo.poll() is None, output
            output += demo.stdout.read1(4096) if hasattr(demo.stdout, "read1") else demo.stdout.readline()
        children = psutil.Process(demo.pid).children(recursive=True)
        assert len(children) >= 4  # bootstrap peer + 3 servers (+ p2p daemons)
        os.kill(demo.pid, signal.SIGINT)
        rest, _ = demo.communicate(timeout=60)
        assert "Stopping servers" in output + rest
        assert demo.returncode in (0, 130)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert not alive, f"left running: {alive}"
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)


def test_one_command_starts_a_server_per_device(local_swarm, models_dir, tmp_path):
    from tiny_models import make_tiny_llama

    path = make_tiny_llama(models_dir / "tiny-multi", num_layers=5, seed=6)
    peers = local_swarm.start_dht()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "corolla.cli", "servers", str(path), "--devices", "cpu", "cpu", "--workdir",
         str(tmp_path), "--", "--initial-peers", *peers, "--num-blocks", "3", "--num-threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output = ""
        deadline = time.monotonic() + 180
        while "servers running" not in output:
            assert time.monotonic() < deadline and launcher.poll() is None, output
            output += launcher.stdout.readline()
        view = swarm_view(peers, path, "tiny-multi")
        assert sorted((r.start_block, r.end_block) for r in view.values()) == [(0, 3), (2, 5)]
        children = psutil.Process(launcher.pid).children(recursive=True)
        os.kill(launcher.pid, signal.SIGTERM)
        launcher.communicate(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert launcher.returncode == 0 and not alive
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(10)
