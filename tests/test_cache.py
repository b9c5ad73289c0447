"""The cache budget: pages as sequences grow, never over budget, a bounded wait then a clear error."""

import asyncio
import random

import pytest

from corolla.errors import CacheFullError
from corolla.server.cache import Allocation, CacheManager, Grow


def test_pages_are_taken_as_sequences_grow():
    cache = CacheManager(total_tokens=256, page_tokens=64)
    session = Allocation()
    assert cache.try_grow(session, 1) == Grow.OK and session.page_count == 1
    assert cache.try_grow(session, 64) == Grow.OK and session.page_count == 1
    assert cache.try_grow(session, 65) == Grow.OK and session.page_count == 2
    assert cache.tokens_left == 128
    assert cache.try_grow(Allocation(), 257) == Grow.NEVER
    beams = Allocation(rows=2)  # every row of a batch gets its own pages
    assert cache.try_grow(beams, 65) == Grow.FULL and beams.page_count == 0
    assert cache.try_grow(beams, 64) == Grow.OK and beams.page_count == 2
    held = [page for row in session.pages + beams.pages for page in row]
    assert sorted(held) == [1, 2, 3, 4]  # real, distinct pages; page 0 is the padding page, never handed out


def test_budget_never_exceeded_under_many_sessions():
    async def main():
        cache = CacheManager(total_tokens=1024, page_tokens=16)
        rng = random.Random(0)
        peak = 0

        async def session():
            nonlocal peak
            allocation, length = Allocation(), 0
            try:
                for _ in range(rng.randrange(1, 20)):
                    length += rng.randrange(1, 40)
                    await cache.grow(allocation, length, timeout=1)
                    peak = max(peak, cache.total_pages - cache.free_pages)
                    assert allocation.page_count * cache.page_tokens >= length
                    assert cache.free_pages >= 0
                    await asyncio.sleep(0)
            except CacheFullError:
                pass
            finally:
                await cache.release(allocation)

        await asyncio.gather(*(session() for _ in range(64)))
        return cache, peak

    cache, peak = asyncio.run(main())
    assert peak <= cache.total_pages
    assert cache.free_pages == cache.total_pages  # everything returned


def test_full_cache_waits_then_fails_clearly():
    async def main():
        cache = CacheManager(total_tokens=128, page_tokens=64)
        holder = Allocation()
        await cache.grow(holder, 128, timeout=0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(CacheFullError, match=r"server cache full: needed 10 more tokens, 0 of 128 free after "
                                                 r"waiting 0.3 s"):
            await cache.grow(Allocation(), 10, timeout=0.3)
        assert 0.25 < loop.time() - began < 2
        # A waiter gets the pages as soon as another session releases them.
        waiter = asyncio.ensure_future(cache.grow(Allocation(), 10, timeout=5))
        await asyncio.sleep(0.05)
        await cache.release(holder)
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())
