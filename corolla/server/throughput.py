"""A server's compute speed, measured once per (model, device, dtype, quantization) and cached on disk."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from corolla.models.spec import SpanInputs
from corolla.server.engine import Engine, SpanRequest, Step

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Throughput:
    decode_tokens_per_s_per_block: float  # one sequence, one token a step, through one block
    forward_tokens_per_s_per_block: float  # a 128-token forward through one block

    def for_span(self, blocks: int) -> tuple[float, float]:
        return self.decode_tokens_per_s_per_block / blocks, self.forward_tokens_per_s_per_block / blocks


def measure(engine: Engine, decode_steps: int = 16, forward_tokens: int = 128) -> Throughput:
    """Time the real step path (warm-up first): decode steps of a session, then one stateless forward."""
    backend = engine.backend
    blocks = backend.end - backend.start
    hidden = torch.randn(1, 1, backend.config.hidden_size, generator=torch.Generator().manual_seed(0))
    session = engine.open(backend.start, backend.end, 1, decode_steps + 1)
    timings = []
    try:
        for position in range(decode_steps + 1):
            engine.reserve_now(session, position + 1)
            began = time.perf_counter()
            engine.run_now(Step(session, position, SpanInputs(hidden, torch.tensor([[position]]), None, None)))
            timings.append(time.perf_counter() - began)
    finally:
        engine.close_now(session)
    decode_step = sorted(timings[1:])[len(timings[1:]) // 2]
    prompt = torch.randn(1, forward_tokens, backend.config.hidden_size, generator=torch.Generator().manual_seed(1))
    forward_timings = []
    for _ in range(2):
        began = time.perf_counter()
        engine.run_now(SpanRequest(backend.start, backend.end,
                                   SpanInputs(prompt, torch.arange(forward_tokens)[None], None, None)))
        forward_timings.append(time.perf_counter() - began)
    return Throughput(decode_tokens_per_s_per_block=blocks / max(decode_step, 1e-6),
                      forward_tokens_per_s_per_block=forward_tokens * blocks / max(forward_timings[-1], 1e-6))


def cached_measure(engine: Engine, cache_file: Path, key: str) -> Throughput:
    """The measurement for `key` from `cache_file`, measuring (and saving) it the first time."""
    try:
        known = json.loads(cache_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    if key in known:
        try:
            return Throughput(**known[key])
        except TypeError:
            logger.info("ignoring a stale throughput entry for %s", key)
    result = measure(engine)
    known[key] = asdict(result)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=cache_file.parent, delete=False) as f:
        json.dump(known, f, indent=1)
    os.replace(f.name, cache_file)
    return result
