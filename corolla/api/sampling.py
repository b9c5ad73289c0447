"""Choosing the next token from logits: greedy at temperature 0, else temperature + top-p sampling.

Each request draws from its own torch.Generator, so a seed gives the same output even while other requests run
concurrently (the global torch RNG is never touched).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability mass reaches top_p
    seed: int | None = None  # None = a fresh random seed

    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_p < 1.0:
        scores = top_p_filter(scores, params.top_p)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to -inf every token outside the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    mass_before = sorted_scores.softmax(dim=-1).cumsum(dim=-1) - sorted_scores.softmax(dim=-1)
    drop_sorted = mass_before >= top_p  # the most likely token always stays (its mass before is 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
