"""Credits (corolla/credits, docs/incentives.md), without a network: receipts are checked exactly, standing cannot
be made from Sybil identities, a client that stops paying loses its place, ledgers survive a restart, and the
engine's plans put credited sessions first under contention and change nothing without it."""

import random
import time

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa

from corolla.credits.book import CREDITED_SESSIONS_PER_IDENTITY, RECEIPT_SLACK_STEPS, CreditBook, credits_key
from corolla.credits.ledger import EARNED, Ledger
from corolla.credits.payer import RECEIPT_EVERY_STEPS, Payer, load_delegation, save_delegation
from corolla.credits.receipts import Latest, ReceiptError, check_receipt, delegate, identity_of, sign_receipt
from corolla.credits.standing import DAMPING, ROOT, Edge, compute_standing
from corolla.errors import BadRequestError
from corolla.models.spec import SpanInputs
from corolla.net.auth import peer_id_of_public_key, public_key_der
from corolla.net.messages import WorkReceipt
from corolla.net.wire import decode, encode
from corolla.server.engine import FREE_RIDER_TURN, Step, _Pending
from test_engine import make_engine

SWARM = "tiny-llama-abc123"
NOW = 1_800_000_000.0


def new_key(bits=1024):
    # 1024-bit keys keep the test fast; the code is the same for the 2048-bit keys peers use.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def peer(key) -> str:
    return peer_id_of_public_key(public_key_der(key))


@pytest.fixture(scope="module")
def keys():
    return {name: new_key() for name in ("server", "alice", "bob", "carol", "mallory", "home_server")}


# ---- receipts ----------------------------------------------------------------------------------------------------

def test_ten_thousand_mutated_receipts_are_rejected_and_valid_ones_accepted(keys):
    payee = peer(keys["server"])
    rng = random.Random(0)
    good_delegation = delegate(keys["home_server"], peer(keys["carol"]), SWARM, NOW + 3600)
    chains = {}  # payer -> its valid receipts, in order
    for name in ("alice", "bob", "carol"):
        delegation = good_delegation if name == "carol" else None
        chains[name] = [sign_receipt(keys[name], SWARM, payee, 100 * i, i, delegation, at=NOW - 100 + i)
                        for i in range(1, 21)]
    # Valid: each chain, in order, is accepted in full.
    for chain in chains.values():
        previous = None
        for receipt in chain:
            check_receipt(decode(encode(receipt)), SWARM, payee, NOW, previous)
            previous = Latest(receipt.sequence, receipt.block_tokens)
    assert identity_of(chains["carol"][0]) == peer(keys["home_server"])

    last = {name: Latest(chain[-1].sequence, chain[-1].block_tokens) for name, chain in chains.items()}
    alice = keys["alice"]
    signed_bad = {  # properly signed, but wrong
        "regressed": [sign_receipt(alice, SWARM, payee, 500, 21 + i, at=NOW) for i in range(3)],
        "wrong swarm": [sign_receipt(alice, "other-swarm", payee, 3000, 30 + i, at=NOW) for i in range(3)],
        "wrong payee": [sign_receipt(alice, SWARM, peer(keys["bob"]), 3000, 40 + i, at=NOW) for i in range(3)],
        "future": [sign_receipt(alice, SWARM, payee, 3000, 50, at=NOW + 3600)],
        "expired delegation": [sign_receipt(keys["carol"], SWARM, payee, 3000, 60,
                                            delegate(keys["home_server"], peer(keys["carol"]), SWARM, NOW - 1),
                                            at=NOW)],
        "delegation for another client": [sign_receipt(keys["alice"], SWARM, payee, 3000, 61, good_delegation,
                                                       at=NOW)],
        "delegation for another swarm": [sign_receipt(keys["carol"], SWARM, payee, 3000, 62,
                                                      delegate(keys["home_server"], peer(keys["carol"]), "x",
                                                               NOW + 3600), at=NOW)],
    }
    signers = {peer(keys[name]): name for name in chains}

    def mutate(kind: str) -> bytes | WorkReceipt:
        name = rng.choice(list(chains))
        base = rng.choice(chains[name])
        if kind == "bit flip":
            encoded = bytearray(encode(base))
            bit = rng.randrange(len(encoded) * 8)
            encoded[bit // 8] ^= 1 << (bit % 8)
            return bytes(encoded)
        if kind == "swapped payer":
            other = keys[rng.choice([n for n in keys if n != name])]
            fields = rng.choice([{"payer": peer(other)}, {"payer_key": public_key_der(other)},
                                 {"payer": peer(other), "payer_key": public_key_der(other)}])
            return base.model_copy(update=fields)
        if kind == "replayed":
            return base  # an older receipt of the chain: its sequence was seen already
        if kind == "edited field":
            field, value = rng.choice([("block_tokens", base.block_tokens + rng.randint(1, 10**9)),
                                       ("sequence", base.sequence + 1000), ("time", base.time + 1),
                                       ("swarm", "other-swarm"), ("payee", peer(keys["bob"])),
                                       ("signature", bytes(len(base.signature)))])
            return base.model_copy(update={field: value})
        if kind == "edited delegation" and chains["carol"]:
            carol = rng.choice(chains["carol"])
            field, value = rng.choice([("expires", carol.delegation.expires + 1),
                                       ("delegate", peer(keys["alice"])),
                                       ("issuer_key", public_key_der(keys["mallory"]))])
            return carol.model_copy(update={"delegation": carol.delegation.model_copy(update={field: value})})
        return rng.choice(signed_bad[rng.choice(list(signed_bad))])

    kinds = ["bit flip"] * 5 + ["swapped payer", "replayed", "edited field", "edited delegation", "signed bad"]
    rejected = 0
    for index in range(10_000):
        mutant = mutate(kinds[index % len(kinds)])
        try:
            receipt = decode(mutant) if isinstance(mutant, bytes) else mutant
            if not isinstance(receipt, WorkReceipt):
                raise BadRequestError("not a receipt")
            check_receipt(receipt, SWARM, payee, NOW, last.get(signers.get(receipt.payer)))
        except BadRequestError:  # ReceiptError, or the decoder's own named errors
            rejected += 1
    assert rejected == 10_000


# ---- standing ----------------------------------------------------------------------------------------------------

def _book(tmp_path, name, own, trusted=(), clock=lambda: NOW):
    return CreditBook(Ledger(tmp_path / f"{name}.sqlite"), SWARM, own, frozenset(trusted), clock=clock)


def _published(*receipts):
    """What servers put in the DHT, by publisher (each receipt's payee)."""
    by_payee = {}
    for receipt in receipts:
        by_payee.setdefault(receipt.payee, []).append(encode(receipt))
    return {payee: {"receipts": encoded} for payee, encoded in by_payee.items()}


def test_sybils_signing_each_other_gain_nothing(tmp_path, keys):
    """The honest server H trusts its operator's client (alice). Alice used the attacker's real server A a little
    and an honest server B a lot. The attacker then makes 20 identities that sign each other (and A) 10^9
    block-tokens each, and A signs them 10^9 too. At H, A's standing does not change, and the Sybils together get
    at most DAMPING x A's standing."""
    honest = peer(keys["server"])
    attacker, honest_b = peer(keys["mallory"]), peer(keys["bob"])
    alice = keys["alice"]
    real = [sign_receipt(alice, SWARM, attacker, 1_000, 1, at=NOW), sign_receipt(alice, SWARM, honest_b, 50_000, 2,
                                                                                 at=NOW)]
    book = _book(tmp_path, "h", honest, trusted=[peer(alice)])
    book.refresh(_published(*real))
    before = dict(book.standing)
    assert before[attacker] == pytest.approx(1_000) and before[honest_b] == pytest.approx(50_000)

    sybils = [new_key() for _ in range(20)]
    fake = [sign_receipt(a, SWARM, peer(b), 10**9, 1, at=NOW) for a in sybils for b in sybils if a is not b]
    fake += [sign_receipt(s, SWARM, attacker, 10**9, 2, at=NOW) for s in sybils]
    fake += [sign_receipt(keys["mallory"], SWARM, peer(s), 10**9, 3, at=NOW) for s in sybils]
    book.refresh(_published(*real, *fake))
    assert book.standing[attacker] == pytest.approx(before[attacker])
    assert book.standing[honest_b] == pytest.approx(before[honest_b])
    gained = sum(book.standing.get(peer(s), 0.0) for s in sybils)
    assert gained <= DAMPING * before[attacker] + 1e-6
    # Without any real work for a trusted payer, the whole Sybil ring is worth nothing.
    alone = _book(tmp_path, "h2", honest, trusted=[peer(alice)])
    alone.refresh(_published(*fake))
    assert not any(alone.standing.get(peer(s), 0) for s in sybils) and attacker not in alone.standing


def test_standing_is_two_hops_damped_and_decays():
    edges = [Edge("root", "a", 1000, NOW), Edge("a", "b", 4000, NOW), Edge("b", "c", 10**9, NOW),
             Edge("root", "old", 1000, NOW - 7 * 24 * 3600)]
    standing = compute_standing({"root"}, edges, NOW, half_life=7 * 24 * 3600, damping=0.5)
    assert standing["root"] == ROOT and standing["a"] == 1000
    assert standing["b"] == pytest.approx(0.5 * 1000)  # a hands out at most its own standing, damped
    assert "c" not in standing  # three hops away: nothing
    assert standing["old"] == pytest.approx(500)  # a week old: half


# ---- the server's book ---------------------------------------------------------------------------------------------

def test_a_client_that_stops_paying_loses_priority_within_the_slack(tmp_path, keys):
    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    payer = Payer(alice, SWARM)
    session = book.open_session(peer(alice), payer.receipt(server))
    assert book.priority(session) == ROOT
    for step in range(200):  # an honest client: pays every RECEIPT_EVERY_STEPS steps
        book.served(peer(alice), 30)
        payer.accepted(server, 30)
        if payer.due(server):
            book.accept(payer.receipt(server), peer(alice))
        assert book.priority(session) > 0, step
    lost_after = None
    for step in range(1, 200):  # it stops paying
        book.served(peer(alice), 30)
        payer.accepted(server, 30)
        if book.priority(session) == 0:
            lost_after = step
            break
    assert lost_after is not None and lost_after <= RECEIPT_SLACK_STEPS + RECEIPT_EVERY_STEPS
    book.accept(payer.receipt(server), peer(alice))  # paying again restores it
    assert book.priority(session) == ROOT
    with pytest.raises(ReceiptError, match="only .* were served"):  # never more than was served
        book.accept(sign_receipt(alice, SWARM, server, 10**9, 10**15, at=NOW), peer(alice))
    with pytest.raises(ReceiptError, match="sent by another peer"):
        book.accept(payer.receipt(server), peer(keys["bob"]))


def test_a_delegated_client_speaks_for_its_server_and_sessions_are_capped(tmp_path, keys):
    server, home = peer(keys["server"]), peer(keys["home_server"])
    carol = keys["carol"]
    clock = [NOW]
    book = _book(tmp_path, "s", server, trusted=[peer(keys["alice"])], clock=lambda: clock[0])
    book.refresh(_published(sign_receipt(keys["alice"], SWARM, home, 7_000, 1, at=NOW)))  # home served alice
    path = tmp_path / "carol.delegation"
    save_delegation(path, delegate(keys["home_server"], peer(carol), SWARM, NOW + 60))
    payer = Payer(carol, SWARM, load_delegation(path))
    sessions = [book.open_session(peer(carol), payer.receipt(server)) for _ in range(CREDITED_SESSIONS_PER_IDENTITY + 2)]
    priorities = [book.priority(s) for s in sessions]
    assert priorities[:CREDITED_SESSIONS_PER_IDENTITY] == [pytest.approx(7_000)] * CREDITED_SESSIONS_PER_IDENTITY
    assert priorities[CREDITED_SESSIONS_PER_IDENTITY:] == [0.0, 0.0]  # over the cap: served as free riders
    book.close_session(sessions[0])
    assert book.priority(sessions[-1]) == pytest.approx(7_000)  # a credited slot came free
    clock[0] = NOW + 61  # the delegation expired: carol is only herself again
    assert book.priority(sessions[1]) == 0.0
    undelegated = book.open_session(peer(keys["bob"]), None)
    assert book.priority(undelegated) == 0.0


def test_ledgers_survive_a_restart(tmp_path, keys):
    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    payer = Payer(alice, SWARM, ledger=Ledger(tmp_path / "alice.sqlite"))
    session = book.open_session(peer(alice), payer.receipt(server))
    for _ in range(20):
        book.served(peer(alice), 10)
        payer.accepted(server, 10)
    old = payer.receipt(server)
    book.accept(old, peer(alice))
    book.close_session(session)
    published = book.publication()
    book.close()

    again = _book(tmp_path, "s", server, trusted=[peer(alice)])
    assert again.served_block_tokens == 200 == published["served_block_tokens"]
    assert [r.block_tokens for r in again.ledger.receipts(EARNED, SWARM)] == [200]
    with pytest.raises(ReceiptError, match="replayed"):
        again.accept(old, peer(alice))
    resumed = Payer(alice, SWARM, ledger=Ledger(tmp_path / "alice.sqlite"))  # the client restarts too
    assert resumed.totals[server] == 200
    again.accept(resumed.receipt(server), peer(alice))
    assert decode(published["receipts"][0]).block_tokens == 200 and credits_key(SWARM).endswith(".credits")
    assert msgpack.unpackb(msgpack.packb(published, use_bin_type=True), raw=False)  # the DHT can carry it


# ---- priority in the engine ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama, 0, 2)


def _waiting(engine, session):
    hidden = torch.zeros(1, 1, engine.backend.config.hidden_size)
    step = Step(session, 0, SpanInputs(hidden, torch.zeros(1, 1, dtype=torch.int64), None, None))
    engine._inference.append(_Pending(step, None, None))


def _saturate(engine, sessions, plans):
    """Every session always has a step waiting (clients come straight back); returns the sessions of each plan."""
    engine._inference.clear()
    for session in sessions:
        _waiting(engine, session)
    served = []
    for _ in range(plans):
        plan = engine.plan()
        served.append([p.request.session for p in plan.pending])
        for p in plan.pending:
            _waiting(engine, p.request.session)
    engine._inference.clear()
    return served


def test_credited_sessions_go_first_and_free_riders_keep_a_share(engine):
    contributor = engine.open(0, 2, 1, 8)
    contributor.priority = 1000.0
    riders = [engine.open(0, 2, 1, 8) for _ in range(8)]
    engine.max_batch = 1
    try:
        served = [plan[0] for plan in _saturate(engine, [*riders, contributor], 400)]
    finally:
        engine.max_batch = 64
    share = sum(s is not contributor for s in served) / len(served)
    assert share >= 0.15 and share == pytest.approx(1 / FREE_RIDER_TURN)
    assert served.count(contributor) >= 0.75 * len(served)
    for rider in riders:  # each free rider progresses within a bound: its place in line x FREE_RIDER_TURN plans
        places = [i for i, s in enumerate(served) if s is rider]
        assert places and places[0] < FREE_RIDER_TURN * len(riders)
        assert max(b - a for a, b in zip(places, places[1:])) <= FREE_RIDER_TURN * len(riders)
    for session in [contributor, *riders]:
        engine.close_now(session)


def test_no_difference_without_contention_or_without_credits(engine):
    sessions = [engine.open(0, 2, 1, 8) for _ in range(9)]
    sessions[4].priority = 1000.0
    plans = _saturate(engine, sessions, 20)  # room for all: everyone in every plan, as first come first served
    assert all(len(plan) == 9 for plan in plans)
    sessions[4].priority = 0.0
    engine.max_batch = 1
    try:
        fifo = [plan[0] for plan in _saturate(engine, sessions, 27)]  # nobody credited: first come, first served
    finally:
        engine.max_batch = 64
    assert fifo == sessions * 3
    for session in sessions:
        engine.close_now(session)


def test_credited_steps_run_first_through_the_real_queue(engine):
    import asyncio

    async def main():
        free, credited = engine.open(0, 2, 1, 8), engine.open(0, 2, 1, 8)
        credited.priority = 5.0
        for session in (free, credited):
            await engine.reserve(session, 1, timeout=0)
        engine.max_batch = 1
        order = []
        hidden = torch.randn(1, 1, engine.backend.config.hidden_size)

        async def run(session):
            await engine.step(Step(session, 0, SpanInputs(hidden, torch.zeros(1, 1, dtype=torch.int64), None, None)))
            order.append(session)

        tasks = [asyncio.ensure_future(run(free)), asyncio.ensure_future(run(credited))]
        for _ in range(3):
            await asyncio.sleep(0)
        engine.drain()
        await asyncio.gather(*tasks)
        engine.max_batch = 64
        assert order == [credited, free]
        for session in (free, credited):
            await engine.close(session)

    asyncio.run(main())


def test_cache_room_goes_to_the_credited_waiter_first():
    import asyncio

    from corolla.server.cache import Allocation, CacheManager

    async def main():
        cache = CacheManager(4 * 8, page_tokens=8)  # 4 pages
        holder = Allocation()
        assert cache.try_grow(holder, 32).value == "ok"
        free_rider, credited = Allocation(), Allocation()
        got = []

        async def wait(allocation, priority, name):
            await cache.grow(allocation, 32, timeout=5, priority=priority)
            got.append(name)

        tasks = [asyncio.ensure_future(wait(free_rider, 0.0, "free")),
                 asyncio.ensure_future(wait(credited, 9.0, "credited"))]
        await asyncio.sleep(0.05)
        await cache.release(holder)
        await asyncio.sleep(0.05)
        assert got == ["credited"]
        await cache.release(credited)
        await asyncio.gather(*tasks)
        assert got == ["credited", "free"]

    asyncio.run(main())


def test_the_credits_command_writes_delegations_and_shows_ledgers(tmp_path, tiny_llama, capsys, keys):
    from corolla.cli import main
    from corolla.models.checkpoint import load_config, model_id
    from corolla.net.auth import generate_identity, peer_id_of_identity

    generate_identity(tmp_path / "server.key")
    main(["credits", "delegate", str(tiny_llama), "--server-identity", str(tmp_path / "server.key"),
          "--client-identity", str(tmp_path / "client.key"), "--out", str(tmp_path / "d.bin"), "--days", "1"])
    delegation = load_delegation(tmp_path / "d.bin")
    swarm = model_id(load_config(tiny_llama), tiny_llama.name)
    assert delegation.delegate == peer_id_of_identity(tmp_path / "client.key") and delegation.swarm == swarm
    assert peer_id_of_public_key(delegation.issuer_key) == peer_id_of_identity(tmp_path / "server.key")

    server = peer(keys["server"])
    book = CreditBook(Ledger(tmp_path / "server.sqlite"), swarm, server, frozenset())
    payer = Payer(keys["alice"], swarm)
    book.open_session(peer(keys["alice"]), None)
    book.served(peer(keys["alice"]), 1234)
    payer.accepted(server, 1234)
    book.accept(payer.receipt(server), peer(keys["alice"]))
    book.close()
    capsys.readouterr()
    main(["credits", "show", str(tiny_llama), "--ledger", str(tmp_path / "server.sqlite")])
    shown = capsys.readouterr().out
    assert f"{swarm}: earned 1,234, spent 0, served 1,234 block-tokens" in shown
    assert f"earned          1,234 block-tokens from {peer(keys['alice'])}" in shown


def test_forward_work_is_counted_but_does_not_cost_priority(tmp_path, keys):
    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    payer = Payer(alice, SWARM)
    session = book.open_session(peer(alice), payer.receipt(server))
    # Training: forwards and backwards, signed for with the client's next request (here: never, e.g. lost or with a
    # client that does not pay for them); they are not session steps, so they never count as steps behind.
    for _ in range(3 * RECEIPT_SLACK_STEPS):
        book.served(peer(alice), 100, in_session=False)
    book.served(peer(alice), 5)
    payer.accepted(server, 5)
    book.accept(payer.receipt(server), peer(alice))
    assert book.priority(session) == ROOT
    book.close()
    assert _book(tmp_path, "s", server).served_block_tokens == 3 * RECEIPT_SLACK_STEPS * 100 + 5


def test_a_waiting_credited_grower_never_stalls_steps_that_need_no_new_page_nor_smaller_fitting_ones():
    """Issue 20: while a credited session waits for pages, a free rider's decode step inside its own pages runs at
    once (no pre-emption), and a lower waiter whose need fits goes before a top waiter whose need does not."""
    import asyncio

    from corolla.server.cache import Allocation, CacheManager

    async def main():
        cache = CacheManager(4 * 8, page_tokens=8)  # 4 pages
        rider, holder = Allocation(), Allocation()
        assert cache.try_grow(rider, 8).value == "ok" and cache.try_grow(holder, 16).value == "ok"  # 1 page free
        big = asyncio.ensure_future(cache.grow(Allocation(), 24, timeout=5, priority=9.0))  # needs 3 pages
        await asyncio.sleep(0.02)
        assert not big.done()
        began = asyncio.get_running_loop().time()
        await cache.grow(rider, 5, timeout=2, priority=0.0)  # holds the page already
        await cache.grow(rider, 16, timeout=2, priority=0.0)  # needs 1 page: 1 is free, the top waiter needs 3
        assert asyncio.get_running_loop().time() - began < 0.5 and rider.page_count == 2
        await cache.release(holder)
        await cache.release(rider)
        await asyncio.wait_for(big, 2)

    asyncio.run(main())


def test_republished_and_older_receipts_count_once(tmp_path, keys):
    """Issue 20: a server publishing the same receipt many times, or a payer's older cumulative receipts, or another
    server's receipts as its own, gains nothing: one edge per (payer, payee), its highest sequence."""
    honest, attacker, other = peer(keys["server"]), peer(keys["mallory"]), peer(keys["bob"])
    alice = keys["alice"]
    chain = [sign_receipt(alice, SWARM, attacker, 100 * i, i, at=NOW) for i in range(1, 6)]  # cumulative: 500
    for_other = sign_receipt(alice, SWARM, other, 700, 1, at=NOW)
    book = _book(tmp_path, "h", honest, trusted=[peer(alice)])
    book.refresh({other: {"receipts": [encode(for_other)]}})  # verified (and cached) once from its own publisher
    book.refresh({attacker: {"receipts": [encode(chain[-1])] * 20 + [encode(r) for r in chain]
                             + [encode(for_other)] * 5},
                  other: {"receipts": [encode(for_other)] * 3}})
    assert book.standing[attacker] == pytest.approx(500)
    assert book.standing[other] == pytest.approx(700)
    book.refresh({attacker: {"receipts": [encode(for_other)]}})  # only another server's receipt: not its work
    assert attacker not in book.standing and other not in book.standing


def test_a_failing_ledger_leaves_the_book_as_the_ledger_and_never_costs_a_session(tmp_path, keys, engine):
    """Issue 20: the ledger is written before the book's memory (a failed write leaves both as they were), and a
    failure inside credits opens the session without credit, never leaking its engine session or escaping."""
    from corolla.net.messages import OpenSession
    from corolla.server.handlers import Handlers, Limits

    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    payer = Payer(alice, SWARM)
    book.served(peer(alice), 10)
    payer.accepted(server, 10)
    receipt = payer.receipt(server)
    book.ledger.close()
    with pytest.raises(Exception):
        book.accept(receipt, peer(alice))
    book.ledger = Ledger(tmp_path / "s.sqlite")
    book.accept(receipt, peer(alice))  # not "replayed": the failed attempt left no trace in memory either

    class Broken:
        def open_session(self, peer_id, receipt):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")

        accept = close_session = open_session

    handlers = Handlers(engine.backend, engine, SWARM, Limits(64, 4, 64, 60.0), None, credits=Broken())
    before = set(engine.sessions)
    session = handlers._open(OpenSession(model_id=SWARM, start_block=0, end_block=2, max_length=8, receipt=receipt),
                             peer(alice))
    assert session.credit is None and session.state in engine.sessions
    handlers._take_receipt(receipt, peer(alice))  # logged, not raised: the reader task lives on
    import asyncio
    asyncio.run(handlers._close(session))
    assert set(engine.sessions) == before


def test_an_honest_client_stays_credited_after_the_server_lost_unsaved_counts_in_a_crash(tmp_path, keys):
    """Issue 20: served counts reach the ledger every few seconds; after a crash an honest client's cumulative
    receipts exceed what the server remembers serving. Its first receipt re-bases the count (once per restart);
    a new peer, or the same peer again, still cannot receipt more than was served."""
    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    payer = Payer(alice, SWARM)
    session = book.open_session(peer(alice), None)
    book.served(peer(alice), 1000)
    payer.accepted(server, 1000)
    book.accept(payer.receipt(server), peer(alice))  # saves the count
    book.served(peer(alice), 500)  # never saved: the server crashes (no close)
    payer.accepted(server, 500)
    del session

    again = _book(tmp_path, "s", server, trusted=[peer(alice)])
    assert again.served_block_tokens == 1000
    session = again.open_session(peer(alice), None)
    again.served(peer(alice), 100)
    payer.accepted(server, 100)
    again.accept(payer.receipt(server), peer(alice))  # 1600 > 1100 remembered: the lost 500 re-based
    assert again.priority(session) == ROOT and again.served_block_tokens == 1600
    for _ in range(RECEIPT_SLACK_STEPS * 2):
        again.served(peer(alice), 10)
        payer.accepted(server, 10)
        if payer.due(server):
            again.accept(payer.receipt(server), peer(alice))
    assert again.priority(session) == ROOT
    with pytest.raises(ReceiptError, match="only .* were served"):  # once per restart only
        again.accept(sign_receipt(alice, SWARM, server, 10**9, 10**15, at=NOW), peer(alice))
    with pytest.raises(ReceiptError, match="only .* were served"):  # a peer the ledger did not know
        again.accept(sign_receipt(keys["bob"], SWARM, server, 10, 1, at=NOW), peer(keys["bob"]))


def test_a_low_standing_step_that_cannot_share_a_forward_still_gets_turns(engine):
    """Issue 20: credited steps are sorted by standing; one of low standing whose step cannot share a forward with
    the higher ones (other blocks) still goes first every FREE_RIDER_TURN-th plan, like a free rider would."""
    high = engine.open(0, 2, 1, 8)
    high.priority = 1000.0
    low = engine.open(0, 1, 1, 8)  # another span: never in the same forward as `high`
    low.priority = 1.0
    served = [plan[0] for plan in _saturate(engine, [high, low], 40)]
    places = [i for i, s in enumerate(served) if s is low]
    assert places and places[0] < FREE_RIDER_TURN
    assert max(b - a for a, b in zip(places, places[1:])) <= FREE_RIDER_TURN
    assert served.count(high) >= 0.75 * len(served)
    for session in (high, low):
        engine.close_now(session)


def test_malformed_credits_records_are_skipped_by_servers_and_the_command(tmp_path, keys):
    """Issue 20: a publisher's record that is not a valid CreditsRecord is skipped; the others still count, and
    `corolla credits show` prints them."""
    from corolla.credits.commands import _standing_lines

    honest, other = peer(keys["server"]), peer(keys["bob"])
    alice = keys["alice"]
    good = {"receipts": [encode(sign_receipt(alice, SWARM, other, 700, 1, at=NOW))], "standing": {peer(alice): 5.0},
            "served_block_tokens": 700, "started": NOW}
    bad = {"QmBad1": {"standing": []}, "QmBad2": {"receipts": "x"}, "QmBad3": [1, 2], "QmBad4": {"standing": {"x": {}}},
           "QmBad5": {"served_block_tokens": "many"}, "QmBad6": {"standing": [1]}}
    book = _book(tmp_path, "h", honest, trusted=[peer(alice)])
    book.refresh({other: good, **bad})
    assert book.standing[other] == pytest.approx(700)
    lines = _standing_lines({other: good, **bad}, SWARM, peer(alice))
    assert len(lines) == 2 and other in lines[1] and "700" in lines[1] and "standing 5" in lines[1]


def test_the_server_closes_its_credits_ledger_only_after_its_node(tmp_path, tiny_llama, monkeypatch):
    """Issue 20: handlers run until the node shuts down; the ledger they write must still be open then."""
    import asyncio

    from corolla.net.node import NetworkConfig
    from corolla.server import server as server_module
    from corolla.server.config import ServerConfig

    seen = []

    class FakeNode:
        peer_id = "QmFakeServer"

        async def shutdown(self):
            seen.append(server.credits.ledger.served(SWARM) == {})  # raises if the ledger is closed

    async def create(*args, **kwargs):
        return FakeNode()

    async def choose_blocks(node):
        raise RuntimeError("stop here")

    server = server_module.Server(ServerConfig(model=str(tiny_llama), credits=True,
                                               credits_ledger=str(tmp_path / "l.sqlite")), NetworkConfig())
    monkeypatch.setattr(server_module.Node, "create", create)
    monkeypatch.setattr(server, "_choose_blocks", choose_blocks)
    with pytest.raises(RuntimeError, match="stop here"):
        asyncio.run(server.run())
    assert seen == [True]


def test_peers_without_receipts_are_forgotten_and_standing_uses_the_largest_receipts(tmp_path, keys, monkeypatch):
    """Issue 20: peer ids are free, so the book keeps nothing per peer that has no receipt and no session open
    (its work stays in the total served, here and in the ledger), and standing reads at most STANDING_EDGES."""
    import corolla.credits.book as book_module

    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    for i in range(300):
        session = book.open_session(f"QmFree{i}", None)
        book.served(f"QmFree{i}", 10)
        book.served(f"QmFree{i}", 5, in_session=False)
        book.close_session(session)
    payer = Payer(alice, SWARM)
    session = book.open_session(peer(alice), None)
    book.served(peer(alice), 40)
    payer.accepted(server, 40)
    book.accept(payer.receipt(server), peer(alice))
    book.close_session(session)
    assert list(book._payers) == [peer(alice)] and book.served_block_tokens == 300 * 15 + 40
    assert len(book.ledger.served(SWARM)) <= 3  # alice, forwards, the forgotten peers
    book.close()
    assert _book(tmp_path, "s", server).served_block_tokens == 300 * 15 + 40

    monkeypatch.setattr(book_module, "STANDING_EDGES", 2)
    others = [peer(keys[name]) for name in ("bob", "carol", "mallory")]
    ranked = _book(tmp_path, "r", server, trusted=[peer(alice)])
    ranked.refresh(_published(*[sign_receipt(alice, SWARM, who, 100 * (i + 1), 1, at=NOW)
                                for i, who in enumerate(others)]))
    assert others[0] not in ranked.standing and ranked.standing[others[2]] == pytest.approx(300)


def test_a_delegation_arriving_mid_session_moves_its_slot_to_the_delegating_server(tmp_path, keys):
    """Issue 20: a session that took a credited slot as its own peer, then sent a receipt with a delegation, gets
    the delegating server's standing (and its slot counts against that server's cap); when the delegation
    expires it speaks for itself again."""
    server, home, carol = peer(keys["server"]), peer(keys["home_server"]), keys["carol"]
    clock = [NOW]
    book = _book(tmp_path, "s", server, trusted=[peer(keys["alice"])], clock=lambda: clock[0])
    book.refresh(_published(sign_receipt(keys["alice"], SWARM, home, 7_000, 1, at=NOW),
                            sign_receipt(keys["alice"], SWARM, peer(carol), 50, 2, at=NOW)))
    session = book.open_session(peer(carol), None)
    assert book.priority(session) == pytest.approx(50)
    payer = Payer(carol, SWARM, delegate(keys["home_server"], peer(carol), SWARM, NOW + 60))
    book.accept(payer.receipt(server), peer(carol))
    assert book.priority(session) == pytest.approx(7_000)
    assert book._credited[home] == 1 and book._credited[peer(carol)] == 0
    clock[0] = NOW + 61
    assert book.priority(session) == pytest.approx(50)
    assert book._credited[home] == 0 and book._credited[peer(carol)] == 1


def test_forward_and_backward_work_is_signed_for_with_the_next_request(tmp_path, keys, monkeypatch):
    """Issue 20: stateless work earns credit too. A forward of 10 tokens through 3 blocks is 30 block-tokens, a
    backward 60 (it counts twice); the client signs for them with its next request (Payer.receipt_if_owed), the
    server accepts receipts up to what it served that payer, and keeps peers without a receipt yet only boundedly."""
    import corolla.credits.book as book_module

    server, alice = peer(keys["server"]), keys["alice"]
    book = _book(tmp_path, "s", server, trusted=[peer(alice)])
    payer = Payer(alice, SWARM)
    assert payer.receipt_if_owed(server) is None  # the first request owes nothing
    book.served(peer(alice), 30, in_session=False)  # the forward
    payer.accepted(server, 30)
    book.accept(payer.receipt_if_owed(server), peer(alice))  # carried by the backward request
    book.served(peer(alice), 60, in_session=False)  # the backward
    payer.accepted(server, 60)
    book.accept(payer.receipt_if_owed(server), peer(alice))  # carried by the next forward
    assert book._payers[peer(alice)].latest.block_tokens == 90 == book.served_block_tokens
    assert payer.receipt_if_owed(server) is None
    with pytest.raises(ReceiptError, match="only 90 were served"):
        payer.accepted(server, 1)  # a client claiming work that was not done for it
        book.accept(payer.receipt(server), peer(alice))
    session = book.open_session(peer(alice), None)  # its sessions are credited, the stateless work cost nothing
    assert book.priority(session) == ROOT
    book.close_session(session)

    monkeypatch.setattr(book_module, "STATELESS_PEERS", 5)
    for i in range(8):  # peers that never sign (credits off): kept per peer until 5 others came after them
        book.served(f"QmFree{i}", 10, in_session=False)
    assert sorted(p for p in book._payers if p.startswith("QmFree")) == [f"QmFree{i}" for i in range(3, 8)]
    assert book.served_block_tokens == 90 + 80
    book.close()
    again = _book(tmp_path, "s", server, trusted=[peer(alice)])
    assert again.served_block_tokens == 170
    assert sorted(p for p in again._payers if p.startswith("QmFree")) == [f"QmFree{i}" for i in range(3, 8)]
