"""return_hidden_states has a size bound: a server refuses, by name, a forward whose reply (every block's output)
would not fit its message limit, and any backward that asks for hidden states; a client asks each server for as
many blocks as its own reply limit holds, and a server's refusal reaches the caller without the server being
counted as faulty. Handler parsers and the client's helpers only: no swarm (test_research_api.py runs the split
against real servers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from corolla.client import remote
from corolla.client.routing import Hop
from corolla.errors import BadRequestError, RemoteError
from corolla.net.messages import BackwardRequest, ErrorReply, ForwardRequest, ForwardResult
from corolla.net.wire import FRAME_SLACK_BYTES, WireTensor, wire_bytes
from corolla.server.handlers import Limits, parse_backward, parse_forward

WIDTH, TOKENS = 8, 1024
PER_BLOCK = 1 * TOKENS * WIDTH * 4  # one block's output for one sequence, float32: 32 KiB
BACKEND = SimpleNamespace(start=0, end=80, config=SimpleNamespace(hidden_size=WIDTH))  # what the parsers read
LIMITS = Limits(max_session_length=4096, max_batch_size=64, max_step_tokens=65536, session_idle_timeout=60.0,
                max_message_bytes=FRAME_SLACK_BYTES + 20 * PER_BLOCK)  # room for the outputs of 20 blocks


def forward(end_block: int, return_hidden_states: bool = True, **fields) -> ForwardRequest:
    return ForwardRequest(model_id="m", start_block=0, end_block=end_block,
                          hidden=WireTensor.from_torch(torch.zeros(1, TOKENS, WIDTH)),
                          return_hidden_states=return_hidden_states, **fields)


def test_a_reply_over_the_message_limit_is_refused_by_name():
    assert parse_forward(forward(20), BACKEND, LIMITS).record_layers  # 20 blocks fit exactly
    with pytest.raises(BadRequestError, match=r"return_hidden_states: the outputs of 80 blocks for 1x1024 tokens .* "
                                              r"2\.5 MiB, over this server's message limit .* at most 20 blocks"):
        parse_forward(forward(80), BACKEND, LIMITS)
    assert not parse_forward(forward(80, return_hidden_states=False), BACKEND, LIMITS).record_layers  # no reply


def test_the_bound_counts_the_wire_codec():
    """int8 activations: ~1.06 bytes a value instead of 4, so ~3.8x more blocks fit."""
    int8 = WireTensor.from_torch(torch.zeros(1, TOKENS, WIDTH), codec="int8")
    assert wire_bytes(int8.shape, int8.dtype, int8.codec) == len(int8.data)
    request = forward(75).model_copy(update={"hidden": int8})
    assert parse_forward(request, BACKEND, LIMITS).record_layers
    with pytest.raises(BadRequestError, match="at most 75 blocks"):
        parse_forward(forward(76).model_copy(update={"hidden": int8}), BACKEND, LIMITS)


def test_a_backward_never_returns_hidden_states():
    grad = WireTensor.from_torch(torch.zeros(1, TOKENS, WIDTH))
    request = BackwardRequest(**dict(forward(2)), grad_output=grad)
    with pytest.raises(BadRequestError, match="return_hidden_states: a backward request returns gradients only"):
        parse_backward(request, BACKEND, LIMITS, None)
    inputs, _ = parse_backward(request.model_copy(update={"return_hidden_states": False}), BACKEND, LIMITS, None)
    assert not inputs.record_layers


def test_the_client_asks_each_server_for_what_fits_its_reply_limit(monkeypatch):
    hidden = torch.zeros(1, TOKENS, WIDTH)
    monkeypatch.setattr(remote, "MAX_REPLY_BYTES", FRAME_SLACK_BYTES + 20 * PER_BLOCK)
    assert remote._fitting_reply(Hop("peer", 10, 80), hidden, "native") == Hop("peer", 10, 30)
    assert remote._fitting_reply(Hop("peer", 10, 25), hidden, "native") == Hop("peer", 10, 25)
    assert remote._fitting_reply(Hop("peer", 10, 80), hidden, "float16") == Hop("peer", 10, 50)  # half the bytes
    monkeypatch.setattr(remote, "MAX_REPLY_BYTES", FRAME_SLACK_BYTES)  # not even one block: one at a time anyway
    assert remote._fitting_reply(Hop("peer", 10, 80), hidden, "native") == Hop("peer", 10, 11)


def test_a_refusal_reaches_the_caller_and_the_server_is_not_counted_faulty():
    """A bad_request answer raises RemoteError, which forward_span does not catch (it retries elsewhere, and marks
    the server failed, only for _RetryableRemoteError and connection errors): the caller sees the server's words."""
    refusal = ErrorReply(kind="bad_request", message="return_hidden_states: the outputs of 80 blocks ...")
    with pytest.raises(RemoteError, match="bad_request: return_hidden_states") as raised:
        remote._check_reply(refusal, ForwardResult, Hop("peer", 0, 80))
    assert not isinstance(raised.value, (remote._RetryableRemoteError, *remote._RECOVERABLE))
