"""Choosing which blocks a server should serve: pure functions over the announced records.

The throughput model: every token passes through every block, so a block's throughput is the sum of the
throughputs of the servers covering it, and the swarm's throughput is that of its weakest block.

- A joining server takes the window that leaves the swarm's throughput highest once it is there
  (`choose_span`).
- A serving server moves only when moving raises the swarm's throughput by a clear relative margin, and never
  while it alone serves one of its blocks (`should_move`).
- `blocks_that_fit` says how many blocks a device can hold (the default span length).

Records are parsed once into `ServedSpan`s (`served_spans`); everything else works on those, which is what
the simulator (`corolla/simulator.py`) calls too. docs/placement.md gives the reasons and measurements.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from corolla.net.records import PeerRecord, ServerState

# A move must raise the swarm's throughput by at least this fraction. Moving costs a reload (the span is
# unserved by this server meanwhile) and estimates are noisy, so small gains are not worth it.
DEFAULT_MOVE_MARGIN = 0.2
import os
RULE=os.environ.get('RULE')
# A server announcing 0 tokens/s still covers its blocks; this keeps "covered" apart from "uncovered".
MIN_COUNTED_THROUGHPUT = 1e-3
# Throughput used when nothing is known (an empty swarm): any positive value gives the same choices there.
UNKNOWN_SWARM_THROUGHPUT = 1.0
# Windows whose outcomes differ by less than this fraction are ties: float sums in different orders differ.
_TIE_TOLERANCE = 1e-9


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


def coverage(servers: Iterable[PeerRecord], num_blocks: int) -> list[float]:
    """Announced throughput per block, summed over online (and joining) servers."""
    return block_throughputs(served_spans(servers, num_blocks), num_blocks)


# --- joining: where to go --------------------------------------------------------------------------------------

def best_window(per_block: Sequence[float], span_length: int, own_throughput: float) -> int:
    """Start of the window of `span_length` blocks where adding `own_throughput` leaves the swarm strongest.

    Ties go to the window whose blocks are weakest (compared weakest first), so a join covers as much of a
    gap as it can and the next joiner has less to fix; then to the earliest window."""
    num_blocks = len(per_block)
    if not 1 <= span_length <= num_blocks:
        raise ValueError(f"span_length must be in [1, {num_blocks}], got {span_length}")
    if own_throughput < 0:
        raise ValueError(f"own_throughput must be >= 0, got {own_throughput}")
    before, after = _running_minima(per_block)
    starts = range(num_blocks - span_length + 1)
    outcome = [min(before[s], after[s + span_length], min(per_block[s:s + span_length]) + own_throughput)
               for s in starts]
    best = max(outcome)
    tied = [s for s in starts if outcome[s] >= best - _TIE_TOLERANCE * best]
    return min(tied, key=lambda s: (sorted(per_block[s:s + span_length]), s))


def place_span(spans: Iterable[ServedSpan], num_blocks: int, span_length: int,
               own_throughput: float) -> tuple[int, int]:
    """`choose_span` over parsed spans: the blocks [start, end) a new server should load."""
    if span_length < 1:
        raise ValueError(f"span_length must be >= 1, got {span_length}")
    span_length = min(span_length, num_blocks)  # a server that fits more than the model serves all of it
    start = best_window(block_throughputs(spans, num_blocks), span_length, own_throughput)
    return start, start + span_length


def choose_span(servers: Iterable[PeerRecord], num_blocks: int, span_length: int,
                own_throughput: float | None = None) -> tuple[int, int]:
    """The blocks [start, end) a joining server should load: the window where the swarm is weakest.

    `own_throughput` is the joining server's tokens/s if known; by default it is the swarm's typical
    throughput (the server measures its own only after loading)."""
    servers = list(servers)
    spans = served_spans(servers, num_blocks)
    guess = typical_throughput(servers) if own_throughput is None else own_throughput
    return place_span(spans, num_blocks, span_length, guess)


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
    start = best_window(others, mine.length, mine.throughput)
    if start == mine.start:
        return None
    new = mine.moved_to(start)
    before, after = _weakest_touched(others, mine, new)
    # One server adds at most its own throughput, so in a big swarm the margin is taken of that.
    if RULE == "imbalance":
        home = min(others[mine.start:mine.end]); dip = min(others[new.start:new.end])
        if after <= before or home < (1 + margin) * dip:
            return None
    elif after <= before or after - before < margin * min(before, mine.throughput):
        return None
    return new.start, new.end


def should_move(servers: Iterable[PeerRecord], my_peer_id: str, num_blocks: int,
                margin: float = DEFAULT_MOVE_MARGIN) -> tuple[int, int] | None:
    """The span this server should move to, or None to stay where it is.

    The candidate is the window the server would choose if it were joining a swarm without itself. It moves
    there only if that raises the weakest block among those the move touches (the old and new spans; no other
    block changes) by a clear margin: `margin` (0.2 = 20%) of that block's throughput, or of the server's own
    throughput when the block is stronger than one server (in a big swarm no single server can add 20% to a
    block). Filling an uncovered block always counts. It never moves while it is the only online server of one
    of its blocks.

    Every move strictly raises the weakest touched block and changes no other, so the swarm's per-block
    throughputs, sorted, rise lexicographically with each move: servers that evaluate one after another
    (each seeing the previous moves) cannot cycle, and stop after finitely many moves."""
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


def _running_minima(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """before[i] = min(values[:i]) and after[i] = min(values[i:]), infinite when empty."""
    before, after = [float("inf")], [float("inf")]
    for value in values:
        before.append(min(before[-1], value))
    for value in reversed(values):
        after.append(min(after[-1], value))
    after.reverse()
    return before, after


def _weakest_touched(others: Sequence[float], old: ServedSpan, new: ServedSpan) -> tuple[float, float]:
    """The weakest block among those in `old` or `new`, with the server at `old` and then at `new`."""
    touched = set(range(old.start, old.end)) | set(range(new.start, new.end))
    before = min(others[b] + (old.throughput if old.start <= b < old.end else 0.0) for b in touched)
    after = min(others[b] + (new.throughput if new.start <= b < new.end else 0.0) for b in touched)
    return before, after
