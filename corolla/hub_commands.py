"""Hub commands for the CLI: `corolla push DIR REPO_ID`."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_push(args: argparse.Namespace) -> None:
    from corolla.hub import push

    print(push(Path(args.local_dir), args.repo_id, hub_dir=Path(args.hub_dir) if args.hub_dir else None,
               revision=args.revision))


def add_commands(subparsers) -> None:
    push = subparsers.add_parser(
        "push", help="file an adapter, prompt or model directory in the offline hub as OWNER/NAME",
        description="Copy every file of DIR into a hub directory laid out like the Hugging Face hub cache, so "
                    "that transformers and peft load REPO_ID from it with HF_HUB_CACHE=HUB_DIR HF_HUB_OFFLINE=1. "
                    "Prints the snapshot directory.")
    push.add_argument("local_dir", metavar="DIR", help="the directory to push")
    push.add_argument("repo_id", metavar="REPO_ID", help="the repo id, 'owner/name'")
    push.add_argument("--hub-dir", default=None,
                      help="the hub directory (default: $HF_HUB_CACHE, else $HF_HOME/hub, else "
                           "~/.cache/huggingface/hub)")
    push.add_argument("--revision", default="main", help="the branch to point at the new snapshot (default: main)")
    push.set_defaults(run=cmd_push)
