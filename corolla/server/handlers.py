"""RPC handlers: parse and check each message once, hand plain inputs to the backend, answer.

A bad message gets an ErrorReply naming what was wrong; the session (and every other) carries on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import torch

from corolla.credits.book import CreditBook
from corolla.credits.receipts import ReceiptError
from corolla.errors import BadRequestError, CacheFullError
from corolla.models.spec import SpanInputs
from corolla.net.messages import (PUSH_PROTOCOL, BackwardRequest, BackwardResult, CloseSession, ErrorReply,
                                  ForwardRequest, ForwardResult, OpenSession, PushedStep, SessionOpened, Step,
                                  StepResult, WorkReceipt)
from corolla.net.node import MessageStream, Node
from corolla.net.wire import DEFAULT_MAX_FRAME_BYTES, FRAME_SLACK_BYTES, FrameTooLargeError, WireTensor, wire_bytes
from corolla.models.edits import BlockEdit
from corolla.server.backend import BlockBackend, SpanOutput
from corolla.server.engine import Engine, SpanRequest
from corolla.server.engine import Step as EngineStep
from corolla.server.extras import HostedAdapters, parse_extras, parse_prompts
from corolla.server.sessions import Session

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_session_length: int
    max_batch_size: int
    max_step_tokens: int
    session_idle_timeout: float
    max_sessions_per_peer: int = 32
    open_timeout: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_FRAME_BYTES  # largest message read (--max-request-mb); replies keep to it too
    link_delay: float = 0.0  # seconds; testing only: one-way latency added to every message received and reply sent
    fail_file: str | None = None  # testing only: while this file exists, steps fail
    perturb: float = 0.0  # testing only: std of noise added to every output (a lying server)


def _check_blocks(backend: BlockBackend, start: int, end: int) -> None:
    if not backend.start <= start < end <= backend.end:
        raise BadRequestError(
            f"blocks {start}:{end} are not inside this server's span {backend.start}:{backend.end}"
        )


def _hidden(tensor: WireTensor, backend: BlockBackend, limits: Limits, batch_size: int | None) -> torch.Tensor:
    if not tensor.is_float:
        raise BadRequestError(f"hidden: dtype must be float32, float16 or bfloat16, not {tensor.dtype}")
    if len(tensor.shape) != 3:
        raise BadRequestError(f"hidden: expected 3 dimensions [batch, tokens, hidden], got shape {list(tensor.shape)}")
    batch, tokens, width = tensor.shape
    if width != backend.config.hidden_size:
        raise BadRequestError(f"hidden: last dimension must be hidden_size={backend.config.hidden_size}, got {width}")
    if batch_size is not None and batch != batch_size:
        raise BadRequestError(f"hidden: batch of {batch} does not match the session's batch_size={batch_size}")
    if not 1 <= batch <= limits.max_batch_size:
        raise BadRequestError(f"hidden: batch must be 1..{limits.max_batch_size}, got {batch}")
    if not 1 <= tokens or batch * tokens > limits.max_step_tokens:
        raise BadRequestError(f"hidden: batch x tokens must be 1..{limits.max_step_tokens}, got {batch}x{tokens}")
    hidden = tensor.to_torch("hidden")
    if not bool(torch.isfinite(hidden).all()):
        raise BadRequestError("hidden: contains NaN or Inf values; only finite hidden states are accepted")
    return hidden


def _int_tensor(tensor: WireTensor | None, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    if tensor is None:
        return None
    if tensor.dtype not in ("int64", "int32", "bool", "uint8"):
        raise BadRequestError(f"{name}: dtype must be an integer type, not {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise BadRequestError(f"{name}: expected shape {list(shape)}, got {list(tensor.shape)}")
    return tensor.to_torch(name).to(torch.int64)


def parse_reorder(step: Step, session: Session) -> torch.Tensor | None:
    """The beam-search row order of a step, checked: one index per sequence, each in [0, batch)."""
    if step.reorder is None:
        return None
    order = _int_tensor(step.reorder, "reorder", (session.batch_size,))
    if bool(((order < 0) | (order >= session.batch_size)).any()):
        raise BadRequestError(f"reorder: indices must be in [0, {session.batch_size}), got {order.tolist()}")
    return order


def parse_step(step: Step, session: Session, backend: BlockBackend, limits: Limits) -> SpanInputs:
    if step.start > session.length:
        raise BadRequestError(f"start={step.start} is past the session's {session.length} cached tokens")
    hidden = _hidden(step.hidden, backend, limits, session.batch_size)
    batch, tokens, _ = hidden.shape
    if step.start + tokens > session.max_length:
        raise BadRequestError(
            f"start {step.start} + {tokens} new tokens exceeds the session's max_length={session.max_length}"
        )
    positions = _int_tensor(step.position_ids, "position_ids", (batch, tokens))
    if positions is None:
        positions = torch.arange(step.start, step.start + tokens).unsqueeze(0).expand(batch, -1)
    mask = _int_tensor(step.attention_mask, "attention_mask", (batch, step.start + tokens))
    prompts = parse_prompts(step.prompts, session.end_block - session.start_block, batch, backend.config.hidden_size)
    return SpanInputs(hidden=hidden, position_ids=positions, attention_mask=mask, cache=None,
                      lora=session.lora, prompts=prompts, first_position=step.start)


def parse_forward(request: ForwardRequest, backend: BlockBackend, limits: Limits,
                  adapters: HostedAdapters | None = None) -> SpanInputs:
    _check_blocks(backend, request.start_block, request.end_block)
    hidden = _hidden(request.hidden, backend, limits, None)
    batch, tokens, _ = hidden.shape
    if tokens > limits.max_session_length:
        raise BadRequestError(f"hidden: {tokens} tokens exceed max_session_length={limits.max_session_length}")
    positions = _int_tensor(request.position_ids, "position_ids", (batch, tokens))
    if positions is None:
        positions = torch.arange(tokens).unsqueeze(0).expand(batch, -1)
    mask = _int_tensor(request.attention_mask, "attention_mask", (batch, tokens))
    blocks = request.end_block - request.start_block
    if request.return_hidden_states:
        _check_reply_size(request.hidden, blocks, limits)
    prompts = parse_prompts(request.prompts, blocks, batch, backend.config.hidden_size)
    lora = parse_extras(adapters or HostedAdapters(), request.adapter, request.lora, backend, request.start_block, request.end_block)
    return SpanInputs(hidden=hidden, position_ids=positions, attention_mask=mask, cache=None, lora=lora,
                      prompts=prompts, edits=parse_edits(request, batch, tokens, backend.config.hidden_size),
                      record_layers=request.return_hidden_states)


def _check_reply_size(hidden: WireTensor, blocks: int, limits: Limits) -> None:
    """A reply with every block's output (return_hidden_states) must fit the message limit: besides not being
    sendable, its blocks' outputs are all held at once on the device and the host (80 blocks of 65536 tokens of
    hidden size 8192 in bfloat16: 80 GiB)."""
    per_block = wire_bytes(hidden.shape, hidden.dtype, hidden.codec)
    room = limits.max_message_bytes - FRAME_SLACK_BYTES
    if blocks * per_block > room:
        batch, tokens, width = hidden.shape
        raise BadRequestError(
            f"return_hidden_states: the outputs of {blocks} blocks for {batch}x{tokens} tokens of hidden size {width} "
            f"({hidden.dtype}, codec {hidden.codec}) make a reply of {blocks * per_block / 2**20:.1f} MiB, over this "
            f"server's message limit of {limits.max_message_bytes / 2**20:.1f} MiB; ask for at most "
            f"{max(room // per_block, 1)} blocks per request, or fewer tokens")


def parse_edits(request: ForwardRequest, batch: int, tokens: int, width: int) -> tuple[BlockEdit, ...]:
    """The request's hidden-state edits, checked: a block of the request, distinct positions among its tokens,
    finite float values of the right shape."""
    edits = []
    for i, edit in enumerate(request.edits):
        name = f"edits[{i}]"
        if not request.start_block <= edit.block < request.end_block:
            raise BadRequestError(f"{name}: block {edit.block} is not among the request's blocks "
                                  f"{request.start_block}..{request.end_block - 1}")
        positions = None
        if edit.positions is not None:
            positions = torch.tensor(edit.positions, dtype=torch.int64)
            if len(set(edit.positions)) != len(edit.positions) or bool(((positions < 0) | (positions >= tokens)).any()):
                raise BadRequestError(f"{name}: positions must be distinct token indices in [0, {tokens})")
        elif edit.kind == "replace":
            raise BadRequestError(f"{name}: a replace edit needs positions")
        shape = [width] if edit.kind == "steer" else [batch, len(edit.positions), width]
        if not edit.values.is_float or list(edit.values.shape) != shape:
            raise BadRequestError(f"{name}: {edit.kind} values must be a float tensor of shape {shape}, got "
                                  f"{edit.values.dtype} {list(edit.values.shape)}")
        values = edit.values.to_torch(f"{name}.values")
        if not bool(torch.isfinite(values).all()):
            raise BadRequestError(f"{name}: values contain NaN or Inf")
        edits.append(BlockEdit(edit.block, positions, add=values if edit.kind == "steer" else None,
                               values=values if edit.kind == "replace" else None))
    return tuple(edits)


def parse_backward(request: BackwardRequest, backend: BlockBackend, limits: Limits,
                   adapters: HostedAdapters) -> tuple[SpanInputs, torch.Tensor]:
    if request.return_hidden_states:
        raise BadRequestError("return_hidden_states: a backward request returns gradients only; ask for hidden "
                              "states with a forward request")
    inputs = parse_forward(request, backend, limits, adapters)
    grad = request.grad_output
    if not grad.is_float or tuple(grad.shape) != tuple(inputs.hidden.shape):
        raise BadRequestError(f"grad_output: expected a float tensor of shape {list(inputs.hidden.shape)}, got "
                              f"{grad.dtype} {list(grad.shape)}")
    return inputs, grad.to_torch("grad_output")


class Handlers:
    def __init__(self, backend: BlockBackend, engine: Engine, model_id: str, limits: Limits, node: Node,
                 adapters: HostedAdapters | None = None, credits: CreditBook | None = None):
        self.backend, self.engine, self.model_id = backend, engine, model_id
        self.credits = credits  # None: credits off, everyone served first come, first served
        self.limits, self.node = limits, node
        self.adapters = adapters or HostedAdapters()
        self.sessions: dict[str, Session] = {}

    def _check_model(self, model_id: str) -> None:
        if model_id != self.model_id:
            raise BadRequestError(f"this server serves model {self.model_id!r}, not {model_id!r}")

    def _open(self, request: OpenSession, peer_id: str) -> Session:
        self._check_model(request.model_id)
        open_here = sum(1 for s in self.sessions.values() if s.peer_id == peer_id)
        if open_here >= self.limits.max_sessions_per_peer:
            raise BadRequestError(f"too many open sessions: {open_here} of max_sessions_per_peer="
                                  f"{self.limits.max_sessions_per_peer}; close some first")
        _check_blocks(self.backend, request.start_block, request.end_block)
        if request.max_length > self.limits.max_session_length:
            raise BadRequestError(
                f"max_length={request.max_length} exceeds this server's max_session_length="
                f"{self.limits.max_session_length}"
            )
        if request.batch_size > self.limits.max_batch_size:
            raise BadRequestError(f"batch_size={request.batch_size} exceeds max_batch_size={self.limits.max_batch_size}")
        lora = parse_extras(self.adapters, request.adapter, request.lora, self.backend, request.start_block,
                            request.end_block)
        state = self.engine.open(request.start_block, request.end_block, request.batch_size, request.max_length, lora)
        try:
            session = Session(state=state, cache_wait=request.cache_wait, peer_id=peer_id)
        except BaseException:
            self.engine.close_now(state)  # a fresh session holds no pages: nobody waits for them
            raise
        if self.credits is not None:
            try:
                session.credit = self.credits.open_session(peer_id, request.receipt)
            except Exception:  # credits never cost a client its session: it runs as a free rider
                logger.exception("credits failed for a session of %s; it runs without credit", peer_id)
        self.sessions[session.session_id] = session
        return session

    async def close_all(self) -> None:
        """End every open session (the server is moving to other blocks); their clients fail over."""
        for session in list(self.sessions.values()):
            session.inbox.put_nowait(CloseSession())

    async def _close(self, session: Session) -> None:
        if self.sessions.pop(session.session_id, None) is not None:
            await self.engine.close(session.state)
            if session.credit is not None:
                try:
                    self.credits.close_session(session.credit)
                except Exception:
                    logger.exception("credits failed closing session %s", session.name)

    async def inference(self, stream: MessageStream) -> None:
        try:
            first = await stream.recv(timeout=self.limits.open_timeout)
            if not isinstance(first, OpenSession):
                raise BadRequestError(f"the first message of a session must be open_session, not {first.TYPE}")
            session = self._open(first, stream.peer_id)
        except (BadRequestError, CacheFullError) as e:
            await _reply_error(stream, e)
            return
        except (EOFError, ConnectionError, asyncio.TimeoutError):
            return
        logger.info("session %s opened by %s: blocks %d:%d, max_length %d, batch %d", session.name,
                    stream.peer_id, session.start_block, session.end_block, session.max_length, session.batch_size)
        reader = asyncio.create_task(self._read_client(stream, session))
        try:
            await self._delay()  # emulated wide-area link: the open request's way in
            await self._delay()  # and the answer's way out
            await stream.send(SessionOpened(session_id=session.session_id, start_block=session.start_block,
                                            end_block=session.end_block))
            await self._serve_steps(stream, session)
        except (EOFError, ConnectionError):
            pass
        finally:
            reader.cancel()
            await self._close(session)
            for push_stream in session.push_streams.values():
                push_stream.close()
            logger.info("session %s closed (%d sessions open)", session.name, len(self.sessions))

    async def _read_client(self, stream: MessageStream, session: Session) -> None:
        """Move the client's messages into the session's inbox (which pushed steps also enter)."""
        while True:
            try:
                message = await stream.recv()
            except FrameTooLargeError as e:  # its payload is still in the stream: nothing after it can be read
                session.inbox.put_nowait(e)
                session.inbox.put_nowait(CloseSession())
                return
            except BadRequestError as e:  # the frame was read whole, so the stream is still in sync
                session.inbox.put_nowait(e)
                continue
            except (EOFError, ConnectionError, asyncio.IncompleteReadError):
                session.inbox.put_nowait(CloseSession())
                return
            if isinstance(message, WorkReceipt):  # never answered: the stream carries step results only
                self._take_receipt(message, stream.peer_id)
                continue
            if not isinstance(message, (Step, CloseSession)):
                message = BadRequestError(f"expected step or close_session, got {message.TYPE}")
            await self._delay()  # emulated wide-area link, inbound
            session.inbox.put_nowait(message)
            if isinstance(message, CloseSession):
                return

    async def push(self, stream: MessageStream) -> None:
        """Steps pushed by the previous server of a client's chain, addressed by the session's secret token."""
        while True:
            try:
                message = await stream.recv(timeout=self.limits.session_idle_timeout)
            except (EOFError, ConnectionError, asyncio.TimeoutError, BadRequestError):
                return
            session = self.sessions.get(message.session_id) if isinstance(message, PushedStep) else None
            if session is None:
                logger.debug("dropping a pushed step for an unknown session from %s", stream.peer_id)
                continue
            await self._delay()  # emulated wide-area link, inbound
            session.inbox.put_nowait(message.step)

    async def _serve_steps(self, stream: MessageStream, session: Session) -> None:
        while True:
            try:
                async with asyncio.timeout(self.limits.session_idle_timeout):  # no extra task per step
                    message = await session.inbox.get()
            except asyncio.TimeoutError:
                await _reply_error(stream, BadRequestError(
                    f"session idle for more than {self.limits.session_idle_timeout:.0f} s; closed"))
                return
            if isinstance(message, CloseSession):
                return
            if isinstance(message, BadRequestError):
                await _reply_error(stream, message)
                continue
            try:
                inputs = parse_step(message, session, self.backend, self.limits)
                reorder = parse_reorder(message, session)
            except BadRequestError as e:
                await _reply_error(stream, e)
                continue
            if session.credit is not None:
                session.state.priority = self.credits.priority(session.credit)
            try:
                await self.engine.reserve(session.state, message.start + inputs.hidden.shape[1],
                                          timeout=session.cache_wait)
            except CacheFullError as e:
                await _reply_error(stream, e)
                continue
            try:
                if self.limits.fail_file is not None and os.path.exists(self.limits.fail_file):
                    raise RuntimeError("failure injected for testing (--debug-fail-file)")
                output = await self.engine.step(EngineStep(session.state, message.start, inputs, reorder),
                                                alone=len(self.sessions) == 1)
            except Exception as e:
                logger.exception("step failed in session %s", session.name)
                # A reorder may have been applied without the step: end the session; the client replays elsewhere.
                await _reply_error(stream, e, kind="internal")
                return
            self._count_work(session.peer_id, inputs.hidden, session.end_block - session.start_block)
            hidden = WireTensor.from_torch(self._perturbed(output), codec=message.hidden.codec)
            pushed = bool(message.push_to) and await self._push(session, message, hidden)
            await self._delay()  # emulated wide-area link, outbound (after the push: it has its own link)
            await stream.send(StepResult(step_id=message.step_id, hidden=hidden, pushed=pushed))

    async def _push(self, session: Session, step: Step, hidden: WireTensor) -> bool:
        """Hand this step's output to the next server of the chain; False if it cannot be reached."""
        target = step.push_to[0]
        forwarded = PushedStep(session_id=target.session_id,
                               step=step.model_copy(update={"hidden": hidden, "push_to": step.push_to[1:]}))
        try:
            push_stream = session.push_streams.get(target.peer_id)
            if push_stream is None:
                push_stream = await self.node.connect(target.peer_id, PUSH_PROTOCOL, timeout=5.0)
                session.push_streams[target.peer_id] = push_stream
            await push_stream.send(forwarded)
            return True
        except (ConnectionError, OSError, asyncio.TimeoutError) as e:
            logger.info("session %s: cannot push to %s: %r", session.name, target.peer_id, e)
            stale = session.push_streams.pop(target.peer_id, None)
            if stale is not None:
                stale.close()
            return False

    async def forward(self, stream: MessageStream) -> None:
        await self._one_request(stream, ForwardRequest, self._forward_reply)

    async def backward(self, stream: MessageStream) -> None:
        await self._one_request(stream, BackwardRequest, self._backward_reply)

    async def _one_request(self, stream: MessageStream, expected: type, answer) -> None:
        """A stateless stream: read its one request, check it, compute, answer; errors are answered by name."""
        try:
            request = await stream.recv(timeout=self.limits.open_timeout)
            if type(request) is not expected:
                raise BadRequestError(f"expected {expected.TYPE}, got {request.TYPE}")
            self._check_model(request.model_id)
            if request.receipt is not None:  # the client's receipt for its earlier work here
                self._take_receipt(request.receipt, stream.peer_id)
            reply = await answer(request)
            passes = 2 if expected is BackwardRequest else 1  # a backward recomputes the forward: twice the work
            self._count_work(stream.peer_id, request.hidden, (request.end_block - request.start_block) * passes,
                             in_session=False)
        except BadRequestError as e:
            await _reply_error(stream, e)
        except (EOFError, ConnectionError, asyncio.TimeoutError):
            pass
        except Exception as e:
            logger.exception("%s failed", expected.TYPE)
            await _reply_error(stream, e, kind="internal")
        else:
            await self._delay()  # emulated wide-area link, outbound
            await stream.send(reply)

    async def _compute(self, request: ForwardRequest, inputs: SpanInputs, grad_output: torch.Tensor | None = None):
        await self._delay()  # emulated wide-area link, inbound
        if self.limits.fail_file is not None and os.path.exists(self.limits.fail_file):
            raise RuntimeError("failure injected for testing (--debug-fail-file)")
        return await self.engine.forward(SpanRequest(request.start_block, request.end_block, inputs, grad_output))

    async def _forward_reply(self, request: ForwardRequest) -> ForwardResult:
        output = await self._compute(request, parse_forward(request, self.backend, self.limits, self.adapters))
        if isinstance(output, SpanOutput):
            return _with_hidden_states(output, request.hidden.codec, self._perturbed)
        return ForwardResult(hidden=WireTensor.from_torch(self._perturbed(output), codec=request.hidden.codec))

    async def _backward_reply(self, request: BackwardRequest) -> BackwardResult:
        inputs, grad_output = parse_backward(request, self.backend, self.limits, self.adapters)
        grads = await self._compute(request, inputs, grad_output)
        return BackwardResult(grad_hidden=WireTensor.from_torch(grads.hidden, codec=request.hidden.codec),
                              grad_prompts=None if grads.prompts is None else WireTensor.from_torch(grads.prompts),
                              grad_lora_a=[WireTensor.from_torch(a) for a, _ in grads.lora],
                              grad_lora_b=[WireTensor.from_torch(b) for _, b in grads.lora])

    def _take_receipt(self, receipt: WorkReceipt, peer_id: str) -> None:
        if self.credits is None:
            return
        try:
            self.credits.accept(receipt, peer_id)
        except ReceiptError as e:
            logger.info("rejected a receipt from %s: %s", peer_id, e)
        except Exception:  # e.g. the ledger's disk: the session goes on, as if the receipt were lost
            logger.exception("credits failed on a receipt from %s", peer_id)

    def _count_work(self, peer_id: str, hidden, blocks: int, in_session: bool = True) -> None:
        """Block-tokens served to `peer_id`: sequences x new tokens x blocks (`hidden`: a tensor or WireTensor)."""
        if self.credits is not None:
            self.credits.served(peer_id, hidden.shape[0] * hidden.shape[1] * blocks, in_session)

    def _perturbed(self, output: torch.Tensor) -> torch.Tensor:
        if self.limits.perturb <= 0:
            return output
        return output + self.limits.perturb * torch.randn_like(output)

    async def _delay(self) -> None:
        if self.limits.link_delay > 0:
            await asyncio.sleep(self.limits.link_delay)


def _with_hidden_states(output: SpanOutput, codec: str, perturbed) -> ForwardResult:
    """A forward's answer carrying every block's output (return_hidden_states), in the request's codec."""
    layers = None if output.layers is None else WireTensor.from_torch(perturbed(output.layers), codec=codec)
    return ForwardResult(hidden=WireTensor.from_torch(perturbed(output.hidden), codec=codec), hidden_states=layers)


async def _reply_error(stream: MessageStream, error: Exception, kind: str | None = None) -> None:
    if kind is None:
        kind = "cache_full" if isinstance(error, CacheFullError) else "bad_request"
    message = str(error) if kind != "internal" else f"internal error: {type(error).__name__}: {error}"
    try:
        await stream.send(ErrorReply(kind=kind, message=message[:2000]))
    except (ConnectionError, RuntimeError):
        pass
