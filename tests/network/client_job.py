"""A Corolla client run as its own process inside a lab namespace: greedy generation, reported as one JSON line.

    python client_job.py MODEL_DIR --initial-peers ADDR... --tokens N [--pause-after K --go-file F]
                         [--wire-format float16] [--repeat R] [--prompt-ids 1 2 3]

With --pause-after K it generates K tokens, prints `paused` and waits (bounded) for --go-file to appear before the
rest: the test cuts a link in between (the benchmark reads byte counters); `rest_ms_per_token` times that rest. The JSON line (prefixed `result: `) holds the new token ids, the route of
each part (peer ids), the servers that failed, ms/token of the decode steps and the bytes the client sent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.client.config import ClientConfig
from corolla.net.node import NetworkConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt-ids", type=int, nargs="+", default=[1, 5, 9, 14, 3, 7])
    parser.add_argument("--pause-after", type=int, default=0)
    parser.add_argument("--go-file", default=None)
    parser.add_argument("--go-timeout", type=float, default=60.0)
    parser.add_argument("--wire-format", default="native")
    parser.add_argument("--repeat", type=int, default=1, help="generations (timing: the best is reported)")
    parser.add_argument("--allowed-servers", nargs="*", default=None)
    parser.add_argument("--use-push", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--step-timeout", type=float, default=60.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--ban-seconds", type=float, default=15.0)
    parser.add_argument("--rtt-refresh-period", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("hivemind").setLevel(logging.WARNING)

    config = ClientConfig(wire_format=args.wire_format, use_push=args.use_push, step_timeout=args.step_timeout,
                          connect_timeout=args.connect_timeout, ban_seconds=args.ban_seconds,
                          rtt_refresh_period=args.rtt_refresh_period,
                          allowed_servers=tuple(args.allowed_servers) if args.allowed_servers else None)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, client_config=config,
        network=NetworkConfig(initial_peers=tuple(args.initial_peers)))
    prompt = torch.tensor([args.prompt_ids])
    routes, failed, best_ms, tokens, rest_ms = [], [], float("inf"), [], None
    try:
        for _ in range(args.repeat):
            with model.inference_session(max_length=len(args.prompt_ids) + args.tokens + 1) as session:
                first = args.pause_after or args.tokens
                began = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=first, do_sample=False, session=session)
                tokens = out[0, len(args.prompt_ids):].tolist()
                routes.append([hop.peer_id for hop in session.route])
                if args.pause_after:
                    print("paused", flush=True)
                    deadline = time.monotonic() + args.go_timeout
                    while not os.path.exists(args.go_file) and time.monotonic() < deadline:
                        time.sleep(0.05)
                    resumed = time.perf_counter()
                    more = model.generate(None, max_new_tokens=args.tokens - first, do_sample=False, session=session)
                    rest_ms = (time.perf_counter() - resumed) * 1000 / max(1, args.tokens - first)
                    tokens += more[0].tolist()
                    routes.append([hop.peer_id for hop in session.route])
                elapsed = time.perf_counter() - began
                # ms per token over the decode steps (the prompt's step included once: same for every chain)
                best_ms = min(best_ms, elapsed * 1000 / args.tokens)
                failed = list(session.failed_servers)
    finally:
        model.close()
    print("result: " + json.dumps({"tokens": tokens, "routes": routes, "failed": failed, "ms_per_token": best_ms,
                                      "rest_ms_per_token": rest_ms}),
          flush=True)


if __name__ == "__main__":
    sys.exit(main())
