"""Routing and placement are pure functions over announced records."""

from corolla.client.routing import Hop, missing_ranges, plan_route
from corolla.net.records import PeerRecord, ServerRecord, ServerState
from corolla.server.placement import choose_span


def server(peer, start, end, state=ServerState.ONLINE, throughput=1.0):
    return PeerRecord(peer_id=peer, record=ServerRecord(state=state, start_block=start, end_block=end,
                                                        throughput=throughput))


def test_route_covers_all_blocks_with_fewest_hops():
    servers = [server("a", 0, 4), server("b", 2, 8), server("c", 4, 8, throughput=0.5), server("d", 0, 2)]
    assert plan_route(servers, 0, 8) == [Hop("a", 0, 4), Hop("b", 4, 8)]


def test_route_skips_banned_and_offline_servers():
    servers = [server("a", 0, 4), server("b", 4, 8), server("c", 4, 8, state=ServerState.OFFLINE),
               server("d", 4, 8, state=ServerState.JOINING), server("e", 3, 8)]
    assert plan_route(servers, 0, 8, banned={"b"}) == [Hop("a", 0, 4), Hop("e", 4, 8)]
    assert plan_route(servers, 0, 8, banned={"b", "e"}) is None


def test_missing_ranges_are_named():
    servers = [server("a", 0, 3), server("b", 5, 6), server("c", 6, 10, state=ServerState.OFFLINE)]
    assert missing_ranges(servers, 0, 10) == [(3, 5), (6, 10)]
    assert missing_ranges(servers, 0, 3) == []


def test_placement_fills_the_gap():
    servers = [server("a", 0, 4), server("b", 8, 12)]
    assert choose_span(servers, 12, 4) == (4, 8)
    assert choose_span([], 12, 4) == (0, 4)
    assert choose_span(servers + [server("c", 4, 8, throughput=5.0)], 12, 12) == (0, 12)
