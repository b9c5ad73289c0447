"""The attention-cache budget: pages of a fixed number of tokens, taken as sessions grow, returned when they end.

A session reserves nothing up front: before each step it grows its allocation to cover the tokens it will
hold. When the budget is exhausted, `grow` waits (bounded by the client's timeout) for other sessions to end.
"""

from __future__ import annotations

import asyncio
import enum
import math
from dataclasses import dataclass

from corolla.errors import CacheFullError


class Grow(enum.Enum):
    OK = "ok"
    FULL = "full"  # not now: other sessions hold the pages
    NEVER = "never"  # more than the whole budget


@dataclass
class Allocation:
    """Pages held by one session."""

    pages: int = 0


class CacheManager:
    def __init__(self, total_tokens: int, page_tokens: int = 64):
        if total_tokens < page_tokens or page_tokens < 1:
            raise ValueError(f"cache budget of {total_tokens} tokens is smaller than one page ({page_tokens})")
        self.page_tokens = page_tokens
        self.total_pages = total_tokens // page_tokens
        self.free_pages = self.total_pages
        self._freed = asyncio.Condition()

    @property
    def tokens_left(self) -> int:
        return self.free_pages * self.page_tokens

    @property
    def total_tokens(self) -> int:
        return self.total_pages * self.page_tokens

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_tokens)

    def try_grow(self, allocation: Allocation, tokens: int) -> Grow:
        """Make `allocation` cover `tokens` tokens if the pages are free now."""
        needed = self.pages_for(tokens) - allocation.pages
        if needed <= 0:
            return Grow.OK
        if self.pages_for(tokens) > self.total_pages:
            return Grow.NEVER
        if needed > self.free_pages:
            return Grow.FULL
        self.free_pages -= needed
        allocation.pages += needed
        return Grow.OK

    async def grow(self, allocation: Allocation, tokens: int, timeout: float) -> None:
        """Like try_grow, waiting up to `timeout` seconds for pages; raises CacheFullError with the numbers."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._freed:
            while (result := self.try_grow(allocation, tokens)) == Grow.FULL:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(self._freed.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        if result == Grow.NEVER:
            raise CacheFullError(f"server cache full: {tokens} tokens exceed this server's whole cache budget of "
                                 f"{self.total_tokens} tokens")
        if result == Grow.FULL:
            raise CacheFullError(f"server cache full: needed {tokens - allocation.pages * self.page_tokens} more "
                                 f"tokens, {self.tokens_left} of {self.total_tokens} free after waiting {timeout:g} s")

    async def release(self, allocation: Allocation) -> None:
        async with self._freed:
            self.free_pages += allocation.pages
            allocation.pages = 0
            self._freed.notify_all()
