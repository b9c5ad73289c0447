"""The parts of the home-network work that need no namespaces (relay addresses, the map's "reached" column), and
the namespace bench's own cleanup."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from corolla.api.state import build_state  # noqa: E402
from corolla.api.terminal import render_state  # noqa: E402
from corolla.net.node import _circuit_multiaddr, _is_circuit  # noqa: E402
from corolla.net.records import PeerRecord, ServerRecord, ServerState  # noqa: E402
from netlab import Netlab, unavailable_reason  # noqa: E402

RELAY = "QmVGmAd2rd5bsxfykLxvJNkPnZdf6wxjynZrknaVsXeSrT"
TARGET = "QmbZjY2mbswpHGLrz9hHBTJGMJWjRmaLCpebj6kS8nBZny"


def test_circuit_address_carries_the_relay_as_a_bare_multihash():
    """The daemon reads /p2p/ parts as multihashes (0x12 0x20 + 32 bytes); hivemind writes CIDs (0x01 0x72 ...),
    which the daemon refuses ("length greater than remaining number of bytes in buffer")."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    address = _circuit_multiaddr(f"/ip4/10.251.0.2/tcp/45171/p2p/{RELAY}/p2p-circuit/p2p/{TARGET}")
    raw = address.to_bytes()
    transport = Multiaddr("/ip4/10.251.0.2/tcp/45171").to_bytes()
    multihash = PeerID.from_base58(RELAY).to_bytes()
    assert raw == transport + b"\xa5\x03" + bytes([len(multihash)]) + multihash + b"\xa2\x02"
    assert multihash[:2] == b"\x12\x20" and _is_circuit(address)
    assert not _is_circuit(Multiaddr("/ip4/10.251.0.2/tcp/45171"))
    with pytest.raises(ValueError):
        _circuit_multiaddr("/ip4/10.251.0.2/tcp/45171/p2p-circuit")


def test_swarm_map_says_how_each_server_is_reached():
    def record(peer: str, relays: list[str]) -> PeerRecord:
        return PeerRecord(peer_id=peer, record=ServerRecord(state=ServerState.ONLINE, start_block=0, end_block=2,
                                                            relay_addresses=relays))

    records = [record("peerA", [f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/peerA"]), record("peerB", []),
               record("peerC", []), record("peerD", [])]
    state = build_state("m", "m-1", 2, records, {"peerA": 0.02, "peerB": 0.001, "peerC": 0.003, "peerD": None},
                        now=0.0, paths={"peerC": "relayed"})
    reached = {s.peer_id: s.reached for s in state.servers}
    # observed path first, else what the record announces; nothing for a server that did not answer
    assert reached == {"peerA": "relayed", "peerB": "direct", "peerC": "relayed", "peerD": None}
    drawn = render_state(state)
    assert "reached" in drawn and "relayed" in drawn


REASON = unavailable_reason()


@pytest.mark.skipif(REASON is not None, reason=f"no namespace internet here: {REASON}")
def test_netlab_removes_exactly_its_namespaces():
    def ours(prefix: str) -> list[str]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        return [line.split()[0] for line in listed.splitlines() if line.startswith(prefix)]

    bystander = Netlab()
    try:
        lab = Netlab()
        try:
            home = lab.add_home("home")
            public = lab.add_public("public")
            assert len(ours(lab.prefix)) == 4  # switch, router, home, public
            dial = [sys.executable, "-c", "import socket, sys; socket.create_connection((sys.argv[1], 9), 2)"]
            out = subprocess.run(home.command(dial + [public.address]), capture_output=True, text=True, timeout=20)
            assert "ConnectionRefused" in out.stderr  # reached the public host (nothing listens on port 9)
            out = subprocess.run(public.command(dial + [home.address]), capture_output=True, text=True, timeout=20)
            assert "ConnectionRefused" not in out.stderr  # no way into the home
        finally:
            lab.close()
        assert ours(lab.prefix) == []
        assert len(ours(bystander.prefix)) == 1  # another run's namespaces are left alone
    finally:
        bystander.close()
    assert ours(bystander.prefix) == []


def test_auto_reachability_is_private_from_a_home_lan_to_a_public_peer():
    from corolla.net.node import NetworkConfig, resolve_reachability

    public_peer = f"/ip4/9.9.9.9/tcp/31337/p2p/{RELAY}"
    lan_peer = f"/ip4/192.168.1.20/tcp/31337/p2p/{RELAY}"

    def source(address: str):
        return lambda peer_ip: address

    def resolved(address: str, **config) -> str:
        return resolve_reachability(NetworkConfig(**config), outbound_source=source(address))

    assert resolved("192.168.1.5", host="0.0.0.0", initial_peers=(public_peer,)) == "private"
    assert resolved("100.72.1.5", host="0.0.0.0", initial_peers=(public_peer,)) == "private"  # carrier NAT
    assert resolved("1.1.1.1", host="0.0.0.0", initial_peers=(public_peer,)) == "auto"  # a public machine
    assert resolved("192.168.1.5", host="0.0.0.0", initial_peers=(lan_peer,)) == "auto"  # a LAN swarm
    assert resolved("127.0.0.1", initial_peers=(public_peer,)) == "auto"  # loopback (tests, demo)
    assert resolved("192.168.1.5", host="0.0.0.0", initial_peers=(public_peer,), announce_host="1.1.1.1") \
        == "auto"  # an opened port, announced
    assert resolved("192.168.1.5", host="0.0.0.0", initial_peers=(public_peer,), reachability="public") == "public"
