"""Command line: `corolla dht | server | demo`. Server and network options are generated from their config
dataclasses, so each default is defined once."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import sys
import types
import typing

from corolla.errors import CorollaError

# The `api` extra's modules. Only the commands that serve or chat import them, when they run: `corolla dht` and
# `corolla server` must work where they are not installed (tests/test_cli_imports.py).
API_MODULES = ("fastapi", "uvicorn", "starlette")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of a config dataclass: its type, default and help come from the field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union else (kind,)
        base = next((t for t in options if t is not type(None)), str)
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.metadata.get("positional"):
            parser.add_argument(f.name, help=help_text)
        elif base is bool:
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif typing.get_origin(base) is tuple:
            # None stays None (e.g. "no allow-list"); an empty default stays an empty list.
            parser.add_argument(f"--{f.name.replace('_', '-')}", nargs="*",
                                default=None if default is None else list(default), help=help_text)
        else:
            shown = f" (default: {default})" if default not in (None, "") else ""
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=base, default=default, help=help_text + shown)


def from_args(cls: type, args: argparse.Namespace):
    """The config dataclass built from options made by add_dataclass_args."""
    values = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name)
        values[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)


def _network_parser() -> argparse.ArgumentParser:
    from corolla.net.node import NetworkConfig

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("network")
    add_dataclass_args(group, NetworkConfig)
    return parser


async def _run_dht(network) -> None:
    from corolla.net.node import Node

    node = await Node.create(network)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("initial peers: " + " ".join(await node.addresses()), flush=True)
        print("(pass these to servers and clients as --initial-peers; Ctrl-C to stop)", flush=True)
        await stop.wait()
    finally:
        await asyncio.wait_for(node.shutdown(), 10)


def cmd_dht(args) -> None:
    from corolla.net.node import NetworkConfig

    asyncio.run(_run_dht(from_args(NetworkConfig, args)))


def cmd_server(args) -> None:
    from corolla.net.node import NetworkConfig
    from corolla.server.config import ServerConfig
    from corolla.server.server import Server

    server = Server(from_args(ServerConfig, args), from_args(NetworkConfig, args))
    asyncio.run(server.run())


def cmd_demo(args) -> None:
    from corolla.demo import run_demo

    run_demo(model=args.model, prompt=args.prompt, servers=args.servers, max_new_tokens=args.max_new_tokens,
             workdir=args.workdir, serve=args.serve, api_port=args.api_port)


def cmd_servers(args) -> None:
    """One `corolla server` process per device, all joining the same swarm; stopped together on Ctrl-C."""
    import tempfile
    import threading

    from corolla.launch import LocalSwarm

    devices = args.devices
    if devices is None:
        import torch

        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        if not devices:
            raise CorollaError("no CUDA GPU is visible; name the devices with --devices (e.g. --devices cpu cpu)")
    server_args = args.passthrough
    if any(a == "--device" or a.startswith("--device=") for a in server_args):
        raise CorollaError("give devices with --devices, not --device in the server options")
    workdir = args.workdir or tempfile.mkdtemp(prefix="corolla-servers-")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalSwarm(workdir) as swarm:
        processes = []
        for i, device in enumerate(devices):
            process = swarm.start_server(args.model, None, f"server{i}-{device.replace(':', '')}",
                                         ["--device", device, *server_args], wait=False)
            processes.append(process)
            # The next server chooses its span from what the DHT says: start it once this one has chosen and
            # announces itself joining, so that two never take the same span. They still load in parallel.
            swarm.wait_for_line(process, "loading blocks", timeout=args.timeout)
        for process in processes:
            line = swarm.wait_for_line(process, "ready:", timeout=args.timeout)
            print(f"{process.name}: {line}", flush=True)
        print(f"{len(processes)} servers running (logs in {workdir}); Ctrl-C stops them all", flush=True)
        while not stop.wait(1.0):
            for process in processes:
                if not process.alive():
                    print(f"{process.name} exited (code {process.popen.returncode}); see {process.log_path}",
                          flush=True)
                    stop.set()
        print("stopping servers ...", flush=True)


def cmd_fetch_model(args) -> None:
    from corolla.models.embedded import ensure_embedded_model

    print(ensure_embedded_model())


def _add_optional_commands(commands) -> None:
    """Commands defined next to their feature (e.g. corolla/api/commands.py: api, chat, health)."""
    import importlib

    for module_name in ("corolla.api.commands", "corolla.models.commands", "corolla.hub_commands",
                        "corolla.credits.commands"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        module.add_commands(commands)


def build_parser() -> argparse.ArgumentParser:
    from corolla.server.config import ServerConfig

    parser = argparse.ArgumentParser(prog="corolla", description="Run large language models together.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", parents=[_network_parser()], help="run a bootstrap peer of a swarm")
    dht.set_defaults(run=cmd_dht)

    server = commands.add_parser("server", parents=[_network_parser()], help="serve a span of a model's blocks")
    add_dataclass_args(server, ServerConfig)
    server.set_defaults(run=cmd_server)

    demo = commands.add_parser("demo", help="run a private swarm on this machine and chat through it")
    demo.add_argument("--model", default=None, help="model directory or Hugging Face Hub repo id OWNER/NAME "
                                                    "(default: the embedded SmolLM2-135M-Instruct)")
    demo.add_argument("--prompt", default="What is the capital of France?", help="the user's message")
    demo.add_argument("--servers", type=int, default=3, help="number of servers (default: 3)")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    demo.add_argument("--workdir", default=None, help="where the processes' logs go (default: a temporary folder)")
    demo.add_argument("--serve", action="store_true", help="after the answer, keep the swarm and the API up until "
                                                           "Ctrl-C")
    demo.add_argument("--api-port", type=int, default=0, help="HTTP port of the API (default: any free port)")
    demo.set_defaults(run=cmd_demo)

    servers = commands.add_parser("servers", help="start one server per local GPU (or per --devices entry), all "
                                                  "joining the same swarm")
    servers.add_argument("model", help="local Hugging Face-format model directory")
    servers.add_argument("--devices", nargs="+", default=None, help="devices, one server each (default: every "
                                                                    "visible CUDA GPU), e.g. cuda:0 cuda:1")
    servers.add_argument("--workdir", default=None, help="where the servers' logs go (default: a temporary folder)")
    servers.add_argument("--timeout", type=float, default=600, help="seconds to wait for each server to be ready")
    servers.epilog = "Options after -- go to every `corolla server`, e.g. -- --initial-peers ADDR --num-blocks 8"
    servers.set_defaults(run=cmd_servers)

    _add_optional_commands(commands)

    fetch = commands.add_parser("fetch-model", help="fetch and convert the embedded model; print its directory")
    fetch.set_defaults(run=cmd_fetch_model)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []  # for `corolla servers ... -- SERVER OPTIONS`
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    args.passthrough = passthrough
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("hivemind", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.run(args)
    except CorollaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except ModuleNotFoundError as e:
        if (e.name or "").partition(".")[0] not in API_MODULES:
            raise
        print(f"error: `corolla {args.command}` needs the API's dependencies ({e.name} is not installed): "
              f"pip install 'corolla[api]'", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
