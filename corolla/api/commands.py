"""`corolla api | chat | health`."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from pathlib import Path

from corolla.cli import add_dataclass_args, from_args


def _network_args(parser: argparse.ArgumentParser) -> None:
    # Not --host/--port: those are the HTTP server's here. The client's peer listens on loopback.
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MULTIADDR",
                        help="multiaddrs of peers already in the swarm (e.g. what `corolla dht` prints)")
    parser.add_argument("--identity", default=None, help="private key file of this client's peer (stable peer id)")
    parser.add_argument("--swarm-key-file", default=None, help="secret of a private swarm (see SECURITY.md)")
    parser.add_argument("--allowed-peers", nargs="*", default=None, help="peer ids of a private swarm's members")


def _network(args: argparse.Namespace):
    from corolla.net.node import NetworkConfig

    return NetworkConfig(initial_peers=tuple(args.initial_peers), identity=args.identity,
                         swarm_key_file=args.swarm_key_file,
                         allowed_peers=tuple(args.allowed_peers) if args.allowed_peers is not None else None)


def _client_group(parser: argparse.ArgumentParser) -> None:
    from corolla.client.config import ClientConfig

    add_dataclass_args(parser.add_argument_group("client (waits are in seconds)"), ClientConfig)


def _client_config(args: argparse.Namespace):
    from corolla.client.config import ClientConfig

    return from_args(ClientConfig, args)


def _wait_for_signal() -> None:
    """Block the main thread until SIGINT or SIGTERM."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def cmd_api(args: argparse.Namespace) -> None:
    from corolla.api.app import ApiServer, create_app
    from corolla.api.config import ApiConfig
    from corolla.api.served import ServedModel, load_model

    config = from_args(ApiConfig, args)
    print(f"Joining the swarm and loading the client parts of {config.model} ...", flush=True)
    model, tokenizer, name = load_model(config, _network(args), _client_config(args))
    served = ServedModel.create(model, tokenizer, name, config)
    try:
        server = ApiServer(create_app(served, config.state_refresh), config.host, config.port, access_log=True)
        url = server.start()
        try:
            print(f"API ready: {url}/v1 (model {name!r}); chat page: {url}/ ; swarm map: {url}/swarm ; "
                  f"Ctrl-C to stop", flush=True)
            _wait_for_signal()
            print("Stopping the API ...", flush=True)
        finally:
            server.stop()
    finally:
        served.close()
        model.close()


def cmd_chat(args: argparse.Namespace) -> None:
    from corolla.api.chat import run_chat
    from corolla.api.config import ApiConfig, ChatOptions
    from corolla.api.served import ServedModel, load_model

    config = ApiConfig(model=args.model, model_name=args.model_name, dtype=args.dtype)
    model, tokenizer, name = load_model(config, _network(args))
    served = ServedModel.create(model, tokenizer, name, config)
    try:
        run_chat(served, from_args(ChatOptions, args))
    finally:
        served.close()
        model.close()


def cmd_health(args: argparse.Namespace) -> None:
    from corolla.api.health import HealthTarget, read_state, watch
    from corolla.api.terminal import render_state
    from corolla.errors import CorollaError
    from corolla.models.hub_source import open_model, swarm_identity

    if args.model_id:
        if not args.num_blocks:
            raise CorollaError("--model-id needs --num-blocks (the model's number of transformer blocks)")
        target = HealthTarget(args.model_name or args.model_id, args.model_id, args.num_blocks)
    else:
        if args.model is None:
            from corolla.models.embedded import ensure_embedded_model

            model_dir = ensure_embedded_model()
        else:
            model_dir = Path(args.model)
        # a directory, or a Hub repo id: its config.json and weight index only
        identity = swarm_identity(open_model(model_dir), args.model_name)
        target = HealthTarget(identity.name, identity.model_id, identity.config.num_hidden_layers)
    if args.watch:
        try:
            asyncio.run(watch(_network(args), target, args.rtt_timeout, args.watch))
        except KeyboardInterrupt:
            pass
        return
    state = asyncio.run(read_state(_network(args), target, args.rtt_timeout))
    print(state.model_dump_json(indent=2) if args.json else render_state(state), flush=True)
    if not state.complete:
        sys.exit(1)


def add_commands(commands) -> None:
    # Only the settings' dataclasses here: the parser must build without FastAPI (`corolla dht`, `server`).
    from corolla.api.config import ApiConfig, ChatOptions

    api = commands.add_parser("api", help="serve a swarm's model over an OpenAI-compatible HTTP API, with a web "
                                          "chat and a swarm map")
    add_dataclass_args(api, ApiConfig)
    _network_args(api)
    _client_group(api)
    api.set_defaults(run=cmd_api)

    chat = commands.add_parser("chat", help="chat with a swarm's model in the terminal (streaming)")
    chat.add_argument("model", help="local model directory (config, tokenizer, embeddings and head)")
    chat.add_argument("--model-name", default=None, help="the model's name in the DHT (default: the directory name)")
    chat.add_argument("--dtype", default=None, help="client dtype: float32, float16 or bfloat16")
    add_dataclass_args(chat, ChatOptions)
    _network_args(chat)
    chat.set_defaults(run=cmd_chat)

    health = commands.add_parser("health", help="print the swarm map of a model: which server holds which "
                                                "blocks, state, speed, cache, round-trip time (exit 1 if blocks "
                                                "are not served)")
    health.add_argument("model", nargs="?", default=None,
                        help="local model directory or Hugging Face Hub repo id OWNER/NAME (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    health.add_argument("--model-name", default=None, help="the model's name in the DHT (default: the directory "
                                                           "name)")
    health.add_argument("--model-id", default=None, help="the model's DHT id (name-hash), instead of a directory")
    health.add_argument("--num-blocks", type=int, default=None, help="the model's block count (with --model-id)")
    health.add_argument("--json", action="store_true", help="print the map as JSON (as GET /api/v1/state)")
    health.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                        help="redraw the map every SECONDS until Ctrl-C")
    health.add_argument("--rtt-timeout", type=float, default=2.0, help="seconds to wait for a ping (default: 2.0)")
    _network_args(health)
    health.set_defaults(run=cmd_health)
