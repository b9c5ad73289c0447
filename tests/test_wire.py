"""The wire format: typed messages round-trip exactly; malformed frames raise errors that name what is wrong."""

import msgpack
import pytest
import torch

from corolla.errors import BadRequestError
from corolla.net.messages import ErrorReply, OpenSession, Step
from corolla.net.wire import WIRE_VERSION, WireTensor, decode, encode


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
def test_tensor_round_trip_is_exact(dtype):
    tensor = (torch.randn(2, 3, 5) * 100).to(dtype)
    assert torch.equal(WireTensor.from_torch(tensor).to_torch(), tensor)


def test_step_message_round_trip():
    hidden = torch.randn(1, 4, 8)
    step = Step(step_id=3, start=7, hidden=WireTensor.from_torch(hidden),
                position_ids=WireTensor.from_torch(torch.arange(7, 11)[None]))
    decoded = decode(encode(step))
    assert isinstance(decoded, Step) and decoded.start == 7 and decoded.step_id == 3
    assert torch.equal(decoded.hidden.to_torch(), hidden)


def test_encoding_is_pinned():
    # The wire names and layout are a contract with other peers: changing them must be deliberate.
    payload = encode(ErrorReply(kind="bad_request", message="x"))
    assert msgpack.unpackb(payload) == {"type": "error", "v": WIRE_VERSION,
                                        "body": {"kind": "bad_request", "message": "x"}}


@pytest.mark.parametrize("payload, fragment", [
    (b"\xc1garbage", "not valid msgpack"),
    (msgpack.packb([1, 2]), "exactly the keys"),
    (msgpack.packb({"type": "nope", "v": WIRE_VERSION, "body": {}}), "unknown message type"),
    (msgpack.packb({"type": "step", "v": 99, "body": {}}), "wire version"),
    (msgpack.packb({"type": "open_session", "v": WIRE_VERSION,
                    "body": {"model_id": "m", "start_block": -1, "end_block": 2, "max_length": 5}}),
     "open_session.start_block"),
    (msgpack.packb({"type": "open_session", "v": WIRE_VERSION,
                    "body": {"model_id": "m", "start_block": 0, "end_block": 2, "max_length": 5, "extra": 1}}),
     "open_session.extra"),
])
def test_malformed_frames_name_the_problem(payload, fragment):
    with pytest.raises(BadRequestError, match=fragment):
        decode(payload)


def test_tensor_byte_count_is_checked():
    bad = WireTensor(dtype="float32", shape=(2, 2), data=b"\x00" * 12)
    with pytest.raises(BadRequestError, match="hidden: 12 bytes do not match shape"):
        bad.to_torch("hidden")
    with pytest.raises(BadRequestError, match="unknown dtype"):
        WireTensor(dtype="float128", shape=(1,), data=b"").to_torch()


def test_open_session_defaults():
    message = decode(encode(OpenSession(model_id="m", start_block=0, end_block=1, max_length=4)))
    assert message.batch_size == 1


def test_int8_codec_is_small_and_close():
    tensor = torch.randn(2, 3, 576)
    encoded = WireTensor.from_torch(tensor, codec="int8")
    assert len(encoded.data) == 2 * 3 * 576 + 4 * (2 * 3 * 576 // 64)  # a byte a value + a scale per 64 values
    decoded = decode(encode(Step(step_id=0, start=0, hidden=encoded))).hidden.to_torch()
    assert decoded.dtype == torch.float32 and decoded.shape == tensor.shape
    assert (decoded - tensor).abs().max() <= tensor.abs().max() / 127
    with pytest.raises(BadRequestError, match="do not match int8 blocks"):
        WireTensor(dtype="float32", shape=(2, 64), data=b"\x00" * 10, codec="int8").to_torch()
    with pytest.raises(BadRequestError, match="unknown codec"):
        WireTensor(dtype="float32", shape=(1,), data=b"\x00" * 4, codec="zip").to_torch()


def test_research_fields_round_trip():
    """Forward requests' edits and per-block hidden states (issue 22): optional, absent by default."""
    from corolla.net.messages import ForwardRequest, ForwardResult, HiddenEdit

    plain = decode(encode(ForwardRequest(model_id="m", start_block=0, end_block=2,
                                         hidden=WireTensor.from_torch(torch.zeros(1, 3, 8)))))
    assert plain.edits == [] and plain.return_hidden_states is False
    values = torch.randn(1, 2, 8)
    request = ForwardRequest(model_id="m", start_block=0, end_block=2, hidden=WireTensor.from_torch(torch.zeros(1, 3, 8)),
                             return_hidden_states=True,
                             edits=[HiddenEdit(kind="steer", block=0, values=WireTensor.from_torch(torch.ones(8))),
                                    HiddenEdit(kind="replace", block=1, positions=[0, 2],
                                               values=WireTensor.from_torch(values))])
    decoded = decode(encode(request))
    assert decoded.return_hidden_states and [e.kind for e in decoded.edits] == ["steer", "replace"]
    assert decoded.edits[0].positions is None and decoded.edits[1].positions == [0, 2]
    assert torch.equal(decoded.edits[1].values.to_torch(), values)
    states = torch.randn(1, 1, 3, 8)
    result = decode(encode(ForwardResult(hidden=WireTensor.from_torch(states[0]),
                                         hidden_states=WireTensor.from_torch(states, codec="int8"))))
    assert result.hidden_states.shape == (1, 1, 3, 8)
    assert (result.hidden_states.to_torch() - states).abs().max() <= states.abs().max() / 127
    with pytest.raises(BadRequestError, match="kind"):
        decode(msgpack.packb({"type": "forward_request", "v": WIRE_VERSION, "body": {
            "model_id": "m", "start_block": 0, "end_block": 1, "hidden": {"dtype": "float32", "shape": [1, 1, 1],
                                                                          "data": b"\0\0\0\0"},
            "edits": [{"kind": "rewrite", "block": 0, "values": {"dtype": "float32", "shape": [1],
                                                                  "data": b"\0\0\0\0"}}]}}))


def test_work_receipt_round_trip_and_open_session_carries_one():
    # Credits (corolla/credits): a signed cumulative receipt, alone on an inference stream or inside OpenSession.
    from corolla.net.messages import Delegation, WorkReceipt

    delegation = Delegation(issuer_key=b"k" * 294, delegate="QmClient", swarm="m", expires=2e9, signature=b"s" * 256)
    receipt = WorkReceipt(swarm="m", payer="QmClient", payer_key=b"p" * 294, payee="QmServer", block_tokens=140,
                          sequence=3, time=1.8e9, delegation=delegation, signature=b"r" * 256)
    assert decode(encode(receipt)) == receipt
    body = msgpack.unpackb(encode(receipt))["body"]
    assert msgpack.unpackb(encode(receipt))["type"] == "work_receipt"
    assert sorted(body) == ["block_tokens", "delegation", "payee", "payer", "payer_key", "sequence", "signature",
                            "swarm", "time"]
    opened = decode(encode(OpenSession(model_id="m", start_block=0, end_block=1, max_length=4, receipt=receipt)))
    assert opened.receipt == receipt
    # Forward and backward requests carry the receipt for the client's earlier work there (optional, None by default).
    from corolla.net.messages import BackwardRequest, ForwardRequest
    hidden = WireTensor.from_torch(torch.zeros(1, 2, 8))
    assert decode(encode(ForwardRequest(model_id="m", start_block=0, end_block=1, hidden=hidden))).receipt is None
    for request in (ForwardRequest(model_id="m", start_block=0, end_block=1, hidden=hidden, receipt=receipt),
                    BackwardRequest(model_id="m", start_block=0, end_block=1, hidden=hidden, grad_output=hidden,
                                    receipt=receipt)):
        assert msgpack.unpackb(encode(request))["body"]["receipt"]["block_tokens"] == 140
        assert decode(encode(request)).receipt == receipt
    with pytest.raises(BadRequestError, match="work_receipt.block_tokens"):
        decode(msgpack.packb({"type": "work_receipt", "v": WIRE_VERSION, "body": {**body, "block_tokens": -1}}))
    # Counters fit the ledger's signed 64-bit columns and times are finite (issue 20: 2**64-1 crashed sqlite).
    for field, value in [("sequence", 2**63), ("sequence", 2**64 - 1), ("block_tokens", 2**63),
                         ("time", float("nan")), ("time", float("inf"))]:
        with pytest.raises(BadRequestError, match=f"work_receipt.{field}"):
            decode(msgpack.packb({"type": "work_receipt", "v": WIRE_VERSION, "body": {**body, field: value}}))
    with pytest.raises(BadRequestError, match="expires"):
        decode(msgpack.packb({"type": "work_receipt", "v": WIRE_VERSION,
                              "body": {**body, "delegation": {**body["delegation"], "expires": float("inf")}}}))
    assert decode(msgpack.packb({"type": "work_receipt", "v": WIRE_VERSION,
                                 "body": {**body, "sequence": 2**63 - 1}})).sequence == 2**63 - 1


def test_credits_record_encoding_is_pinned_and_bounded():
    # A server's credits record in the DHT (net/records.py CreditsRecord; credits/book.py publishes and reads it).
    from pydantic import ValidationError

    from corolla.net.records import CreditsRecord

    record = CreditsRecord(receipts=[b"r" * 1300], standing={"QmA": 12.5, "QmRoot": -1.0}, served_block_tokens=7,
                           started=1.8e9)
    packed = msgpack.packb(record.model_dump(), use_bin_type=True)
    assert msgpack.unpackb(packed, raw=False) == {"receipts": [b"r" * 1300], "standing": {"QmA": 12.5, "QmRoot": -1.0},
                                                  "served_block_tokens": 7, "started": 1.8e9}
    assert CreditsRecord.model_validate(msgpack.unpackb(packed, raw=False)) == record
    for bad in [{"standing": []}, {"receipts": "x"}, {"receipts": [b"r"] * 33}, {"receipts": [b"r" * 4097]},
                {"standing": {"QmA": float("nan")}}, {"standing": {"QmA": -2.0}}, {"served_block_tokens": -1},
                {"standing": {f"Qm{i}": 1.0 for i in range(65)}}]:
        with pytest.raises(ValidationError):
            CreditsRecord.model_validate(bad)
