"""The attention-cache budget: pages of a fixed number of tokens, taken as sessions grow, returned when they end.

Each page is a real place in the engine's KV memory (server/kv.py): page p holds tokens [p * page_tokens,
(p + 1) * page_tokens) of every layer's arena. Page 0 is never handed out: it is where padding rows of a batched
step write and read, so that no real page is touched by them.

A session reserves nothing up front: before each step its allocation grows to cover the tokens each of its rows
will hold. When the budget is exhausted, `grow` waits (bounded by the client's timeout) for other sessions to end.
Called from the event loop's thread only (the engine's compute thread reads page lists, never changes them).
"""

from __future__ import annotations

import asyncio
import enum
import math
from dataclasses import dataclass, field

from corolla.errors import CacheFullError

PADDING_PAGE = 0  # the page padding rows use; never part of a session


class Grow(enum.Enum):
    OK = "ok"
    FULL = "full"  # not now: other sessions hold the pages
    NEVER = "never"  # more than the whole budget


@dataclass
class Allocation:
    """Pages held by one session: one list per sequence of its batch, in token order."""

    rows: int = 1
    pages: list[list[int]] = field(default_factory=list)
    version: int = 0  # bumped whenever pages are added: the engine rebuilds its token index then

    def __post_init__(self) -> None:
        if not self.pages:
            self.pages = [[] for _ in range(self.rows)]

    @property
    def page_count(self) -> int:
        return sum(len(row) for row in self.pages)

    @property
    def row_pages(self) -> int:
        return len(self.pages[0])


@dataclass(eq=False)
class _Waiter:
    """A grower waiting for pages: its credits priority and the pages it still needs."""

    priority: float
    pages: int


class CacheManager:
    def __init__(self, total_tokens: int, page_tokens: int = 64):
        if total_tokens < page_tokens or page_tokens < 1:
            raise ValueError(f"cache budget of {total_tokens} tokens is smaller than one page ({page_tokens})")
        self.page_tokens = page_tokens
        self.total_pages = total_tokens // page_tokens
        # Lowest first: a few sessions keep their pages near each other (and near the padding page).
        self._free = list(range(self.total_pages, PADDING_PAGE, -1))
        self._freed = asyncio.Condition()
        self._waiting: list[_Waiter] = []  # growers waiting for pages (credits: highest priority first)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def tokens_left(self) -> int:
        return self.free_pages * self.page_tokens

    @property
    def total_tokens(self) -> int:
        return self.total_pages * self.page_tokens

    @property
    def arena_pages(self) -> int:
        """Pages of KV memory, the padding page included."""
        return self.total_pages + 1

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_tokens)

    def longest_row(self, rows: int) -> int:
        """The most tokens each of `rows` sequences could ever hold here (the whole budget shared by them)."""
        return (self.total_pages // max(rows, 1)) * self.page_tokens

    def pages_needed(self, allocation: Allocation, tokens: int) -> int:
        """New pages `allocation` must take so that every row covers `tokens` tokens (0: it already does)."""
        return max(0, self.pages_for(tokens) - allocation.row_pages) * allocation.rows

    def try_grow(self, allocation: Allocation, tokens: int) -> Grow:
        """Make every row of `allocation` cover `tokens` tokens if the pages are free now."""
        per_row = self.pages_for(tokens) - allocation.row_pages
        if per_row <= 0:
            return Grow.OK
        if self.pages_for(tokens) * allocation.rows > self.total_pages:
            return Grow.NEVER
        if per_row * allocation.rows > self.free_pages:
            return Grow.FULL
        for row in allocation.pages:
            row.extend(self._free.pop() for _ in range(per_row))
        allocation.version += 1
        return Grow.OK

    async def grow(self, allocation: Allocation, tokens: int, timeout: float, priority: float = 0.0) -> None:
        """Like try_grow, waiting up to `timeout` seconds for pages; raises CacheFullError with the numbers.
        A step that needs no new page never waits (nothing running is pre-empted by credits). Freed pages go to
        waiters of higher `priority` first (credits), except that a lower one may take pages the higher ones
        cannot use yet (their need is more than is free): no head-of-line blocking. Among equals, whoever wakes
        first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        me = _Waiter(priority, self.pages_needed(allocation, tokens))
        if me.pages == 0:
            return
        async with self._freed:
            waiting = False
            try:
                while True:
                    me.pages = self.pages_needed(allocation, tokens)
                    ahead = any(other.priority > priority and other.pages <= self.free_pages
                                for other in self._waiting if other is not me)
                    result = Grow.FULL if ahead else self.try_grow(allocation, tokens)
                    if result != Grow.FULL:
                        break
                    if not waiting:
                        self._waiting.append(me)
                        waiting = True
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        await asyncio.wait_for(self._freed.wait(), remaining)
                    except asyncio.TimeoutError:
                        pass
            finally:
                if waiting:  # those behind us in line may go now
                    self._waiting.remove(me)
                    self._freed.notify_all()
        total = tokens * allocation.rows
        if result == Grow.NEVER:
            raise CacheFullError(f"server cache full: {total} tokens exceed this server's whole cache budget of "
                                 f"{self.total_tokens} tokens")
        if result == Grow.FULL:
            raise CacheFullError(f"server cache full: needed {total - allocation.page_count * self.page_tokens} more "
                                 f"tokens, {self.tokens_left} of {self.total_tokens} free after waiting {timeout:g} s")

    def release_now(self, allocation: Allocation) -> None:
        """Return every page at once (waiters are woken by `release`)."""
        for row in allocation.pages:
            self._free.extend(reversed(row))
            row.clear()
        allocation.version += 1

    async def release(self, allocation: Allocation) -> None:
        async with self._freed:
            self.release_now(allocation)
            self._freed.notify_all()
