"""Prompt-lookup drafts for speculative decoding: the tokens that followed the latest earlier occurrence of the
text's last few tokens. Every round trip through the swarm then verifies the draft and yields the accepted tokens
plus one; greedy output is unchanged whatever the draft (a wrong token is just not accepted)."""

from __future__ import annotations

import torch
from transformers.generation.candidate_generator import CandidateGenerator

DEFAULT_MAX_NGRAM = 4


class NgramDrafter(CandidateGenerator):
    """transformers' candidate-generator interface, used by `generate(..., prompt_lookup_num_tokens=k)` on a
    distributed model. Differences from transformers' own prompt lookup, each measured to draft better on
    repetitive text (docs/benchmarks.md):
    * the latest occurrence, not the first: repeated structures drift (a list's next item follows the last one);
    * matched n-grams up to `max_ngram` tokens long, longest first;
    * a last token seen nowhere before (a new number, a new name in a repeated line) drafts what followed the
      latest occurrence of the tokens before it, one token later: the rest of the repeated line.
    It keeps an index of every n-gram's latest positions, grown by the accepted tokens only, so a step costs
    microseconds rather than a scan of the text; and it runs no logits processors over the draft (a token they
    forbid is rejected by verification like any wrong token)."""

    def __init__(self, num_tokens: int, max_length: int, eos_token_ids: torch.Tensor | None = None,
                 max_ngram: int = DEFAULT_MAX_NGRAM):
        if num_tokens < 1:
            raise ValueError(f"prompt_lookup_num_tokens must be at least 1, got {num_tokens}")
        if max_ngram < 1:
            raise ValueError(f"max_matching_ngram_size must be at least 1, got {max_ngram}")
        self.num_tokens = num_tokens
        self.max_length = max_length
        self.max_ngram = max_ngram
        self.eos = set() if eos_token_ids is None else set(eos_token_ids.reshape(-1).tolist())
        self._tokens: list[int] = []
        # n-gram -> the positions just after its two latest occurrences (latest first). Two, because the latest
        # occurrence of the context before a new token is the one that just led to it.
        self._after: dict[tuple[int, ...], tuple[int, int | None]] = {}

    def get_candidates(self, input_ids: torch.LongTensor, **kwargs) -> tuple[torch.LongTensor, None]:
        if input_ids.shape[0] != 1:
            raise ValueError(f"prompt lookup drafts for one sequence at a time, got a batch of {input_ids.shape[0]}")
        room = self.max_length - input_ids.shape[1] - 1  # the verifying step adds one token of its own
        draft = self.draft(input_ids[0].tolist(), min(self.num_tokens, room)) if room > 0 else []
        if not draft:
            return input_ids, None
        return torch.cat([input_ids, input_ids.new_tensor([draft])], dim=1), None

    def draft(self, tokens: list[int], limit: int) -> list[int]:
        """Up to `limit` tokens that may follow `tokens` (the whole text so far)."""
        self._extend(tokens)
        start = self._continuation(tokens)
        if start is None:
            return []
        draft = tokens[start:start + limit]
        for i, token in enumerate(draft):
            if token in self.eos:  # verification could accept the end and run past it
                return draft[:i]
        return draft

    def _continuation(self, tokens: list[int]) -> int | None:
        """Where the draft starts in `tokens`, or None."""
        end = len(tokens)
        for n in range(min(self.max_ngram, end - 1), 0, -1):
            found = self._after.get(tuple(tokens[end - n:]))
            if found is not None:
                return found[0]
        for n in range(min(self.max_ngram, end - 2), 0, -1):  # the last token is new: skip over it
            found = self._after.get(tuple(tokens[end - 1 - n:end - 1]))
            if found is None:
                continue
            earlier = found[1] if found[0] == end - 1 else found[0]
            if earlier is not None and earlier + 1 < end:
                return earlier + 1
        return None

    def _extend(self, tokens: list[int]) -> None:
        """Index the n-grams ending before the last token (each must have a continuation)."""
        if tokens[:len(self._tokens)] != self._tokens:  # not an extension: a new text
            self._tokens, self._after = [], {}
        for last in range(max(0, len(self._tokens) - 1), len(tokens) - 1):
            for n in range(1, min(self.max_ngram, last + 1) + 1):
                key = tuple(tokens[last + 1 - n:last + 1])
                found = self._after.get(key)
                self._after[key] = (last + 1, found[0] if found is not None else None)
        self._tokens = list(tokens)
