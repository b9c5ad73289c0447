"""Choosing which blocks a server should serve: pure functions over the announced records.

The throughput model: every token passes through every block, so a block's throughput is the sum of the
throughputs of the servers covering it, and the swarm's throughput is that of its weakest block.

- A joining server takes the window where the swarm is weakest (`choose_span`).
- A serving server moves to that window only when the blocks it would leave stay clearly (20%) stronger than
  the ones it would add, and never while it alone serves one of its blocks (`should_move`).
- `blocks_that_fit` says how many blocks a device can hold (the default span length).

Records are parsed once into `ServedSpan`s (`served_spans`); everything else works on those, which is what
the simulator (`corolla/simulator.py`) calls too. docs/placement.md gives the reasons and measurements.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from corolla.net.records import PeerRecord, ServerState

# A server moves only if the blocks it leaves stay this much stronger than those it joins. Moving costs a
# reload and breaks the sessions it serves, and throughputs are noisy estimates, so small imbalances stay.
DEFAULT_MOVE_MARGIN = 0.2
# A server announcing 0 tokens/s still covers its blocks; this keeps "covered" apart from "uncovered".
MIN_COUNTED_THROUGHPUT = 1e-3
# Throughput used when nothing is known (an empty swarm): any positive value gives the same choices there.
UNKNOWN_SWARM_THROUGHPUT = 1.0


@dataclass(frozen=True)
class ServedSpan:
    """One server's blocks [start, end) and the tokens/s it adds to each of them."""

    peer_id: str
    start: int  # first block
    end: int  # one past the last block
    throughput: float  # tokens/s through the whole span, added to every block in it
    serving: bool = True  # False while the server loads its blocks (announced JOINING)

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"span of {self.peer_id} must have 0 <= start < end, got [{self.start}, {self.end})")
        if self.throughput < 0:
            raise ValueError(f"throughput of {self.peer_id} must be >= 0, got {self.throughput}")

    @property
    def length(self) -> int:
        return self.end - self.start

    def moved_to(self, start: int) -> ServedSpan:
        return replace(self, start=start, end=start + self.length)


# --- parsing records -------------------------------------------------------------------------------------------

def typical_throughput(servers: Iterable[PeerRecord]) -> float:
    """Median announced throughput of the online servers: the guess for a server that has not measured its own."""
    measured = [s.record.throughput for s in servers
                if s.record.state == ServerState.ONLINE and s.record.throughput > 0]
    return statistics.median(measured) if measured else UNKNOWN_SWARM_THROUGHPUT


def served_spans(servers: Iterable[PeerRecord], num_blocks: int) -> list[ServedSpan]:
    """The spans of online and joining servers, clipped to the model's blocks (offline servers serve nothing).

    A joining server announces 0 tokens/s until it has measured itself; it counts as a typical server meanwhile,
    so that servers starting at the same time do not all pile onto the same gap."""
    _check_num_blocks(num_blocks)
    live = [s for s in servers if s.record.state != ServerState.OFFLINE]
    joining_guess = typical_throughput(live)
    spans = []
    for server in live:
        start, end = server.record.start_block, min(server.record.end_block, num_blocks)
        if start >= end:  # beyond this model's blocks, or malformed: covers nothing here
            continue
        spans.append(ServedSpan(server.peer_id, start, end, _counted_throughput(server, joining_guess),
                                serving=server.record.state == ServerState.ONLINE))
    return spans


def _counted_throughput(server: PeerRecord, joining_guess: float) -> float:
    if server.record.state == ServerState.JOINING and server.record.throughput == 0:
        return joining_guess
    return max(server.record.throughput, MIN_COUNTED_THROUGHPUT)


# --- the throughput model --------------------------------------------------------------------------------------

def block_throughputs(spans: Iterable[ServedSpan], num_blocks: int) -> list[float]:
    """Tokens/s each block can carry: the sum over the spans covering it."""
    _check_num_blocks(num_blocks)
    per_block = [0.0] * num_blocks
    for span in spans:
        if span.end > num_blocks:
            _raise_exceeds(span, num_blocks)
        # The same additions in the same order for blocks covered by the same servers: equal sums stay equal.
        per_block[span.start:span.end] = [value + span.throughput for value in per_block[span.start:span.end]]
    return per_block


def swarm_throughput(spans: Iterable[ServedSpan], num_blocks: int) -> float:
    """Tokens/s the whole pipeline can carry: the weakest block's throughput (0 if a block is uncovered)."""
    return min(block_throughputs(spans, num_blocks))


def uncovered_blocks(spans: Iterable[ServedSpan], num_blocks: int) -> list[int]:
    """Blocks that no span covers."""
    _check_num_blocks(num_blocks)
    covered = [False] * num_blocks
    for span in spans:
        if span.end > num_blocks:
            _raise_exceeds(span, num_blocks)
        covered[span.start:span.end] = [True] * span.length
    return [block for block, is_covered in enumerate(covered) if not is_covered]


# --- joining: where to go --------------------------------------------------------------------------------------

def best_window(per_block: Sequence[float], span_length: int) -> int:
    """Start of the window of `span_length` blocks whose throughputs, sorted weakest first, are lexicographically
    smallest (earliest on ties): it holds the weakest block, then as many of the next weakest as it can.

    Adding any positive throughput there leaves the swarm's weakest block as strong as anywhere else (so the
    joining server's own throughput does not change the choice), and ties go to the window that covers the
    most of a gap, so the next joiner has less to fix (docs/placement.md)."""
    num_blocks = len(per_block)
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span_length must be in [1, {num_blocks}], got {span_length}")
    starts = range(num_blocks - span_length + 1)
    window_minima = [min(per_block[s:s + span_length]) for s in starts]
    weakest = min(window_minima)
    candidates = [s for s in starts if window_minima[s] == weakest]  # the sort below decides only among these
    return min(candidates, key=lambda s: (sorted(per_block[s:s + span_length]), s))


def place_span(spans: Iterable[ServedSpan], num_blocks: int, span_length: int) -> tuple[int, int]:
    """`choose_span` over parsed spans: the blocks [start, end) a new server should load."""
    if span_length < 1:
        raise ValueError(f"span_length must be >= 1, got {span_length}")
    span_length = min(span_length, num_blocks)  # a server that fits more than the model serves all of it
    start = best_window(block_throughputs(spans, num_blocks), span_length)
    return start, start + span_length


def choose_span(servers: Iterable[PeerRecord], num_blocks: int, span_length: int) -> tuple[int, int]:
    """The blocks [start, end) a joining server should load: the window where the swarm is weakest
    (see `best_window`); offline servers are ignored and joining ones count."""
    return place_span(served_spans(servers, num_blocks), num_blocks, span_length)


# --- serving: whether to move ----------------------------------------------------------------------------------

def blocks_only_served_by(spans: Sequence[ServedSpan], peer_id: str) -> list[int]:
    """Blocks of `peer_id`'s span that no other serving (online) server covers."""
    mine = _own_span(spans, peer_id)
    overlaps = sorted((max(other.start, mine.start), min(other.end, mine.end)) for other in spans
                      if other.serving and other.peer_id != peer_id
                      and other.start < mine.end and other.end > mine.start)
    alone, next_uncovered = [], mine.start
    for start, end in overlaps:  # sweep left to right, collecting the holes between the others' spans
        alone.extend(range(next_uncovered, start))
        next_uncovered = max(next_uncovered, end)
    alone.extend(range(next_uncovered, mine.end))
    return alone


def plan_move(spans: Sequence[ServedSpan], peer_id: str, num_blocks: int,
              margin: float = DEFAULT_MOVE_MARGIN) -> tuple[int, int] | None:
    """`should_move` over parsed spans: the span `peer_id` should move to, or None to stay."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    mine = _own_span(spans, peer_id)
    if blocks_only_served_by(spans, peer_id):  # leaving would cut the pipeline while we reload
        return None
    others = block_throughputs((s for s in spans if s.peer_id != peer_id), num_blocks)
    start = best_window(others, mine.length)
    if start == mine.start:
        return None
    new = mine.moved_to(start)
    left_behind, gained = _blocks_left_and_gained(others, mine, new)
    if left_behind < (1 + margin) * gained:  # not clearly unbalanced: a move would gain little
        return None
    before, after = _weakest_touched(others, mine, new)
    if after <= before:  # the guarantee against cycles: every move strictly raises the weakest touched block
        return None
    return new.start, new.end


def should_move(servers: Iterable[PeerRecord], my_peer_id: str, num_blocks: int,
                margin: float = DEFAULT_MOVE_MARGIN) -> tuple[int, int] | None:
    """The span this server should move to, or None to stay where it is.

    The candidate is the window the server would choose if it were joining the swarm without itself. It moves
    there only if
    - it is not the only online server of any of its current blocks (never cut the pipeline, even briefly);
    - the blocks it would leave, without it, stay at least `margin` (0.2 = 20%) stronger than the weakest
      block it would add: a clear imbalance, not noise (an uncovered block is always one);
    - the move raises the weakest block among those it touches (its old and new spans).

    The margin compares regions of the swarm, not the gain of one move, so it means the same in a swarm of
    five servers and of five hundred, where one server can add only a few percent to any block. Each move
    strictly raises the weakest touched block and changes no other, so the swarm's per-block throughputs,
    sorted, rise lexicographically with every move: servers that evaluate one after another (each seeing the
    previous moves) cannot cycle, and stop after finitely many moves."""
    spans = served_spans(servers, num_blocks)
    return plan_move(spans, my_peer_id, num_blocks, margin)


# --- memory ----------------------------------------------------------------------------------------------------

def blocks_that_fit(free_memory_bytes: int, bytes_per_block: int, cache_bytes_reserved: int,
                    num_blocks: int) -> int:
    """How many blocks fit in a device's free memory after reserving room for the attention cache
    (at most the model's `num_blocks`; 0 if not even one fits)."""
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be > 0, got {bytes_per_block}")
    if free_memory_bytes < 0 or cache_bytes_reserved < 0:
        raise ValueError(f"memory sizes must be >= 0, got free={free_memory_bytes}, cache={cache_bytes_reserved}")
    _check_num_blocks(num_blocks)
    room = free_memory_bytes - cache_bytes_reserved
    return max(0, min(num_blocks, room // bytes_per_block))


# --- helpers ---------------------------------------------------------------------------------------------------

def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")


def _raise_exceeds(span: ServedSpan, num_blocks: int) -> None:
    raise ValueError(f"span [{span.start}, {span.end}) of {span.peer_id} exceeds the model's {num_blocks} blocks")


def _own_span(spans: Sequence[ServedSpan], peer_id: str) -> ServedSpan:
    mine = [s for s in spans if s.peer_id == peer_id]
    if len(mine) != 1:
        raise ValueError(f"expected one live span for {peer_id} among the announced servers, found {len(mine)}")
    return mine[0]


def _blocks_left_and_gained(others: Sequence[float], old: ServedSpan, new: ServedSpan) -> tuple[float, float]:
    """The weakest block (without this server) among those a move from `old` to `new` would leave, and among
    those it would add."""
    left = min(others[b] for b in range(old.start, old.end) if not new.start <= b < new.end)
    gained = min(others[b] for b in range(new.start, new.end) if not old.start <= b < old.end)
    return left, gained


def _weakest_touched(others: Sequence[float], old: ServedSpan, new: ServedSpan) -> tuple[float, float]:
    """The weakest block among those in `old` or `new`, with the server at `old` and then at `new`."""
    touched = set(range(old.start, old.end)) | set(range(new.start, new.end))
    before = min(others[b] + (old.throughput if old.start <= b < old.end else 0.0) for b in touched)
    after = min(others[b] + (new.throughput if new.start <= b < new.end else 0.0) for b in touched)
    return before, after
