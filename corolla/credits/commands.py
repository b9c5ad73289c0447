"""`corolla credits`: what this node earned and spent, its standing as each server sees it, and delegations."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import defaultdict
from pathlib import Path


def _model_id(args) -> str:
    from corolla.errors import CorollaError
    from corolla.models.hub_source import open_model, swarm_identity

    if args.model_id:
        return args.model_id
    if not args.model:
        raise CorollaError("name the model: a model directory or Hub repo id OWNER/NAME, or --model-id NAME-HASH")
    return swarm_identity(open_model(args.model), args.model_name).model_id


def cmd_delegate(args: argparse.Namespace) -> None:
    from corolla.credits.payer import save_delegation
    from corolla.credits.receipts import delegate
    from corolla.net.auth import generate_identity, load_identity, peer_id_of_identity

    client = Path(args.client_identity)
    if not client.exists():
        generate_identity(client)
    swarm = _model_id(args)
    delegation = delegate(load_identity(args.server_identity), peer_id_of_identity(client), swarm,
                          time.time() + args.days * 86400)
    save_delegation(args.out, delegation)
    print(f"{args.out}: client {delegation.delegate} speaks for server {peer_id_of_identity(args.server_identity)} "
          f"in {swarm} for {args.days:g} days; use it with --identity {client} and the client setting "
          f"delegation_file={args.out}")


def _ledger_lines(path: str, swarm: str | None) -> list[str]:
    from corolla.credits.ledger import EARNED, SIGNED, Ledger

    ledger = Ledger(path)
    try:
        lines = [f"ledger {path}"]
        earned = ledger.receipts(EARNED, swarm)
        signed = ledger.receipts(SIGNED, swarm)
        by_swarm: dict[str, list[str]] = defaultdict(list)
        for receipt in sorted(earned, key=lambda r: -r.block_tokens):
            who = receipt.payer + (" (for a delegating server)" if receipt.delegation else "")
            by_swarm[receipt.swarm].append(f"    earned {receipt.block_tokens:>14,} block-tokens from {who}")
        for receipt in sorted(signed, key=lambda r: -r.block_tokens):
            by_swarm[receipt.swarm].append(f"    spent  {receipt.block_tokens:>14,} block-tokens at {receipt.payee}")
        for name, entries in by_swarm.items():
            served = ledger.served(name)
            lines.append(f"  {name}: earned {sum(r.block_tokens for r in earned if r.swarm == name):,}, spent "
                         f"{sum(r.block_tokens for r in signed if r.swarm == name):,}, served "
                         f"{sum(served.values()):,} block-tokens")
            lines.extend(entries)
        if len(lines) == 1:
            lines.append("  (no receipts yet)")
        return lines
    finally:
        ledger.close()


async def _standing(network, swarm: str, identity: str | None) -> list[str]:
    from corolla.credits.book import credits_key
    from corolla.net.node import Node

    node = await asyncio.wait_for(Node.create(network, client_mode=True), 60)
    try:
        found = (await node.get([credits_key(swarm)])).get(credits_key(swarm), {})
    finally:
        await asyncio.wait_for(node.shutdown(), 10)
    return _standing_lines({server: record for server, (record, _) in found.items()}, swarm, identity)


def _standing_lines(records: dict[str, object], swarm: str, identity: str | None) -> list[str]:
    """One line per server's valid credits record {server: value}: its served work and `identity`'s standing."""
    from corolla.credits.book import read_record

    lines = [f"servers of {swarm}: served block-tokens, and the standing of {identity or '(no identity given)'}"]
    for server, value in sorted(records.items()):
        record = read_record(value)
        if record is None:
            continue
        standing = record.standing.get(identity) if identity else None
        shown = "trusted" if standing == -1.0 else f"{standing:,.0f}" if standing else "none (a free rider there)"
        lines.append(f"  {server}  served {record.served_block_tokens:>14,}  standing {shown}")
    if len(lines) == 1:
        lines.append("  (no server publishes credits for this model)")
    return lines


def cmd_show(args: argparse.Namespace) -> None:
    from corolla.cli import from_args
    from corolla.net.auth import peer_id_of_identity
    from corolla.net.node import NetworkConfig

    swarm = _model_id(args) if (args.model or args.model_id) else None
    for ledger in args.ledger or ():
        print("\n".join(_ledger_lines(ledger, swarm)))
    if swarm and args.initial_peers:
        identity = args.peer_id or (peer_id_of_identity(args.identity) if args.identity else None)
        print("\n".join(asyncio.run(_standing(from_args(NetworkConfig, args), swarm, identity))))


def add_commands(commands) -> None:
    from corolla.cli import _network_parser

    credits = commands.add_parser("credits", help="contributor credits: what this node earned and spent, its "
                                                  "standing at each server, delegations (docs/incentives.md)")
    actions = credits.add_subparsers(dest="credits_command", required=True)

    def model_args(parser) -> None:
        parser.add_argument("model", nargs="?", default=None, help="model directory or Hub repo id OWNER/NAME (or --model-id)")
        parser.add_argument("--model-name", default=None, help="the model's name in the DHT (default: the "
                                                               "directory's name)")
        parser.add_argument("--model-id", default=None, help="the model's DHT id (name-hash)")

    show = actions.add_parser("show", parents=[_network_parser()],
                              help="print ledgers; with --initial-peers, each server's served work and the "
                                   "standing it gives this identity")
    model_args(show)
    show.add_argument("--ledger", nargs="*", default=None, help="ledger files (a server's: ~/.cache/corolla/"
                                                                "credits/<peer id>.sqlite; a client's: its "
                                                                "credits_ledger setting)")
    show.add_argument("--peer-id", default=None, help="whose standing to show (default: the --identity's)")
    show.set_defaults(run=cmd_show)

    delegation = actions.add_parser("delegate", help="let a client key speak for your server: its sessions get "
                                                     "the server's standing")
    model_args(delegation)
    delegation.add_argument("--server-identity", required=True, help="the server's --identity file")
    delegation.add_argument("--client-identity", required=True, help="the client's identity file (made if missing)")
    delegation.add_argument("--days", type=float, default=30.0, help="how long it holds (default: 30)")
    delegation.add_argument("--out", required=True, help="delegation file to write")
    delegation.set_defaults(run=cmd_delegate)
