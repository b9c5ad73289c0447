"""Fuzzing a live server (a real process) with malformed and hostile messages over real libp2p streams.

Hypothesis draws message specs; each becomes raw frame bytes (typed envelopes with wrong types, shapes, dtypes,
byte counts, huge lengths, negative positions, unknown fields, push targets, garbage msgpack, truncated payloads).
The expected answer to each frame is computed by the same parsing code the server runs (wire.decode, then the
handlers' parse_step / parse_forward): an `error` reply with exactly that message, or a `step_result` for frames
that are valid however hostile. Meanwhile an honest client generates text through the same server.

Shown: at least 10,000 messages; the server never crashes and keeps serving; every message is answered with a
well-formed reply naming the problem; the honest session's output equals plain transformers' throughout; the
server's announced cache budget returns to full once the fuzz sessions close; no traceback in the server's log.
"""

from __future__ import annotations

import asyncio
import re
import struct
import threading
import time
from collections import Counter
from concurrent.futures import Future
from types import SimpleNamespace

import msgpack
import numpy as np
import psutil
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from conftest import LONG, start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.errors import BadRequestError
from corolla.models.checkpoint import load_config, model_id
from corolla.net.directory import read_servers
from corolla.net.messages import (FORWARD_PROTOCOL, INFERENCE_PROTOCOL, PUSH_PROTOCOL, CloseSession, ErrorReply,
                                  ForwardRequest, ForwardResult, OpenSession, SessionOpened, Step, StepResult)
from corolla.net.node import NetworkConfig, Node
from corolla.net.wire import WIRE_VERSION, decode
from corolla.server.handlers import Limits, parse_forward, parse_reorder, parse_step

HIDDEN = 64  # tiny Llama's hidden size
CACHE_TOKENS = 4096
LIMITS = Limits(max_session_length=4096, max_batch_size=4, max_step_tokens=4096, session_idle_timeout=300)
SERVER_ARGS = ["--announce-period", "1", "--cache-tokens", str(CACHE_TOKENS),
               "--max-session-length", str(LIMITS.max_session_length), "--max-batch-size", str(LIMITS.max_batch_size),
               "--max-step-tokens", str(LIMITS.max_step_tokens)]
SESSION_MAX_LENGTH = 64  # of the fuzzed sessions
PREFIX = 8  # tokens a fuzzed session holds before the fuzz starts
BATCH = 50  # messages drawn per hypothesis example, sent back to back on one stream before reading the answers
EXAMPLES = 600 if LONG else 210  # step-stream examples (x BATCH messages)
FAKE_BACKEND = SimpleNamespace(config=SimpleNamespace(hidden_size=HIDDEN), start=0, end=5)
DTYPES = ["float32", "float16", "bfloat16", "int64", "int32", "bool", "uint8"]
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1, "uint8": 1}
MESSAGE_TYPES = ["open_session", "session_opened", "step", "step_result", "pushed_step", "close_session",
                 "forward_request", "forward_result", "error", "ping", "pong", "swarm_auth"]


# ---- message specs (hypothesis) and their frames ---------------------------------------------------------------

ints = st.one_of(st.integers(-2**63, 2**64 - 1), st.sampled_from([-1, 0, 1, 2, 63, 64, 65, 4096, 4097, 2**31, 2**63]))
junk = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(), st.text(max_size=8), st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=6)
tensors = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(DTYPES), st.text(max_size=8)),
    "shape": st.one_of(st.just("good"), st.lists(st.integers(-3, 2**40), max_size=5),
                       st.lists(st.sampled_from([0, 1, 2, 3, 4, 63, 64, 65, 4097, 2**31, 2**62]), max_size=4)),
    "data": st.sampled_from(["exact", "exact", "short", "long", "empty"]),
    "values": st.sampled_from(["normal", "nan", "inf", "huge", "negative"]),
    "codec": st.one_of(st.just(None), st.sampled_from(["raw", "int8"]), st.text(max_size=6)),  # None: no codec key
})
push_targets = st.lists(st.fixed_dictionaries({
    "peer_id": st.one_of(st.sampled_from(["server", "bootstrap", "fuzzer"]), st.text(max_size=12)),
    "session_id": st.one_of(st.sampled_from(["own", "none"]), st.text(max_size=70)),
}), max_size=3)
steps = st.fixed_dictionaries({
    "step_id": st.one_of(st.just(None), st.integers(0, 2**32), ints),
    "start": st.one_of(st.sampled_from(["length", "zero", "past", "end"]), ints),
    "tokens": st.integers(1, 4),
    "hidden": st.one_of(st.just(None), tensors),  # None = a valid hidden
    "position_ids": st.one_of(st.just(None), tensors),
    "attention_mask": st.one_of(st.just(None), tensors),
    "reorder": st.one_of(st.just(None), tensors),
    "push_to": st.one_of(st.just([]), push_targets, st.lists(st.just({"peer_id": "x", "session_id": "y"}),
                                                             min_size=65, max_size=65)),
    "override": st.one_of(st.just(None), st.tuples(st.sampled_from(
        ["step_id", "start", "hidden", "position_ids", "attention_mask", "push_to", "reorder", "extra"]), junk)),
})
envelopes = st.fixed_dictionaries({
    "type": st.one_of(st.sampled_from(MESSAGE_TYPES), junk),
    "v": st.one_of(st.just(WIRE_VERSION), junk),
    "body": st.one_of(st.just("step"), junk),
    "extra": st.booleans(),
})
raw_frames = st.one_of(
    st.binary(max_size=64).map(lambda b: ("raw", b)),
    st.tuples(st.just("truncated"), st.integers(0, 200)),
    st.tuples(st.just("flipped"), st.integers(0, 10**6), st.integers(1, 255)),
    st.sampled_from([("raw", b"\xdb\xff\xff\xff\xff"), ("raw", b"\xdd\xff\xff\xff\xff"), ("raw", b"\x91" * 2000),
                     ("raw", b"\xdf\xff\xff\xff\xff"), ("raw", b"\xc1"), ("raw", b"")]),
)
specs = st.one_of(steps.map(lambda s: ("step", s)), envelopes.map(lambda e: ("envelope", e)), raw_frames)


class SessionModel:
    """What the client knows of a fuzzed session on the server: its cached length (the counter model)."""

    def __init__(self, session_id: str, peers: dict[str, str]):
        self.session_id, self.peers, self.length = session_id, peers, PREFIX
        self.rng = np.random.default_rng(0)


def _tensor(spec: dict | None, dtype: str, good_shape: tuple[int, ...], rng) -> dict:
    if spec is None:
        spec = {"dtype": dtype, "shape": "good", "data": "exact", "values": "normal", "codec": None}
    shape = good_shape if spec["shape"] == "good" else tuple(spec["shape"])
    itemsize = ITEMSIZE.get(spec["dtype"], 4)
    count = int(np.prod(shape, dtype=object)) if shape else 1
    exact = count * itemsize if 0 <= count <= 16384 else 0
    if spec["codec"] == "int8":  # blocks of 64 int8 values, then a float32 scale per block
        blocks = -(-count // 64) if 0 <= count <= 16384 else 0
        tensor = {"dtype": spec["dtype"], "shape": list(shape), "codec": "int8",
                  "data": rng.bytes(blocks * 64) + np.full(blocks, 0.01, dtype="<f4").tobytes()}
        if spec["data"] != "exact":
            tensor["data"] = tensor["data"][:-1] if spec["data"] == "short" else tensor["data"] + b"\x00"
        return tensor
    size = {"exact": exact, "short": max(exact - 1, 0), "long": exact + itemsize, "empty": 0}[spec["data"]]
    if spec["dtype"] == "float32" and size % 4 == 0:
        values = rng.standard_normal(size // 4).astype(np.float32)
        if len(values) and spec["values"] != "normal":
            values[: max(1, len(values) // 3)] = {"nan": np.nan, "inf": np.inf, "huge": 3e38,
                                                  "negative": -1e30}[spec["values"]]
        data = values.tobytes()
    elif spec["dtype"] in ("int64", "int32") and size % itemsize == 0:
        fill = {"normal": 1, "nan": 0, "inf": 2**30, "huge": 2**31 - 1, "negative": -5}[spec["values"]]
        data = np.full(size // itemsize, fill, dtype=spec["dtype"]).tobytes()
    else:
        data = rng.bytes(size)
    tensor = {"dtype": spec["dtype"], "shape": list(shape), "data": data}
    if spec["codec"] is not None:
        tensor["codec"] = spec["codec"]
    return tensor


def _step_body(spec: dict, session: SessionModel, step_id: int) -> dict:
    rng = session.rng
    tokens = spec["tokens"]
    start = spec["start"]
    if isinstance(start, str):
        start = {"length": session.length, "zero": 0, "past": session.length + 1 + tokens,
                 "end": SESSION_MAX_LENGTH - tokens + 1}[start]
    if isinstance(start, int) and start == session.length and start + tokens > SESSION_MAX_LENGTH:
        start = 0  # keep most valid steps valid once the session is full
    width = start + tokens if isinstance(start, int) and 0 <= start < 2**20 else 1
    targets = [{"peer_id": session.peers.get(t["peer_id"], t["peer_id"]),
                "session_id": {"own": session.session_id, "none": ""}.get(t["session_id"], t["session_id"])}
               for t in spec["push_to"]]
    body = {
        "step_id": step_id if spec["step_id"] is None else spec["step_id"],
        "start": start,
        "hidden": _tensor(spec["hidden"], "float32", (1, tokens, HIDDEN), rng),
        "position_ids": None if spec["position_ids"] is None else _tensor(spec["position_ids"], "int64",
                                                                           (1, tokens), rng),
        "attention_mask": None if spec["attention_mask"] is None else _tensor(spec["attention_mask"], "int64",
                                                                               (1, width), rng),
        "push_to": targets,
        "reorder": None if spec["reorder"] is None else _tensor(spec["reorder"], "int64", (1,), rng),
    }
    if spec["override"] is not None:
        field, value = spec["override"]
        body[field] = value
    return body


def _packb(obj) -> bytes | None:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return None


def frame_payload(spec, session: SessionModel, step_id: int) -> bytes | None:
    kind = spec[0]
    if kind == "step":
        return _packb({"type": "step", "v": WIRE_VERSION, "body": _step_body(spec[1], session, step_id)})
    if kind == "envelope":
        e = spec[1]
        body = _step_body(_VALID_STEP, session, step_id) if e["body"] == "step" else e["body"]
        envelope = {"type": e["type"], "v": e["v"], "body": body}
        if e["extra"]:
            envelope["extra"] = 1
        return _packb(envelope)
    valid = _packb({"type": "step", "v": WIRE_VERSION, "body": _step_body(_VALID_STEP, session, step_id)})
    if kind == "raw":
        return spec[1]
    if kind == "truncated":
        return valid[: spec[1] % len(valid)]
    if kind == "flipped":
        position = spec[1] % len(valid)
        return valid[:position] + bytes([valid[position] ^ spec[2]]) + valid[position + 1:]
    raise AssertionError(kind)


_VALID_STEP = {"step_id": None, "start": "length", "tokens": 1, "hidden": None, "position_ids": None,
               "attention_mask": None, "reorder": None, "push_to": [], "override": None}


def expected_reply(payload: bytes, session: SessionModel):
    """("error", message) or ("result", step) exactly as the server must answer, or None to skip the frame."""
    try:
        message = decode(payload)
    except BadRequestError as e:
        return "error", str(e)[:2000]
    if isinstance(message, CloseSession):
        return None  # would end the session: not a malformed message
    if not isinstance(message, Step):
        return "error", f"expected step or close_session, got {message.TYPE}"
    fake = SimpleNamespace(length=session.length, batch_size=1, max_length=SESSION_MAX_LENGTH,
                           start_block=0, end_block=5, lora=None)
    try:
        parse_step(message, fake, FAKE_BACKEND, LIMITS)
        parse_reorder(message, fake)
    except BadRequestError as e:
        return "error", str(e)[:2000]
    if any(len(t.peer_id) > 0 and t.peer_id == session.peers["fuzzer-unreachable"] for t in message.push_to):
        return None  # an unknown peer: the server's push waits for its timeout; done once, elsewhere
    return "result", message


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


# ---- the fuzzing client: its own loop thread, so hypothesis (synchronous) can drive it --------------------------

class Fuzzer:
    def __init__(self, peers: list[str]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.node: Node = self.run(Node.create(NetworkConfig(initial_peers=tuple(peers)), client_mode=True))
        self.sent = 0  # frames sent in all
        self.answered = 0  # of which answered by a reply we checked

    def run(self, coroutine, timeout: float = 120):
        future: Future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.run(self.node.shutdown(), 30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def open(self, server: str, model: str, max_length: int = SESSION_MAX_LENGTH, prefix: int = PREFIX,
                   cache_wait: float = 10.0):
        stream = await self.node.connect(server, INFERENCE_PROTOCOL, timeout=10)
        await stream.send(OpenSession(model_id=model, start_block=0, end_block=5, max_length=max_length,
                                      cache_wait=cache_wait))
        opened = await stream.recv(timeout=30)
        assert isinstance(opened, SessionOpened), opened
        if prefix:
            hidden = torch.randn(1, prefix, HIDDEN)
            from corolla.net.wire import WireTensor
            await stream.send(Step(step_id=0, start=0, hidden=WireTensor.from_torch(hidden)))
            result = await stream.recv(timeout=60)
            assert isinstance(result, StepResult), result
        return stream, opened.session_id

    async def request(self, server: str, protocol: str, payload: bytes, what: str):
        """One frame on a new stream, and its answer."""
        stream = await self.node.connect(server, protocol, timeout=10)
        try:
            stream._writer.write(frame(payload))
            await stream._writer.drain()
            self.sent += 1
            try:
                reply = await stream.recv(timeout=30)
            except (EOFError, ConnectionError) as e:
                raise AssertionError(f"{what}: the stream ended with no answer ({e!r}); frame {payload[:200]!r}")
            self.answered += 1
            return reply
        finally:
            stream.close()

    async def exchange(self, stream, payloads: list[bytes], expected: list) -> list:
        """Send the frames back to back, then read one answer per expected reply."""
        stream._writer.write(b"".join(frame(p) for p in payloads))
        await stream._writer.drain()
        self.sent += len(payloads)
        replies = [await stream.recv(timeout=60) for _ in expected]
        self.answered += len(replies)
        return replies


FAMILIES: Counter = Counter()  # kinds of answers seen: error messages without their numbers and quoted values


def family(message: str) -> str:
    return re.sub(r"'[^']*'|\"[^\"]*\"|\[[^\]]*\]|-?\d+", "_", message)[:60]


def check_replies(expected: list, replies: list, context: str) -> None:
    for (kind, want), got in zip(expected, replies):
        FAMILIES[family(want) if kind == "error" else "(step_result)"] += 1
        if kind == "error":
            assert isinstance(got, ErrorReply) and got.kind == "bad_request" and got.message == want, \
                f"{context}: expected error {want!r}, got {got!r}"[:3000]
        else:
            assert isinstance(got, StepResult) and got.step_id == want.step_id, f"{context}: expected a result, got {got!r}"
            assert got.hidden.shape == (1, want.hidden.shape[1], HIDDEN) and got.hidden.dtype == want.hidden.dtype


# ---- the test ----------------------------------------------------------------------------------------------------

@pytest.fixture
def fuzz_swarm(local_swarm, tiny_llama):
    (server,) = start_swarm(local_swarm, tiny_llama, [(0, 5)], extra_args=SERVER_ARGS)
    return local_swarm, server


def test_fuzzing_a_live_server(fuzz_swarm, tiny_llama, tmp_path):
    swarm, server = fuzz_swarm
    server_id = server.log().split("ready: ")[1].split(" as ")[1].split()[0]
    config = load_config(tiny_llama)
    model = model_id(config, "tiny-llama")
    began = time.monotonic()
    server_rss = psutil.Process(server.pid)

    # An honest client generating all along; its outputs must equal plain transformers'.
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    honest = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, swarm.initial_peers)
    prompts = [torch.randint(3, 320, (1, 6), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    wanted = [reference.generate(p, max_new_tokens=12, do_sample=False).tolist() for p in prompts]
    stop, honest_runs, honest_errors = threading.Event(), [], []

    def honest_loop():
        try:
            while not stop.is_set():
                i = len(honest_runs) % len(prompts)
                got = honest.generate(prompts[i], max_new_tokens=12, do_sample=False).tolist()
                honest_runs.append(got == wanted[i])
        except Exception as e:  # reported by the main thread
            honest_errors.append(e)

    fuzzer = Fuzzer(swarm.initial_peers)
    honest_thread = threading.Thread(target=honest_loop, daemon=True)
    honest_thread.start()
    try:
        stream, session_id = fuzzer.run(fuzzer.open(server_id, model))
        bootstrap = swarm.initial_peers[0].split("/p2p/")[1]
        session = SessionModel(session_id, {"server": server_id, "bootstrap": bootstrap,
                                            "fuzzer": fuzzer.node.peer_id,
                                            "fuzzer-unreachable": "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"})
        rss_before = server_rss.memory_info().rss
        counter = iter(range(1, 10**9))

        # 1. Thousands of steps, mostly malformed, on one open session.
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(batch=st.lists(specs, min_size=BATCH, max_size=BATCH))
        def fuzz_steps(batch):
            payloads, expected = [], []
            for spec in batch:
                payload = frame_payload(spec, session, next(counter))
                want = None if payload is None else expected_reply(payload, session)
                if want is None:
                    continue
                payloads.append(payload)
                expected.append(want)
                if want[0] == "result":  # the server's counter model: cache = start + new tokens
                    session.length = want[1].start + want[1].hidden.shape[1]
            replies = fuzzer.run(fuzzer.exchange(stream, payloads, expected))
            check_replies(expected, replies, "step stream")

        fuzz_steps()
        step_messages = fuzzer.sent

        # 2. The same session, fed through the push protocol: bad steps addressed by its secret token are
        # answered on the session's own stream; pushes to unknown sessions and garbage frames are dropped.
        fuzzer.run(fuzz_pushes(fuzzer, server_id, stream, session))

        # 3. Session opening and forward requests: one stream each, every one refused with a reason.
        fuzzer.run(fuzz_opens(fuzzer, server_id, model))
        fuzzer.run(fuzz_forwards(fuzzer, server_id, model))

        # 4. Cache exhaustion, truncated frames, oversized frame headers, a push to a peer that does not exist.
        fuzzer.run(fuzz_edges(fuzzer, server_id, model, session), timeout=300)

        fuzzer.run(stream.send(CloseSession()))
        stream.close()
        stop.set()
        honest_thread.join(120)
        assert not honest_errors, honest_errors
        assert honest_runs and all(honest_runs), f"honest outputs differed: {honest_runs}"

        total = fuzzer.sent
        print(f"\nfuzz: {total} frames sent ({step_messages} on the step stream), {fuzzer.answered} answers checked, "
              f"{len(honest_runs)} honest generations identical, {time.monotonic() - began:.1f} s")
        assert total >= 10_000
        print(f"fuzz: {len(FAMILIES)} kinds of answers, most common: {FAMILIES.most_common(12)}")
        assert len(FAMILIES) >= 30 and FAMILIES["(step_result)"] >= 100  # the fuzz reaches deep, valid steps too

        # Nothing leaked: every session is closed and the announced cache budget is full again.
        deadline = time.monotonic() + 20
        while True:
            records = fuzzer.run(read_servers(fuzzer.node, model, config.num_hidden_layers))
            left = {r.peer_id: r.record.cache_tokens_left for r in records}.get(server_id)
            if left == CACHE_TOKENS:
                break
            assert time.monotonic() < deadline, f"cache budget did not come back: {left} of {CACHE_TOKENS} tokens"
            time.sleep(0.5)
        rss_growth = (server_rss.memory_info().rss - rss_before) / 2**20
        print(f"fuzz: server RSS grew by {rss_growth:.0f} MiB")
        assert rss_growth < 300

        # Still serving, exactly.
        assert server.alive()
        assert honest.generate(prompts[0], max_new_tokens=12, do_sample=False).tolist() == wanted[0]
        log = server.log()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    finally:
        stop.set()
        honest_thread.join(60)
        honest.close()
        fuzzer.close()


async def fuzz_pushes(fuzzer: Fuzzer, server_id: str, stream, session: SessionModel, count: int = 200) -> None:
    from corolla.net.wire import WireTensor

    rng = np.random.default_rng(1)
    push = await fuzzer.node.connect(server_id, PUSH_PROTOCOL, timeout=10)
    expected, payloads = [], []
    for i in range(count):
        bad = Step(step_id=i, start=session.length + 5, hidden=WireTensor.from_torch(torch.zeros(1, 1, HIDDEN)))
        if i % 2:  # wrong width
            bad = bad.model_copy(update={"start": 0,
                                         "hidden": WireTensor.from_torch(torch.zeros(1, 1, HIDDEN + 1))})
        payloads.append(_packb({"type": "pushed_step", "v": WIRE_VERSION,
                                "body": {"session_id": session.session_id, "step": bad.model_dump()}}))
        expected.append(("error", expected_reply(_packb({"type": "step", "v": WIRE_VERSION,
                                                          "body": bad.model_dump()}), session)[1]))
        # the same, addressed to sessions that do not exist: dropped
        payloads.append(_packb({"type": "pushed_step", "v": WIRE_VERSION,
                                "body": {"session_id": rng.bytes(8).hex(), "step": bad.model_dump()}}))
    push._writer.write(b"".join(frame(p) for p in payloads))
    await push._writer.drain()
    fuzzer.sent += len(payloads)
    replies = [await stream.recv(timeout=60) for _ in expected]
    fuzzer.answered += len(replies)
    check_replies(expected, replies, "push stream")
    push.close()
    for garbage in (b"\xc1", b"", msgpack.packb([1, 2]), msgpack.packb({"type": "step", "v": 1, "body": {}})):
        push = await fuzzer.node.connect(server_id, PUSH_PROTOCOL, timeout=10)
        push._writer.write(frame(garbage))
        await push._writer.drain()
        fuzzer.sent += 1
        with pytest.raises((EOFError, ConnectionError)):  # the server drops a push stream not speaking the protocol
            await push.recv(timeout=10)
        push.close()


async def fuzz_opens(fuzzer: Fuzzer, server_id: str, model: str) -> None:
    good = dict(model_id=model, start_block=0, end_block=5, max_length=16)
    cases = [
        (dict(good, model_id="someone-else.123"), "bad_request", "serves model"),
        (dict(good, model_id="x" * 201), "bad_request", "open_session.model_id"),
        (dict(good, start_block=3, end_block=9), "bad_request", "not inside this server's span"),
        (dict(good, start_block=4, end_block=4), "bad_request", "not inside"),
        (dict(good, start_block=-1), "bad_request", "open_session.start_block"),
        (dict(good, max_length=0), "bad_request", "open_session.max_length"),
        (dict(good, max_length=LIMITS.max_session_length + 1), "bad_request", "max_session_length"),
        (dict(good, batch_size=LIMITS.max_batch_size + 1), "bad_request", "max_batch_size"),
        (dict(good, max_length=LIMITS.max_session_length, batch_size=2), "cache_full", "could never fit"),
        (dict(good, cache_wait=-1), "bad_request", "open_session.cache_wait"),
        (dict(good, cache_wait=10**6), "bad_request", "open_session.cache_wait"),
        (dict(good, max_length="16"), None, None),  # lax but valid: opens
        (dict(good, extra=1), "bad_request", "open_session.extra"),
        ({"model_id": model}, "bad_request", "open_session.start_block"),
    ]
    first_frames = [
        (_packb({"type": "step", "v": WIRE_VERSION, "body": {}}), "step.step_id"),
        (_packb({"type": "ping", "v": WIRE_VERSION, "body": {"nonce": 1}}), "must be open_session, not ping"),
        (b"\xc1", "not valid msgpack"),
        (_packb({"type": "open_session", "v": 2, "body": good}), "wire version"),
    ]
    rounds = 20 if LONG else 8
    for _ in range(rounds):
        for body, kind, fragment in cases:
            first_frames.append((_packb({"type": "open_session", "v": WIRE_VERSION, "body": body}), (kind, fragment)))
    for payload, want in first_frames:
        kind, fragment = want if isinstance(want, tuple) else ("bad_request", want)
        reply = await fuzzer.request(server_id, INFERENCE_PROTOCOL, payload, f"open_session {want}")
        if kind is None:
            assert isinstance(reply, SessionOpened), reply
        else:
            assert isinstance(reply, ErrorReply) and reply.kind == kind and fragment in reply.message, (payload, reply)


async def fuzz_forwards(fuzzer: Fuzzer, server_id: str, model: str, count: int = 120) -> None:
    from corolla.net.wire import WireTensor

    rng = np.random.default_rng(2)
    for i in range(count):
        tokens = int(rng.integers(1, 5))
        body = ForwardRequest(model_id=model, start_block=0, end_block=5,
                              hidden=WireTensor.from_torch(torch.randn(1, tokens, HIDDEN))).model_dump()
        mutation = i % 8
        if mutation == 0:
            body["hidden"]["shape"] = [1, tokens, HIDDEN * 2]
        elif mutation == 1:
            body["hidden"]["data"] = body["hidden"]["data"][:-3]
        elif mutation == 2:
            body["start_block"], body["end_block"] = 2, 7
        elif mutation == 3:
            body["model_id"] = "other"
        elif mutation == 4:
            body["hidden"]["shape"] = [1, LIMITS.max_session_length + 1, HIDDEN]
        elif mutation == 5:
            body["position_ids"] = {"dtype": "float32", "shape": [1, tokens], "data": b"\x00" * 4 * tokens}
        elif mutation == 6:
            body["attention_mask"] = {"dtype": "int64", "shape": [1, tokens + 1], "data": b"\x00" * 8 * (tokens + 1)}
        # mutation 7: valid
        payload = _packb({"type": "forward_request", "v": WIRE_VERSION, "body": body})
        try:
            request = decode(payload)
            if request.model_id != model:
                raise BadRequestError(f"this server serves model {model!r}, not {request.model_id!r}")
            parse_forward(request, FAKE_BACKEND, LIMITS)
            want = None
        except BadRequestError as e:
            want = str(e)
        reply = await fuzzer.request(server_id, FORWARD_PROTOCOL, payload, f"forward {i} (mutation {mutation})")
        if want is None:
            assert isinstance(reply, ForwardResult) and reply.hidden.shape == (1, tokens, HIDDEN), reply
        else:
            assert isinstance(reply, ErrorReply) and reply.kind == "bad_request" and reply.message == want, reply


async def fuzz_edges(fuzzer: Fuzzer, server_id: str, model: str, session: SessionModel) -> None:
    from corolla.net.wire import WireTensor

    # Cache exhaustion: one session takes nearly the whole budget; another's step is refused at once.
    big, _ = await fuzzer.open(server_id, model, max_length=CACHE_TOKENS, prefix=0)
    await big.send(Step(step_id=1, start=0, hidden=WireTensor.from_torch(torch.randn(1, CACHE_TOKENS - 64, HIDDEN))))
    assert isinstance(await big.recv(timeout=120), StepResult)
    small, _ = await fuzzer.open(server_id, model, max_length=256, prefix=0, cache_wait=0)
    for i in range(20):
        await small.send(Step(step_id=i, start=0, hidden=WireTensor.from_torch(torch.randn(1, 128, HIDDEN))))
        reply = await small.recv(timeout=30)
        fuzzer.sent += 1
        fuzzer.answered += 1
        assert isinstance(reply, ErrorReply) and reply.kind == "cache_full" and "server cache full" in reply.message
    big.close()  # abruptly: its pages must come back
    deadline = time.monotonic() + 10
    while True:  # the same step fits once the big session is gone
        await small.send(Step(step_id=99, start=0, hidden=WireTensor.from_torch(torch.randn(1, 128, HIDDEN))))
        reply = await small.recv(timeout=30)
        if isinstance(reply, StepResult):
            break
        assert time.monotonic() < deadline, reply
        await asyncio.sleep(0.2)

    # A frame header longer than the frame limit: refused with a reason (the stream cannot resync; we close it).
    small._writer.write(struct.pack(">I", 2**31))
    await small._writer.drain()
    reply = await small.recv(timeout=30)
    assert isinstance(reply, ErrorReply) and "exceeds the limit" in reply.message, reply
    fuzzer.sent += 1
    fuzzer.answered += 1
    small.close()

    # Truncated frames and half-sent huge frames, on sessions holding cache: closed, and their cache released.
    for cut in (0, 2, 50, 10**8):
        partial, _ = await fuzzer.open(server_id, model)
        payload = _packb({"type": "step", "v": WIRE_VERSION,
                          "body": _step_body(_VALID_STEP, SessionModel("x", {}), 1)})
        header = struct.pack(">I", len(payload) if cut < 10**8 else cut)
        partial._writer.write((header + payload)[: 4 + min(cut, len(payload) - 1)] if cut < 10**8 else header)
        await partial._writer.drain()
        fuzzer.sent += 1
        partial.close()

    # A push to a peer that does not exist: the step is answered (pushed=False) once the push gives up.
    target = {"peer_id": session.peers["fuzzer-unreachable"], "session_id": "0" * 32}
    lonely, lonely_id = await fuzzer.open(server_id, model)
    step = Step.model_validate({"step_id": 5, "start": PREFIX, "push_to": [target],
                                "hidden": WireTensor.from_torch(torch.randn(1, 1, HIDDEN)).model_dump()})
    await lonely.send(step)
    reply = await lonely.recv(timeout=60)
    fuzzer.sent += 1
    fuzzer.answered += 1
    assert isinstance(reply, StepResult) and not reply.pushed, reply
    lonely.close()
