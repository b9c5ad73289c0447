"""A small internet on one machine, built from Linux network namespaces (a library for tests and benchmarks).

    public segment 10.251.0.0/24: a bridge in a namespace of its own; public hosts (bootstrap peer, public
    servers) hang on it with one veth each.
    homes: a router namespace (WAN veth on the bridge, 10.251.0.100+i; LAN 192.168.(10+i).1/24) doing nftables
    masquerade with no inbound forwarding, and one host namespace behind it (192.168.(10+i).2, default route via
    the router). A home's uplink (the router's WAN egress) can be rate-limited with tbf and its link cut.

Every namespace is named with a per-run prefix (`cor<pid % 10000><random>-`); `close()` removes exactly those
(also from atexit, after a failure). Nothing is created in the machine's own namespace: veth pairs are made
inside the namespaces with `ip -n`. Needs root, iproute2 and nftables; `unavailable_reason()` says why not.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from corolla.launch import LocalSwarm, Process  # noqa: E402

PUBLIC_NET = "10.251.0"  # the "internet": a private range no real interface here uses, on our own veths only
_COMMAND_TIMEOUT = 20  # seconds for one ip/nft/tc command (they take milliseconds)


class NetlabError(RuntimeError):
    """A command building the lab failed (its stderr is in the message)."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT)
    if check and result.returncode != 0:
        raise NetlabError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (None when they can): tests skip with this reason."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "building network namespaces needs root (CI runs the tests as root)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("tc", "iproute2")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {package}; `make test` installs it)"
    probe = f"corprobe{os.getpid() % 10000}{secrets.token_hex(2)}"
    try:
        made = _run("ip", "netns", "add", probe, check=False)
        if made.returncode != 0:
            return f"`ip netns add` fails here: {made.stderr.strip()}"
        nat = subprocess.run(["ip", "netns", "exec", probe, "nft", "-f", "-"], input=_NAT_PROBE, text=True,
                             capture_output=True, timeout=_COMMAND_TIMEOUT)
        if nat.returncode != 0:
            return f"nftables NAT does not work in a namespace here: {nat.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot build network namespaces: {e}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


_NAT_PROBE = "table ip nat {\n  chain postrouting { type nat hook postrouting priority 100; masquerade; }\n}\n"


@dataclass
class Host:
    """A machine of the lab: one namespace with one address."""

    name: str
    namespace: str
    address: str
    router: str | None = None  # the home router's namespace (None for a public host)

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(*self.command(list(argv)), check=check)


class Netlab:
    """Builds and owns the namespaces of one run; use as a context manager (or call close())."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or f"cor{os.getpid() % 10000}{secrets.token_hex(2)}-"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._homes = 0
        self._publics = 0
        self._closed = False
        atexit.register(self.close)
        self.switch = self._namespace("net")
        self._ip(self.switch, "link", "add", "name", "br0", "type", "bridge")
        self._ip(self.switch, "link", "set", "br0", "up")

    # ---- building -----------------------------------------------------------------------------------------

    def _namespace(self, suffix: str) -> str:
        name = self.prefix + suffix
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        self._ip(name, "link", "set", "lo", "up")
        return name

    @staticmethod
    def _ip(namespace: str, *argv: str) -> None:
        _run("ip", "-n", namespace, *argv)

    def _plug(self, namespace: str, switch_port: str, inner: str, address: str) -> None:
        """A veth from the bridge (port `switch_port`) to `namespace` (interface `inner`, `address`/24)."""
        self._ip(self.switch, "link", "add", switch_port, "type", "veth", "peer", "name", inner, "netns", namespace)
        self._ip(self.switch, "link", "set", switch_port, "master", "br0")
        self._ip(self.switch, "link", "set", switch_port, "up")
        self._ip(namespace, "addr", "add", f"{address}/24", "dev", inner)
        self._ip(namespace, "link", "set", inner, "up")

    def add_public(self, name: str) -> Host:
        """A host with a public address on the bridge: every other host can dial it."""
        self._publics += 1
        namespace = self._namespace(f"p{self._publics}")
        address = f"{PUBLIC_NET}.{1 + self._publics}"
        self._plug(namespace, f"p{self._publics}", "eth0", address)
        host = Host(name, namespace, address)
        self.hosts[name] = host
        return host

    def add_home(self, name: str, uplink_mbit: float | None = None) -> Host:
        """A host behind its own NAT router: it can dial out, nobody outside can dial in."""
        self._homes += 1
        i = self._homes
        router = self._namespace(f"r{i}")
        inside = self._namespace(f"h{i}")
        lan = f"192.168.{10 + i}"
        self._plug(router, f"r{i}", "wan", f"{PUBLIC_NET}.{100 + i}")
        self._ip(router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", inside)
        self._ip(router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        self._ip(router, "link", "set", "lan", "up")
        self._ip(inside, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        self._ip(inside, "link", "set", "eth0", "up")
        self._ip(inside, "route", "add", "default", "via", f"{lan}.1")
        _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        rules = (
            "table ip nat {\n"
            "  chain postrouting { type nat hook postrouting priority 100; oifname \"wan\" masquerade; }\n"
            "}\n"
            "table inet filter {\n"
            "  chain forward {\n"
            "    type filter hook forward priority 0; policy drop;\n"
            "    ct state established,related accept\n"
            "    iifname \"lan\" oifname \"wan\" accept\n"
            "  }\n"
            "}\n"
        )
        loaded = subprocess.run(["ip", "netns", "exec", router, "nft", "-f", "-"], input=rules, text=True,
                                capture_output=True, timeout=_COMMAND_TIMEOUT)
        if loaded.returncode != 0:
            raise NetlabError(f"nft rules for {name}'s router failed: {loaded.stderr.strip()}")
        host = Host(name, inside, f"{lan}.2", router=router)
        self.hosts[name] = host
        if uplink_mbit is not None:
            self.throttle(host, uplink_mbit)
        return host

    # ---- faults -------------------------------------------------------------------------------------------

    def _wan(self, host: Host) -> tuple[str, str]:
        """(namespace, interface) of the host's link to the public segment."""
        return (host.router, "wan") if host.router else (host.namespace, "eth0")

    def throttle(self, host: Host, mbit: float | None) -> None:
        """Rate-limit the host's uplink (egress to the public segment) with tbf; None lifts the limit."""
        namespace, device = self._wan(host)
        _run("ip", "netns", "exec", namespace, "tc", "qdisc", "del", "dev", device, "root", check=False)
        if mbit is not None:
            # burst: 2 ms worth of bytes but at least two full packets (tbf drops packets larger than the burst);
            # latency: 400 ms of queue, as a home router's buffer.
            burst = max(3200, int(mbit * 1e6 / 8 * 0.002))
            _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf",
                 "rate", f"{mbit}mbit", "burst", str(burst), "latency", "400ms")

    def link_down(self, host: Host) -> None:
        """Cut the host's link to the public segment (the home's WAN cable pulled)."""
        namespace, device = self._wan(host)
        self._ip(namespace, "link", "set", device, "down")

    def link_up(self, host: Host) -> None:
        """Plug it back (the connected route of the public /24 returns with the link)."""
        namespace, device = self._wan(host)
        self._ip(namespace, "link", "set", device, "up")

    # ---- processes ----------------------------------------------------------------------------------------

    def swarm(self, workdir: str | Path) -> "NetSwarm":
        return NetSwarm(self, workdir)

    # ---- cleaning -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill whatever still runs in our namespaces (by PID) and delete exactly our namespaces."""
        if self._closed:
            return
        self._closed = True
        for namespace in reversed(self.namespaces):
            pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", namespace, check=False)
        self.namespaces.clear()

    def __enter__(self) -> "Netlab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NetSwarm(LocalSwarm):
    """LocalSwarm whose processes run inside the lab's hosts: `on(host)` picks where the next one starts."""

    def __init__(self, lab: Netlab, workdir: str | Path):
        super().__init__(workdir)
        self.lab = lab
        self._host: Host | None = None

    def on(self, host: Host) -> "NetSwarm":
        self._host = host
        return self

    def spawn(self, name: str, args: list[str]) -> Process:
        """Start `corolla ARGS` on the host chosen with on(), without waiting (logs in workdir/NAME.log)."""
        return self._spawn(name, args)

    def _spawn(self, name: str, args: list[str]) -> Process:
        if self._host is None:
            raise NetlabError("say on which host with swarm.on(host) first")
        host, self._host = self._host, None
        args = list(args)
        if args and args[0] in ("dht", "server"):  # listen on the host's own address (the last --host wins)
            args += ["--host", host.address]
        log_path = self.workdir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log_path, "w") as log:
            # `ip netns exec` execs the command in place: the PID is Python's, so stop() and kill() reach it
            popen = subprocess.Popen(host.command([self.python, "-m", "corolla.cli", *args]), stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     env=env)
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process
