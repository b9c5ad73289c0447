"""Every message of the block-serving protocols, typed. Field comments give meaning, units and shapes.

Inference stream (INFERENCE_PROTOCOL), one per (inference session, server):
    client -> OpenSession, then any number of Step, then closes the stream (or sends CloseSession)
    server -> SessionOpened, then one StepResult per Step; ErrorReply instead of any answer on failure

Server-to-server push (PUSH_PROTOCOL): a step may name the next servers of the chain (`push_to`); the server then
sends its output straight to the next one as a PushedStep addressed to the client's session there, which runs it
and answers the client on the client's own stream. One client round trip per token instead of one per hop.

Forward (FORWARD_PROTOCOL), one stream per request: client -> ForwardRequest; server -> ForwardResult | ErrorReply.
Backward (BACKWARD_PROTOCOL), one stream per request: client -> BackwardRequest; server -> BackwardResult | ErrorReply.
The server recomputes the forward and returns gradients; it keeps nothing, and never updates its weights.

Fine-tuning: a request (or an inference session) may carry deep prompts and the client's own LoRA weights, or name
an adapter the server hosts. They apply to that request (session) only.

Research access (forward and backward requests): `edits` change the hidden states between blocks (activation
steering, replacement) for that request only; `return_hidden_states` asks for every block's output in the same
round trip. Wire cost of the latter: (blocks - 1) x batch x tokens x hidden_size x bytes per value (4 for float32,
2 for 16-bit wire formats, ~1.06 for int8) on top of the usual output, e.g. 30 blocks x 1 x 512 x 4096 x 2 bytes =
126 MB for a 30-block span of a 7B model in float16: a span's outputs cost as much as sending that many separate
requests' outputs, without their round trips.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from corolla.net.wire import Message, WireTensor, message_type

INFERENCE_PROTOCOL = "corolla/inference/1"
FORWARD_PROTOCOL = "corolla/forward/1"
PUSH_PROTOCOL = "corolla/push/1"
BACKWARD_PROTOCOL = "corolla/backward/1"


class LoraWeights(BaseModel):
    """The client's own LoRA weights for the blocks of one request or session: y += scale * B (A x).

    Tensors are listed block by block (the request's blocks in order), each block with one A and one B per
    target, in the order of `targets`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    scale: float = Field(gt=0, le=1e4, description="alpha / r")
    targets: list[str] = Field(min_length=1, max_length=32, description="linear layers' module paths inside a "
                                                                         "block, e.g. self_attn.q_proj")
    a: list[WireTensor] = Field(max_length=8192, description="[r, in_features] per (block, target)")
    b: list[WireTensor] = Field(max_length=8192, description="[out_features, r] per (block, target)")


class HiddenEdit(BaseModel):
    """A change to the hidden states leaving one block, applied by the server before the next block runs (and in a
    backward pass's recomputed forward, so gradients see the edited model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["steer", "replace"] = Field(description="steer: add `values` to the hidden states; replace: "
                                                          "overwrite them with `values`")
    block: int = Field(ge=0, description="the block whose output is edited (its index in the whole model), inside "
                                         "the request's blocks")
    positions: list[int] | None = Field(default=None, max_length=65536,
                                        description="token indices (0 = the request's first token), distinct; "
                                                    "None = every token (steer only)")
    values: WireTensor = Field(description="steer: [hidden_size], added at every listed position of every row; "
                                           "replace: [batch, len(positions), hidden_size], written there")


_INT64_MAX = 2**63 - 1  # counters of credits are kept in SQLite INTEGER columns (signed 64-bit)


class Delegation(BaseModel):
    """A server's permission for a client key to speak for it in credits (corolla/credits/receipts.py): receipts
    that client signs count as paid by the server's identity, and its sessions get the server's standing."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    issuer_key: bytes = Field(max_length=1024, description="the server's RSA public key, DER "
                                                           "SubjectPublicKeyInfo; its peer id is the identity")
    delegate: str = Field(max_length=100, description="peer id of the client allowed to speak for the server")
    swarm: str = Field(max_length=200, description="model id (DHT) the delegation is good for")
    expires: float = Field(allow_inf_nan=False, description="unix time after which the delegation is void")
    signature: bytes = Field(max_length=1024, description="RSA-PSS SHA-256 by issuer_key over the fields above")


@message_type("work_receipt")
class WorkReceipt(Message):
    """A client's signed acknowledgement of all the work one server did for it so far (cumulative, never
    decreasing): inference steps, forwards and backwards alike. Sent on an inference stream between steps (no
    answer), or inside OpenSession, ForwardRequest or BackwardRequest."""

    swarm: str = Field(max_length=200, description="model id (DHT) of the work")
    payer: str = Field(max_length=100, description="peer id of the signing client (the hash of payer_key)")
    payer_key: bytes = Field(max_length=1024, description="the client's RSA public key, DER SubjectPublicKeyInfo")
    payee: str = Field(max_length=100, description="peer id of the server that did the work")
    block_tokens: int = Field(ge=0, le=_INT64_MAX, description="tokens through blocks accepted from the payee so far, summed "
                                                "over sessions (one token through one block = 1; backward = 2)")
    sequence: int = Field(ge=1, le=_INT64_MAX, description="increases with every receipt the payer signs for this "
                                                           "payee")
    time: float = Field(allow_inf_nan=False, description="unix time of signing")
    delegation: Delegation | None = Field(default=None, description="present when the payer speaks for a server")
    signature: bytes = Field(max_length=1024, description="RSA-PSS SHA-256 by payer_key over every field above")


@message_type("open_session")
class OpenSession(Message):
    model_id: str = Field(max_length=200, description="DHT model id the client expects the server to serve")
    start_block: int = Field(ge=0, description="first block to run, inside the server's span")
    end_block: int = Field(ge=1, description="one past the last block to run")
    max_length: int = Field(ge=1, description="most tokens (prompt + generated) this session will hold")
    batch_size: int = Field(default=1, ge=1, description="sequences per step")
    cache_wait: float = Field(default=10.0, ge=0, le=600, description="seconds a step may wait for cache room "
                                                                       "before the server answers cache_full")
    adapter: str | None = Field(default=None, max_length=200, description="a LoRA adapter the server hosts, used "
                                                                          "for this session's steps")
    lora: LoraWeights | None = Field(default=None, description="the client's own LoRA weights for this session "
                                                               "(dropped when it closes)")
    receipt: WorkReceipt | None = Field(default=None, description="the client's latest receipt for this server "
                                                                  "(with its delegation): credits the session "
                                                                  "from its first step")


@message_type("session_opened")
class SessionOpened(Message):
    session_id: str = Field(description="server-chosen secret token; whoever knows it may push steps to the session")
    start_block: int
    end_block: int


class PushTarget(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    peer_id: str = Field(max_length=100, description="server to push to")
    session_id: str = Field(max_length=64, description="the client's session token on that server")


@message_type("step")
class Step(Message):
    step_id: int = Field(ge=0, description="client counter, echoed in the result")
    start: int = Field(ge=0, description="cache position of the first new token; tokens at >= start are replaced "
                                         "(this is how a client rolls back or replays)")
    hidden: WireTensor = Field(description="[batch, new_tokens, hidden_size] activations entering the first block")
    position_ids: WireTensor | None = Field(default=None, description="[batch, new_tokens] int64 positions; "
                                                                      "default start..start+new_tokens-1")
    attention_mask: WireTensor | None = Field(default=None, description="[batch, start + new_tokens] int64, "
                                                                        "0 = padding; default all ones")
    push_to: list[PushTarget] = Field(default_factory=list, max_length=64,
                                      description="the rest of the chain: send the output to push_to[0]")
    reorder: WireTensor | None = Field(default=None, description="[batch] int64: before this step, cached row i "
                                                                 "becomes the old row reorder[i] (beam search)")
    prompts: WireTensor | None = Field(default=None, description="[session blocks, batch, pre_seq_len, hidden] "
                                                                 "deep prompts, added at positions < pre_seq_len")


@message_type("step_result")
class StepResult(Message):
    step_id: int
    hidden: WireTensor = Field(description="[batch, new_tokens, hidden_size] activations leaving the last block")
    pushed: bool = Field(default=False, description="the output was handed to the next server of push_to")


@message_type("pushed_step")
class PushedStep(Message):
    session_id: str = Field(max_length=64, description="the receiving server's session token")
    step: Step = Field(description="the step, its hidden = the pushing server's output")


@message_type("close_session")
class CloseSession(Message):
    pass


@message_type("forward_request")
class ForwardRequest(Message):
    model_id: str = Field(max_length=200)
    start_block: int = Field(ge=0)
    end_block: int = Field(ge=1)
    hidden: WireTensor = Field(description="[batch, tokens, hidden_size]")
    position_ids: WireTensor | None = Field(default=None, description="[batch, tokens] int64; default 0..tokens-1")
    attention_mask: WireTensor | None = Field(default=None, description="[batch, tokens] int64, 0 = padding")
    prompts: WireTensor | None = Field(default=None, description="[end_block - start_block, batch, pre_seq_len, "
                                                                 "hidden] deep prompts added before each block")
    lora: LoraWeights | None = Field(default=None, description="the client's own LoRA weights for these blocks")
    adapter: str | None = Field(default=None, max_length=200, description="a LoRA adapter the server hosts")
    edits: list[HiddenEdit] = Field(default_factory=list, max_length=64,
                                    description="hidden-state edits, applied in order after their blocks")
    return_hidden_states: bool = Field(default=False, description="also return the output of every block but the "
                                                                  "last (ForwardResult.hidden_states); the reply, "
                                                                  "blocks x batch x tokens x hidden_size values in "
                                                                  "the hidden states' wire dtype and codec, must fit "
                                                                  "the server's message limit; forward requests only")
    receipt: WorkReceipt | None = Field(default=None, description="the client's latest receipt for this server, "
                                                                  "covering its earlier requests and sessions here "
                                                                  "(a request's own work is signed for with the "
                                                                  "next request or session); None when nothing new "
                                                                  "is owed")


@message_type("forward_result")
class ForwardResult(Message):
    hidden: WireTensor = Field(description="[batch, tokens, hidden_size] output of end_block - 1")
    hidden_states: WireTensor | None = Field(default=None, description="[end_block - start_block - 1, batch, tokens, "
                                             "hidden_size] outputs of blocks start_block..end_block - 2 (after "
                                             "their edits), when asked for and the request has more than one block")


@message_type("backward_request")
class BackwardRequest(ForwardRequest):
    grad_output: WireTensor = Field(description="[batch, tokens, hidden_size] gradient of the loss with respect to "
                                                "the output of end_block - 1")


@message_type("backward_result")
class BackwardResult(Message):
    grad_hidden: WireTensor = Field(description="[batch, tokens, hidden_size] gradient w.r.t. the hidden states sent")
    grad_prompts: WireTensor | None = Field(default=None, description="like the request's prompts, when sent")
    grad_lora_a: list[WireTensor] = Field(default_factory=list, description="like the request's lora.a")
    grad_lora_b: list[WireTensor] = Field(default_factory=list, description="like the request's lora.b")


@message_type("error")
class ErrorReply(Message):
    kind: str = Field(description="error class: bad_request, cache_full, internal, ...")
    message: str = Field(description="what was wrong, for a person")
