"""Cost of output checking: decode latency with checking off and on (the default share of steps re-run on
another server), over 2 spans each held by 2 servers. Same method as swarm_latency.py.

    .venv/bin/python benchmarks/checking_overhead.py [--runs 3] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from push_latency import decode_ms  # noqa: E402
from swarm_latency import make_model  # noqa: E402

from corolla import AutoDistributedModelForCausalLM  # noqa: E402
from corolla.client.config import ClientConfig  # noqa: E402
from corolla.launch import LocalSwarm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="corolla-check-"))
    model_dir = make_model(workdir / "tiny-llama")
    input_ids = torch.randint(3, 32000, (1, 20), generator=torch.Generator().manual_seed(1))
    share = ClientConfig().check_share
    rows = []
    with LocalSwarm(workdir / "swarm") as swarm:
        swarm.start_dht()
        swarm.start_servers(model_dir, [(0, 4), (0, 4), (4, 8), (4, 8)], ["--num-threads", "1"])
        for name, config in [("checking off", ClientConfig()),
                             (f"checking on, share {share:g} (default)", ClientConfig(check_outputs=True))]:
            model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers,
                                                                    client_config=config)
            try:
                ms, tokens = decode_ms(model, input_ids, args.new_tokens, args.runs)
            finally:
                model.close()
            rows.append((name, ms, tokens))
    base = rows[0][1]
    print(f"\ntiny-llama (hidden 512, 8 blocks), 2 spans x 2 servers, CPU loopback; {args.new_tokens} new tokens, "
          f"median of {args.runs}")
    for name, ms, tokens in rows:
        print(f"{name:<36} {ms:8.2f} ms/token  {ms / base:5.2f}x  same tokens: {tokens == rows[0][2]}")


if __name__ == "__main__":
    main()
