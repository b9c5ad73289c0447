"""Routing and placement are pure functions over announced records."""

import random

from corolla.client.routing import Hop, RouteFilter, missing_ranges, plan_balanced_route, plan_fastest_route
from corolla.net.records import PeerRecord, ServerRecord, ServerState
from corolla.server.placement import choose_span


def server(peer, start, end, state=ServerState.ONLINE, throughput=1.0):
    return PeerRecord(peer_id=peer, record=ServerRecord(state=state, start_block=start, end_block=end,
                                                        throughput=throughput, cache_tokens_left=10_000))


def test_fastest_route_prefers_fewer_round_trips():
    servers = [server("a", 0, 4), server("b", 2, 8), server("c", 4, 8, throughput=0.5), server("d", 0, 2)]
    rtts = {peer: 0.01 for peer in "abcd"}
    route = plan_fastest_route(servers, 0, 8, rtts)
    assert route in ([Hop("a", 0, 4), Hop("b", 4, 8)], [Hop("d", 0, 2), Hop("b", 2, 8)])
    assert len(route) == 2 and route[0].start == 0 and route[-1].end == 8


def test_fastest_route_avoids_a_slow_link_and_a_slow_server():
    servers = [server("a", 0, 4), server("a2", 0, 4), server("b", 4, 8, throughput=100), server("b2", 4, 8)]
    assert plan_fastest_route(servers, 0, 8, {"a": 0.2, "a2": 0.001, "b": 0.001, "b2": 0.001}) == \
        [Hop("a2", 0, 4), Hop("b", 4, 8)]
    # b's compute (1/100 s for its span) beats b2's (1 s) even though b's link is 50 ms slower
    assert plan_fastest_route(servers, 0, 8, {"a": 0.001, "a2": 0.2, "b": 0.05, "b2": 0.001})[1] == Hop("b", 4, 8)


def test_route_skips_banned_offline_disallowed_and_full_servers():
    servers = [server("a", 0, 4), server("b", 4, 8), server("c", 4, 8, state=ServerState.OFFLINE),
               server("d", 4, 8, state=ServerState.JOINING), server("e", 3, 8)]
    assert plan_fastest_route(servers, 0, 8, route_filter=RouteFilter(banned=frozenset({"b"}))) == \
        [Hop("a", 0, 4), Hop("e", 4, 8)]
    assert plan_fastest_route(servers, 0, 8, route_filter=RouteFilter(banned=frozenset({"b", "e"}))) is None
    assert plan_fastest_route(servers, 0, 8, route_filter=RouteFilter(allowed=frozenset({"a", "b"}))) == \
        [Hop("a", 0, 4), Hop("b", 4, 8)]
    roomy = [server("a", 0, 8), PeerRecord(peer_id="f", record=ServerRecord(
        state=ServerState.ONLINE, start_block=0, end_block=8, throughput=9.0, cache_tokens_left=10))]
    assert plan_fastest_route(roomy, 0, 8, route_filter=RouteFilter(min_cache_tokens=100)) == [Hop("a", 0, 8)]


def test_balanced_route_spreads_by_throughput():
    servers = [server("fast", 0, 4, throughput=3.0), server("slow", 0, 4, throughput=1.0), server("b", 4, 8)]
    rng = random.Random(0)
    firsts = [plan_balanced_route(servers, 0, 8, rng=rng)[0].peer_id for _ in range(400)]
    assert 0.65 < firsts.count("fast") / 400 < 0.85


def test_missing_ranges_are_named():
    servers = [server("a", 0, 3), server("b", 5, 6), server("c", 6, 10, state=ServerState.OFFLINE)]
    assert missing_ranges(servers, 0, 10) == [(3, 5), (6, 10)]
    assert missing_ranges(servers, 0, 3) == []


def test_placement_fills_the_gap():
    servers = [server("a", 0, 4), server("b", 8, 12)]
    assert choose_span(servers, 12, 4) == (4, 8)
    assert choose_span([], 12, 4) == (0, 4)
    assert choose_span(servers + [server("c", 4, 8, throughput=5.0)], 12, 12) == (0, 12)


def test_push_routes_count_server_to_server_links():
    servers = [server("a", 0, 4), server("b", 4, 8), server("b2", 4, 8)]
    rtts = {"a": 0.01, "b": 0.01, "b2": 0.01}
    # a measured its link to b as slow and to b2 as fast: with push, the chain goes a -> b2.
    measured = {("a", "b"): 0.2, ("a", "b2"): 0.002}
    assert plan_fastest_route(servers, 0, 8, rtts, push=True, server_rtts=measured)[1].peer_id == "b2"
    measured = {("a", "b"): 0.002, ("a", "b2"): 0.2}
    assert plan_fastest_route(servers, 0, 8, rtts, push=True, server_rtts=measured)[1].peer_id == "b"
    # Without a measurement the link is estimated through the client: the server closer to the client wins.
    assert plan_fastest_route(servers, 0, 8, {"a": 0.01, "b": 0.05, "b2": 0.02}, push=True)[1].peer_id == "b2"
