"""Starting and stopping local swarm processes (bootstrap peer, servers) on loopback: used by `corolla demo`,
the tests and the benchmarks. Every process is stopped by its PID (its own process group), every wait bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from corolla.errors import CorollaError


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None


def split_blocks(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous spans of near-equal size covering [0, num_blocks)."""
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


class LocalSwarm:
    """Processes of a private swarm on 127.0.0.1."""

    def __init__(self, workdir: str | Path, python: str = sys.executable):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.processes: list[Process] = []
        self.initial_peers: list[str] = []

    def _spawn(self, name: str, args: list[str]) -> Process:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        popen = subprocess.Popen([self.python, "-m", "corolla.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        log.close()
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def wait_for_line(self, process: Process, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in process.log().splitlines():
                if line.startswith(marker):
                    return line
            if not process.alive():
                raise CorollaError(f"{process.name} exited (code {process.popen.returncode}) before it was ready; "
                                   f"its log ({process.log_path}) ends with:\n{_tail(process.log())}")
            time.sleep(0.05)
        raise CorollaError(f"{process.name} was not ready within {timeout:.0f} s; its log ({process.log_path}) "
                           f"ends with:\n{_tail(process.log())}")

    def start_dht(self, timeout: float = 60, identity: str | None = None, extra_args: list[str] = ()) -> list[str]:
        args = ["dht", "--host", "127.0.0.1"] + (["--identity", identity] if identity else []) + list(extra_args)
        process = self._spawn("dht", args)
        line = self.wait_for_line(process, "initial peers:", timeout)
        self.initial_peers = line.split(":", 1)[1].split()
        return self.initial_peers

    def start_server(self, model: str | Path, blocks: tuple[int, int] | None, name: str,
                     extra_args: list[str] = (), wait: bool = True, timeout: float = 120) -> Process:
        args = ["server", str(model), "--host", "127.0.0.1"]
        if self.initial_peers:
            args += ["--initial-peers", *self.initial_peers]
        if blocks is not None:
            args += ["--blocks", f"{blocks[0]}:{blocks[1]}"]
        process = self._spawn(name, args + list(extra_args))
        if wait:
            self.wait_for_line(process, "ready:", timeout)
        return process

    def start_servers(self, model: str | Path, spans: list[tuple[int, int]], extra_args: list[str] = (),
                      timeout: float = 180) -> list[Process]:
        """One server per span, started together (they load in parallel), returned once all are ready."""
        processes = [self.start_server(model, span, f"server{i}", list(extra_args), wait=False)
                     for i, span in enumerate(spans)]
        for process in processes:
            self.wait_for_line(process, "ready:", timeout)
        return processes

    def stop(self, process: Process, timeout: float = 15) -> None:
        """SIGTERM to the process (it stops its own p2p daemon), then SIGKILL to its whole group if needed."""
        if process.alive():
            try:
                os.kill(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                process.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(process, signal.SIGKILL)  # whatever is left of the group (e.g. an orphaned p2pd)
        try:
            process.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def kill(self, process: Process) -> None:
        _signal_group(process, signal.SIGKILL)
        process.popen.wait(10)

    def close(self) -> None:
        for process in reversed(self.processes):
            self.stop(process)
        self.processes.clear()

    def __enter__(self) -> "LocalSwarm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _signal_group(process: Process, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)  # the group id is the leader's PID (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])
