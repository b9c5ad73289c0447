"""Placement is pure: which blocks a joining server takes, and when a serving server moves (no network)."""

import random

import pytest

from corolla.net.records import PeerRecord, ServerRecord, ServerState
from corolla.server.placement import (MIN_COUNTED_THROUGHPUT, ServedSpan, best_window, block_throughputs,
                                      blocks_only_served_by, blocks_that_fit, choose_span, plan_move,
                                      served_spans, should_move, swarm_throughput, uncovered_blocks)

GIB = 1 << 30


def server(peer, start, end, throughput=1.0, state=ServerState.ONLINE):
    return PeerRecord(peer_id=peer, record=ServerRecord(state=state, start_block=start, end_block=end,
                                                        throughput=throughput))


def moved(servers, peer, span):
    return [server(s.peer_id, *span, s.record.throughput, s.record.state) if s.peer_id == peer else s
            for s in servers]


# --- the throughput model ------------------------------------------------------------------------------------

def test_block_throughput_sums_live_servers_and_the_swarm_is_its_weakest_block():
    servers = [server("a", 0, 4, 2.0), server("b", 2, 6, 3.0), server("c", 0, 6, 100.0, ServerState.OFFLINE),
               server("d", 4, 6, 0.0, ServerState.JOINING)]  # d has not measured itself yet: a typical server
    spans = served_spans(servers, 6)
    assert [s.peer_id for s in spans] == ["a", "b", "d"]
    assert block_throughputs(spans, 6) == [2.0, 2.0, 5.0, 5.0, 5.5, 5.5]  # d counts as median(2, 3)
    assert swarm_throughput(spans, 6) == 2.0
    assert spans[2].serving is False


def test_records_are_clipped_to_the_model_and_silent_servers_still_cover():
    servers = [server("a", 0, 3, 0.0), server("b", 2, 99, 1.0), server("c", 7, 9, 1.0)]
    spans = served_spans(servers, 6)
    assert [(s.peer_id, s.start, s.end) for s in spans] == [("a", 0, 3), ("b", 2, 6)]  # c is beyond block 6
    assert spans[0].throughput == MIN_COUNTED_THROUGHPUT
    assert uncovered_blocks(spans, 6) == []
    assert uncovered_blocks(spans[1:], 6) == [0, 1]
    assert swarm_throughput([], 6) == 0.0


def test_bad_spans_and_sizes_are_named():
    with pytest.raises(ValueError, match="start < end"):
        ServedSpan("a", 3, 3, 1.0)
    with pytest.raises(ValueError, match="throughput"):
        ServedSpan("a", 0, 3, -1.0)
    with pytest.raises(ValueError, match="exceeds"):
        block_throughputs([ServedSpan("a", 0, 9, 1.0)], 8)
    with pytest.raises(ValueError, match="num_blocks"):
        choose_span([], 0, 4)
    with pytest.raises(ValueError, match="span_length"):
        choose_span([], 8, 0)


# --- joining -------------------------------------------------------------------------------------------------

def test_joining_server_takes_the_gap():
    servers = [server("a", 0, 4), server("b", 8, 12)]
    assert choose_span(servers, 12, 4) == (4, 8)
    assert choose_span(servers, 12, 2) == (4, 6)  # the earliest of equal windows
    assert choose_span(servers, 12, 99) == (0, 12)  # a server that fits the whole model serves all of it


def test_joining_server_takes_the_weakest_window_when_all_is_covered():
    servers = [server("a", 0, 12, 1.0), server("b", 0, 5, 3.0), server("c", 7, 12, 2.0)]
    assert choose_span(servers, 12, 3) == (5, 8)  # blocks 5-6 have only a; 7 has a + c


def test_joining_server_covers_as_much_of_a_wide_gap_as_it_can():
    servers = [server("a", 0, 2), server("b", 10, 12)]
    assert choose_span(servers, 12, 4) == (2, 6)
    # With the rest of the gap (blocks 6-9) wider than the span, the window holding most of it wins.
    assert choose_span(servers + [server("c", 2, 6)], 12, 3) == (6, 9)


def test_joining_servers_count_so_simultaneous_joiners_spread_out():
    servers = [server("a", 0, 12, 10.0), server("b", 0, 4, 10.0), server("c", 8, 12, 10.0)]
    assert choose_span(servers, 12, 4) == (4, 8)
    loading = server("d", 4, 8, 0.0, ServerState.JOINING)  # counted as a typical (10 tokens/s) server
    assert choose_span(servers + [loading], 12, 4) == (0, 4)
    assert choose_span(servers + [server("d", 4, 8, 0.0, ServerState.OFFLINE)], 12, 4) == (4, 8)


def test_best_window_leaves_the_swarm_strongest_whatever_the_joiners_throughput():
    """The joiner's throughput does not change the best window: a property over random swarms."""
    rng = random.Random(0)
    for _ in range(300):
        num_blocks = rng.randint(1, 10)
        per_block = [rng.choice([0.0, 1.0, 2.0, rng.random() * 3]) for _ in range(num_blocks)]
        length = rng.randint(1, num_blocks)
        chosen = best_window(per_block, length)
        for throughput in (0.01, 1.0, 100.0):
            def weakest_after(start):
                return min(v + (throughput if start <= b < start + length else 0.0) for b, v in enumerate(per_block))
            assert weakest_after(chosen) == max(weakest_after(s) for s in range(num_blocks - length + 1))


# --- moving --------------------------------------------------------------------------------------------------

def test_server_moves_into_a_gap_left_by_a_departure():
    servers = [server("a", 0, 4, 5.0), server("b", 0, 4, 5.0), server("c", 4, 8, 5.0)]
    assert should_move(servers, "a", 8) is None  # without a, blocks 0-3 are as strong as 4-7: nowhere better
    gone = servers[:2] + [server("c", 4, 8, 5.0, ServerState.OFFLINE)]
    assert should_move(gone, "a", 8) == (4, 8)
    after = moved(gone, "a", (4, 8))
    assert should_move(after, "b", 8) is None  # b is now the only server of blocks 0-3


def test_server_does_not_move_for_a_small_imbalance():
    # b moving to blocks 4-7 would raise the swarm from 10 to 11 tokens/s (10%), leaving a's 11 behind.
    servers = [server("a", 0, 4, 11.0), server("b", 0, 4, 1.0), server("c", 4, 8, 10.0)]
    assert should_move(servers, "b", 8) is None
    assert should_move(servers, "b", 8, margin=0.05) == (4, 8)
    # Clearly unbalanced (a's 13 vs c's 10 is 30% apart): b moves even though it adds only 1 tokens/s.
    servers[0] = server("a", 0, 4, 13.0)
    assert should_move(servers, "b", 8) == (4, 8)


def test_server_never_leaves_a_block_it_alone_serves():
    # x alone serves block 1; moving to 1-3 would double the swarm's throughput (1 -> 2 tokens/s).
    servers = [server("x", 0, 2, 2.0), server("a", 0, 1, 10.0), server("b", 2, 4, 1.0), server("c", 3, 4, 5.0)]
    assert blocks_only_served_by(served_spans(servers, 4), "x") == [1]
    assert should_move(servers, "x", 4) is None
    loading = server("d", 1, 2, 0.5, ServerState.JOINING)  # not serving yet: x would still be alone
    assert should_move(servers + [loading], "x", 4) is None
    assert should_move(servers + [server("d", 1, 2, 0.5)], "x", 4) == (1, 3)


def test_gap_wider_than_any_span_is_filled_by_successive_moves():
    # One move cannot raise the swarm's throughput (part of the gap stays), but each fills part of it.
    servers = [server("a", 0, 4), server("b", 0, 4), server("c", 12, 16), server("d", 12, 16)]
    for peer in ("a", "b", "c", "d"):
        target = should_move(servers, peer, 16)
        if target is not None:
            servers = moved(servers, peer, target)
    spans = served_spans(servers, 16)
    assert uncovered_blocks(spans, 16) == []
    assert swarm_throughput(spans, 16) == 1.0


def test_should_move_rejects_bad_input():
    servers = [server("a", 0, 4), server("b", 0, 4)]
    with pytest.raises(ValueError, match="one live span for z"):
        should_move(servers, "z", 8)
    with pytest.raises(ValueError, match="margin"):
        should_move(servers, "a", 8, margin=-0.1)


def random_swarm(rng, num_servers, num_blocks):
    spans = []
    for index in range(num_servers):
        length = rng.randint(1, num_blocks // 2)
        start = rng.randrange(num_blocks - length + 1)
        spans.append(ServedSpan(f"s{index}", start, start + length, rng.lognormvariate(0.0, 1.0)))
    return spans


def rebalance_until_still(spans, num_blocks, max_rounds):
    """Rounds of every server applying the move rule in turn; returns (rounds, moves), checking every move."""
    spans = list(spans)
    total_moves = 0
    for round_number in range(1, max_rounds + 1):
        moves = 0
        for index, span in enumerate(spans):
            target = plan_move(spans, span.peer_id, num_blocks)
            if target is None:
                continue
            assert blocks_only_served_by(spans, span.peer_id) == []
            before = block_throughputs(spans, num_blocks)
            spans[index] = span.moved_to(target[0])
            after = block_throughputs(spans, num_blocks)
            assert sorted(after) > sorted(before)  # the potential that rules out cycles
            assert len(uncovered_blocks(spans, num_blocks)) <= before.count(0.0)
            moves += 1
        total_moves += moves
        if moves == 0:
            return round_number, total_moves
    raise AssertionError(f"still moving after {max_rounds} rounds")


def test_two_servers_reach_a_fixed_point():
    spans = [ServedSpan("a", 0, 4, 1.0), ServedSpan("b", 0, 4, 1.0)]
    assert rebalance_until_still(spans, 8, max_rounds=3) == (2, 1)


def test_moves_converge_without_flapping_in_random_swarms():
    rng = random.Random(1)
    for _ in range(40):
        num_blocks = rng.randint(4, 24)
        spans = random_swarm(rng, rng.randint(2, 30), num_blocks)
        rounds, _ = rebalance_until_still(spans, num_blocks, max_rounds=30)
        assert rounds <= 30


# --- memory --------------------------------------------------------------------------------------------------

def test_blocks_that_fit_leave_room_for_the_cache():
    assert blocks_that_fit(24 * GIB, GIB, 4 * GIB, 80) == 20
    assert blocks_that_fit(24 * GIB + GIB // 2, GIB, 4 * GIB, 80) == 20  # no partial blocks
    assert blocks_that_fit(80 * GIB, GIB, 0, 32) == 32  # never more than the model has
    assert blocks_that_fit(3 * GIB, GIB, 4 * GIB, 80) == 0  # not even one: the caller says so
    with pytest.raises(ValueError, match="bytes_per_block"):
        blocks_that_fit(GIB, 0, 0, 8)
    with pytest.raises(ValueError, match="memory sizes"):
        blocks_that_fit(-1, GIB, 0, 8)
    with pytest.raises(ValueError, match="num_blocks"):
        blocks_that_fit(GIB, GIB, 0, 0)
