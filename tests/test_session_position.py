"""InferenceSession owns its position: random sequences of steps, rollbacks and reorders against a plain model of
what the servers hold, without servers (the network part of a step is replaced by recording one hop's history,
which is what a failover would replay)."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch

from corolla.client.config import ClientConfig
from corolla.client.model import RemoteSessionCache
from corolla.client.remote import InferenceSession, _HopSession
from corolla.client.routing import Hop
from corolla.errors import CorollaError

HIDDEN = 2


class _LocalSwarm:
    """Stands for SwarmClient: its config, and `call` running the coroutine in this thread."""

    config = ClientConfig()

    def call(self, coroutine, timeout=None):
        return asyncio.run(coroutine)


def offline_session(batch: int, max_length: int, prefix: int = 0):
    """A session with one hop whose step only records the inputs; returns it and the list of (history, positions)
    each step left for a replay."""
    session = InferenceSession(_LocalSwarm(), max_length=max_length, batch_size=batch)
    session.prefix_tokens = prefix
    hop = _HopSession(Hop("peer", 0, 1))
    session._hops = [hop]
    replays = []

    async def step(hidden, inputs):
        replays.append((hop.history.put(inputs.start, hidden).clone(), inputs.positions.clone()))
        return hidden

    session._step = step
    return session, replays


@pytest.mark.parametrize("seed", range(8))
def test_position_operations_match_a_plain_model(seed):
    rng = random.Random(seed)
    batch, max_length, prefix = rng.choice([1, 2, 3]), 24, rng.choice([0, 2])
    session, replays = offline_session(batch, max_length, prefix)
    rows = [[] for _ in range(batch)]  # per row: (hidden value, position id) of every token sent, in row order
    position = 0
    for _ in range(60):
        floor = prefix if position >= prefix else 0
        op = rng.choice(["step", "step", "rollback", "reorder", "bad step"])
        if op == "step" and position < max_length:
            start = rng.randint(floor, position) if rng.random() < 0.3 else position
            tokens = rng.randint(max(1, prefix - start), min(3, max_length - start)) if start < max_length else 0
            if tokens == 0:
                continue
            hidden = torch.randn(batch, tokens, HIDDEN)
            position_ids = torch.randint(0, 100, (batch, tokens))
            out = session.step(hidden, position_ids=position_ids, start=None if start == position else start)
            assert torch.equal(out, hidden)
            for r in range(batch):
                rows[r][start:] = [(hidden[r, t], int(position_ids[r, t])) for t in range(tokens)]
            position = start + tokens
            history, positions = replays[-1]
            assert torch.equal(history, torch.stack([torch.stack([h for h, _ in row]) for row in rows]))
            assert positions.tolist() == [[p for _, p in row] for row in rows]
        elif op == "rollback":
            target = rng.randint(-1, position + 1)
            if floor <= target <= position:
                session.rollback_to(target)
                position = target
                for row in rows:
                    del row[target:]
            else:
                with pytest.raises(CorollaError, match=rf"rollback_to\({target}\).* between {floor} and .*{position}"):
                    session.rollback_to(target)
        elif op == "reorder":
            order = [rng.randrange(batch) for _ in range(batch)]  # beam search may repeat rows
            session.reorder(torch.tensor(order))
            rows = [list(rows[i]) for i in order]
        elif op == "bad step":
            with pytest.raises(CorollaError):
                session.step(torch.zeros(batch, 1, HIDDEN), start=position + 1)
        assert session.position == position


def test_position_is_read_only():
    session, _ = offline_session(1, 8)
    with pytest.raises(AttributeError):
        session.position = 3


def test_cache_crop_rolls_back_but_not_below_the_prompt_tuning_positions():
    session, _ = offline_session(1, 16, prefix=2)
    session.step(torch.zeros(1, 10, HIDDEN))
    cache = RemoteSessionCache(session)
    cache.crop(-3)
    assert (session.position, cache.get_seq_length()) == (7, 5)
    cache.crop(0)
    assert session.position == 7
    cache.crop(4)  # older transformers: the caller's length to keep
    assert session.position == 6
    cache.crop(-100)
    assert session.position == 2
