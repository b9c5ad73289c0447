"""Token ids -> the text of one choice, as deltas: incremental decoding and stop sequences.

Text is released only once it is final: a token that ends inside a multi-byte character waits for the next one,
and text that could be the start of a stop sequence waits until it is clear whether the stop follows.
"""

from __future__ import annotations

from typing import Literal

from transformers import PreTrainedTokenizerBase

FinishReason = Literal["stop", "length"]


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas (a window of tokens, not the whole list, each time)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: context so that spacing decodes as in the full text
        self._read_offset = 0  # tokens up to here are already released as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the end)."""
        prefix = self._decode(self.ids[self._prefix_offset:self._read_offset])
        text = self._decode(self.ids[self._prefix_offset:])
        self._prefix_offset = self._read_offset = len(self.ids)
        return text[len(prefix):]


class StopMatcher:
    """Cuts text at the first stop sequence; holds back a tail that may be the start of one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to release, whether a stop sequence was reached)."""
        self._held += text
        hits = [i for i in (self._held.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            released, self._held = self._held[:min(hits)], ""
            return released, True
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if self._held.endswith(stop[:k])),
                   default=0)
        cut = len(self._held) - hold
        released, self._held = self._held[:cut], self._held[cut:]
        return released, False

    def flush(self) -> str:
        released, self._held = self._held, ""
        return released


class ChoiceText:
    """One choice being generated: counts its tokens, turns them into text deltas, decides when it ends."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: tuple[str, ...], eos_ids: frozenset[int]):
        self.decoder, self.matcher, self.eos_ids = IncrementalDecoder(tokenizer), StopMatcher(stops), eos_ids
        self.num_tokens = 0
        self.finish_reason: FinishReason | None = None

    def push(self, token_id: int) -> str:
        """Add a generated token; returns the text it releases. Sets finish_reason on EOS or a stop sequence."""
        self.num_tokens += 1
        if token_id in self.eos_ids:
            return self.finish("stop")
        released, stopped = self.matcher.feed(self.decoder.push(token_id))
        if stopped:
            self.finish_reason = "stop"
        return released

    def finish(self, reason: FinishReason) -> str:
        """End the choice; returns the text held back until now."""
        released, stopped = self.matcher.feed(self.decoder.flush())
        self.finish_reason = reason if not stopped else "stop"
        return released + (self.matcher.flush() if not stopped else "")
