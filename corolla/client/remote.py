"""Running hidden states through the remote blocks: stateless forward, and inference sessions that keep
server-side attention caches and survive servers failing (by re-routing and replaying their inputs)."""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from corolla.client.checking import OutputChecker, OutputMismatch
from corolla.client.extras import NO_EXTRAS, Extras
from corolla.client.routing import Hop
from corolla.client.swarm import SwarmClient
from corolla.errors import CorollaError, MissingBlocksError, RemoteError
from corolla.net.messages import (FORWARD_PROTOCOL, INFERENCE_PROTOCOL, CloseSession, ErrorReply, ForwardRequest,
                                  ForwardResult, OpenSession, PushTarget, SessionOpened, Step, StepResult,
                                  WorkReceipt)
from corolla.net.node import MessageStream
from corolla.net.wire import DEFAULT_MAX_FRAME_BYTES, FRAME_SLACK_BYTES, WireTensor, wire_bytes

logger = logging.getLogger(__name__)

#: Largest reply this client reads (its streams' frame limit). A forward that returns every block's output asks
#: each server for as many blocks as fit (servers have such a limit of their own, --max-request-mb, 256 MiB by
#: default, and refuse a request whose reply would not fit theirs).
MAX_REPLY_BYTES = DEFAULT_MAX_FRAME_BYTES

# Failures worth trying another server for. A "bad_request" reply is not among them: it would fail anywhere.
_RECOVERABLE = (ConnectionError, EOFError, asyncio.TimeoutError, OSError)


class _RetryableRemoteError(RemoteError):
    pass


def _check_reply(reply, expected: type, hop: Hop):
    if isinstance(reply, ErrorReply):
        error_class = RemoteError if reply.kind == "bad_request" else _RetryableRemoteError
        raise error_class(hop.peer_id, (hop.start, hop.end), f"{reply.kind}: {reply.message}")
    if not isinstance(reply, expected):
        raise _RetryableRemoteError(hop.peer_id, (hop.start, hop.end), f"unexpected reply {reply.TYPE}")
    return reply


WIRE_FORMATS = ("native", "float16", "bfloat16", "int8")


def encode_hidden(hidden: torch.Tensor, wire_format: str) -> WireTensor:
    """Activations as sent: as they are, cast to 16 bits, or blockwise 8-bit (lossy, ~3.8x smaller than fp32)."""
    if wire_format in ("float16", "bfloat16"):
        return WireTensor.from_torch(hidden.to(getattr(torch, wire_format)))
    if wire_format == "int8":
        return WireTensor.from_torch(hidden, codec="int8")
    if wire_format != "native":
        raise CorollaError(f"wire_format must be one of {', '.join(WIRE_FORMATS)}, got {wire_format!r}")
    return WireTensor.from_torch(hidden)


def wire_signature(local: torch.Tensor, wire_format: str) -> tuple:
    """(shape, dtype name, codec) that activations shaped like `local` have on the wire in `wire_format`."""
    dtype = wire_format if wire_format in ("float16", "bfloat16") else str(local.dtype).removeprefix("torch.")
    return tuple(local.shape), dtype, "int8" if wire_format == "int8" else "raw"


def _check_output(output: WireTensor, expected: tuple, local: torch.Tensor, hop: Hop) -> torch.Tensor:
    """The server's output, checked against what was sent (same shape, dtype and codec), in the local dtype and on
    the local device (a client whose embeddings and LM head are on a GPU gets its hidden states back there)."""
    if (tuple(output.shape), output.dtype, output.codec) != expected:
        raise _RetryableRemoteError(hop.peer_id, (hop.start, hop.end),
                                    f"returned {list(output.shape)} {output.dtype}/{output.codec}, expected "
                                    f"{list(expected[0])} {expected[1]}/{expected[2]}")
    hidden = output.to_torch("hidden")
    # NaN or Inf never comes out of a healthy server for finite inputs: treat it as a faulty server and fail over
    # (passed on, it would silently spoil every later block's cache and the generated tokens).
    if not _all_finite(hidden):
        raise _RetryableRemoteError(hop.peer_id, (hop.start, hop.end), "returned non-finite hidden states (NaN or Inf)")
    return hidden.to(local.device, local.dtype)


def _all_finite(hidden: torch.Tensor) -> bool:
    """numpy's check where it can: ~3x cheaper than torch's on a decode step's few values (4.5 against 13 us for
    576), and single-threaded on a prefill's many (no OpenMP team on the network thread)."""
    if hidden.dtype == torch.bfloat16:  # numpy has no bfloat16
        return bool(torch.isfinite(hidden).all())
    return bool(np.isfinite(hidden.numpy()).all())


def _optional(tensor: torch.Tensor | None) -> WireTensor | None:
    return None if tensor is None else WireTensor.from_torch(tensor)


class _Attempts:
    """Counts failures of one call; raises once more than `max_retries` happened."""

    def __init__(self, swarm: SwarmClient, log: list[str] | None = None):
        self.swarm, self.failures, self.log = swarm, 0, log

    def failed(self, hop: Hop, error: BaseException) -> None:
        self.failures += 1
        if self.log is not None:
            self.log.append(hop.peer_id)
        logger.warning("server %s (blocks %d:%d) failed: %r", hop.peer_id, hop.start, hop.end, error)
        self.swarm.ban(hop.peer_id)
        if self.failures > self.swarm.config.max_retries:
            raise CorollaError(
                f"gave up after {self.failures} failed attempts; last: server {hop.peer_id} "
                f"(blocks {hop.start}..{hop.end - 1}): {error!r}"
            ) from error


async def _no_replacement_names(hop: Hop, error: BaseException, rerouting) -> None:
    """Await a re-route; if no server can take over, say which server failed and which blocks are left bare."""
    try:
        await rerouting
    except MissingBlocksError as missing:
        raise CorollaError(f"server {hop.peer_id} (blocks {hop.start}..{hop.end - 1}) failed ({error!r}), "
                           f"and no other server took over: {missing}") from error


class RemoteSequence:
    """Stateless forward of hidden states through all blocks (used outside inference sessions)."""

    def __init__(self, swarm: SwarmClient):
        self.swarm = swarm

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, extras: Extras = NO_EXTRAS,
                span: tuple[int, int] | None = None, layers: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Blocks [span) (default: all); with `layers`, every block's output is appended to it (the last one is
        also the result)."""
        start, end = span or (0, self.swarm.num_blocks)
        return self.swarm.call(self.forward_span(start, end, hidden, position_ids, attention_mask, extras,
                                                 layers=layers), self.swarm.config.call_timeout)[0]

    async def forward_span(self, start: int, end: int, hidden, position_ids, attention_mask,
                           extras: Extras = NO_EXTRAS, rows: slice = slice(None),
                           attempts: "_Attempts | None" = None, layers: list[torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, list[tuple[Hop, torch.Tensor]]]:
        """Blocks [start, end), re-routing around failed servers; also returns each hop run with its input (what a
        backward pass needs). `rows`: which batch rows of the extras' prompts these hidden states are. `layers`:
        a list to append each block's output to (asked of every server in the same round trip)."""
        attempts = attempts or _Attempts(self.swarm)
        position, inputs = start, []
        while position < end:
            hop = (await self.swarm.route(position, end, purpose="forward", adapter=extras.adapter))[0]
            if layers is not None:
                hop = _fitting_reply(hop, hidden, self.swarm.config.wire_format)
            try:
                output = await self._call(hop, hidden, position_ids, attention_mask, extras, rows, layers)
                inputs.append((hop, hidden))
                hidden, position = output, hop.end
            except (_RetryableRemoteError, *_RECOVERABLE) as e:
                attempts.failed(hop, e)
                await _no_replacement_names(hop, e, self.swarm.route(position, end, purpose="forward",
                                                                     adapter=extras.adapter))
        return hidden, inputs

    async def _call(self, hop: Hop, hidden, position_ids, attention_mask, extras: Extras = NO_EXTRAS,
                    rows: slice = slice(None), layers: list[torch.Tensor] | None = None) -> torch.Tensor:
        stream = await self.swarm.connect(hop.peer_id, FORWARD_PROTOCOL)
        try:
            sent = encode_hidden(hidden, self.swarm.config.wire_format)
            await stream.send(ForwardRequest(model_id=self.swarm.model_id, start_block=hop.start, end_block=hop.end,
                                             hidden=sent, position_ids=_optional(position_ids),
                                             attention_mask=_optional(attention_mask),
                                             prompts=extras.prompts_for(hop, rows), lora=extras.lora_for(hop),
                                             adapter=extras.adapter, edits=extras.edits_for(hop, rows),
                                             return_hidden_states=layers is not None,
                                             receipt=stateless_receipt(self.swarm, hop)))
            reply = _check_reply(await stream.recv(self.swarm.config.step_timeout), ForwardResult, hop)
            signature = wire_signature(hidden, self.swarm.config.wire_format)
            output = _check_output(reply.hidden, signature, hidden, hop)
            if layers is not None:
                layers.extend([*_hop_layers(reply, hop, signature, hidden), output])
            stateless_accepted(self.swarm, hop, hidden, passes=1)
            return output
        finally:
            stream.close()


def stateless_receipt(swarm: SwarmClient, hop: Hop) -> WorkReceipt | None:
    """The receipt a forward or backward request to `hop` carries: for the server's earlier work, if any is owed."""
    return swarm.payer.receipt_if_owed(hop.peer_id) if swarm.payer is not None else None


def stateless_accepted(swarm: SwarmClient, hop: Hop, hidden: torch.Tensor, passes: int) -> None:
    """A forward (passes=1) or backward (2: the server recomputes the forward) of `hidden` through `hop` passed
    every check: it counts toward the server's receipt."""
    if swarm.payer is not None:
        swarm.payer.accepted(hop.peer_id, hidden.shape[0] * hidden.shape[1] * (hop.end - hop.start) * passes)


def _fitting_reply(hop: Hop, hidden: torch.Tensor, wire_format: str) -> Hop:
    """The first blocks of `hop` whose outputs, all returned in one reply, fit MAX_REPLY_BYTES (at least one block:
    its reply is no larger than the request)."""
    per_block = wire_bytes(*wire_signature(hidden, wire_format))
    blocks = max(1, (MAX_REPLY_BYTES - FRAME_SLACK_BYTES) // per_block)
    return replace(hop, end=min(hop.end, hop.start + blocks))


def _hop_layers(reply: ForwardResult, hop: Hop, signature: tuple, local: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of a hop's blocks but the last, checked like its output: [blocks - 1] x [batch, tokens, hidden]."""
    blocks = hop.end - hop.start
    if blocks == 1:
        return []
    if reply.hidden_states is None:
        raise _RetryableRemoteError(hop.peer_id, (hop.start, hop.end), "returned no hidden_states")
    shape, dtype, codec = signature
    stacked = _check_output(reply.hidden_states, ((blocks - 1, *shape), dtype, codec), local, hop)
    return list(stacked.unbind(0))


class _History:
    """The inputs sent to one hop for every position it holds, kept for replays and output checks.

    Held in a buffer that grows by doubling, so a decode step writes only its new tokens. Concatenating the whole
    past on every step cost O(length) per token, and its size started an OpenMP thread team on the network thread
    whose spinning worker burnt ~7 ms of CPU per token (measured: docs/benchmarks.md, "Hot-path cuts")."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None  # [batch, capacity, hidden]

    def put(self, start: int, x: torch.Tensor) -> torch.Tensor:
        """Record x as the inputs for positions [start, start + n), dropping later ones; returns those for
        [0, start + n) (a view, valid until the next put)."""
        end = start + x.shape[1]
        if self._buffer is None or end > self._buffer.shape[1] or self._buffer.shape[0] != x.shape[0]:
            capacity = max(end, 2 * self._buffer.shape[1] if self._buffer is not None else 0)
            grown = x.new_empty((x.shape[0], capacity, *x.shape[2:]))
            if start:
                grown[:, :start] = self._buffer[:, :start]
            self._buffer = grown
        self._buffer[:, start:end] = x
        return self._buffer[:, :end]

    def reorder(self, order: torch.Tensor) -> None:
        if self._buffer is not None:
            self._buffer = self._buffer.index_select(0, order)


@dataclass
class _HopSession:
    hop: Hop
    history: _History = field(default_factory=_History)  # inputs to block hop.start (shared with a replacement)
    needs_replay: bool = False  # a fresh server: its next step starts at 0 and carries the whole history
    stream: MessageStream | None = None
    session_id: str | None = None  # the server's secret token for this session (lets servers push to it)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


@dataclass
class _Progress:
    index: int  # next hop to run
    x: torch.Tensor  # its input for positions `start`.. (the step's new tokens; every token after a replay)
    start: int

    contacting: int = 0  # the hop being talked to (ahead of `index` while a push chain is opened)

    def advance(self, output: torch.Tensor, start: int) -> None:
        self.index, self.x, self.start = self.index + 1, output, start
        self.contacting = self.index


@dataclass
class _StepInputs:
    start: int
    positions: torch.Tensor  # [batch, start + new] positions of every token so far (for replays)
    attention_mask: torch.Tensor | None  # [batch, start + new]


class InferenceSession:
    """A generation session over all blocks: one stream per server, caches kept on the servers.

    Counter model: `position` = tokens the servers hold, moved only by the session's own operations: a step
    advances it (`step(hidden, start=p)` replaces tokens >= p, p defaulting to `position`), `rollback_to` moves it
    back (free: the next step starts there and the servers drop what follows), `reorder` permutes the rows. The
    session keeps the inputs it sent to each server; when a server fails, the remaining blocks are re-routed and
    each new server's next step starts at 0 with that whole history, so the output is the same as without the
    failure.
    """

    def __init__(self, swarm: SwarmClient, max_length: int, batch_size: int = 1, extras: Extras = NO_EXTRAS,
                 span: tuple[int, int] | None = None):
        self.swarm, self.max_length, self.batch_size = swarm, max_length, batch_size
        self._span = span  # the blocks it runs, [start, end) (a slice of model.transformer.h); None: all
        self.extras = extras  # deep prompts, LoRA weights or a hosted adapter, for every step
        self.prefix_tokens = 0  # prompt-tuning positions the model put before the caller's tokens
        self._position = 0
        self._hops: list[_HopSession] = []
        self._positions: torch.Tensor | None = None
        self._step_ids = 0
        self.closed = False
        self.failed_servers: list[str] = []  # peer ids that failed during this session, in order
        self._reorder: torch.Tensor | None = None  # beam-search row order for the servers' caches, sent with the next step
        config = swarm.config
        self.checker = OutputChecker(swarm, functools.partial(RemoteSequence(swarm)._call, extras=extras),
                                     config.check_share if config.check_outputs else 0.0, config.check_tolerance,
                                     config.check_strikes)

    @property
    def start_block(self) -> int:
        return self._span[0] if self._span is not None else 0

    @property
    def end_block(self) -> int:
        return self._span[1] if self._span is not None else self.swarm.num_blocks

    @property
    def _cache_tokens(self) -> int:
        return self.max_length * self.batch_size

    @property
    def route(self) -> list[Hop]:
        return [hop_session.hop for hop_session in self._hops]

    @property
    def position(self) -> int:
        """Tokens the servers hold (prompt-tuning positions included). Read-only: see `step` and `rollback_to`."""
        return self._position

    def rollback_to(self, position: int) -> None:
        """Forget the tokens at `position` and after (e.g. rejected speculative drafts): the next step starts there,
        and the servers drop the rest then. Prompt-tuning positions, once held, cannot be rolled back."""
        floor = self.prefix_tokens if self._position >= self.prefix_tokens else 0
        if not floor <= position <= self._position:
            held = f" (the first {floor} are prompt-tuning positions)" if floor else ""
            raise CorollaError(f"rollback_to({position}): the position must be between {floor} and the session's "
                               f"position {self._position}{held}")
        self._position = position

    def _advance(self, inputs: "_StepInputs", tokens: int) -> None:
        """After a step of `tokens` tokens from inputs.start: the servers hold them, rows in their new order."""
        self._positions, self._position = inputs.positions, inputs.start + tokens
        self._reorder = None

    def reorder(self, order: torch.Tensor) -> None:
        """Beam search: row i of every cache becomes the old row order[i]. Applied here to the inputs kept for
        replays at once, and on the servers with the next step."""
        order = order.to(torch.int64).cpu()
        if order.shape != (self.batch_size,):
            raise CorollaError(f"reorder needs {self.batch_size} indices, got shape {tuple(order.shape)}")
        for hop_session in self._hops:
            hop_session.history.reorder(order)
        if self._positions is not None:
            self._positions = self._positions.index_select(0, order)
        self._reorder = order if self._reorder is None else self._reorder.index_select(0, order)

    def step(self, hidden: torch.Tensor, position_ids: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, start: int | None = None) -> torch.Tensor:
        if self.closed:
            raise CorollaError("this inference session is closed")
        start = self.position if start is None else start
        batch, tokens, _ = hidden.shape
        if not 0 <= start <= self.position:
            raise CorollaError(f"step start={start} must be between 0 and the session's position {self.position}")
        if batch != self.batch_size:
            raise CorollaError(f"the session was opened for batch_size={self.batch_size}, got a batch of {batch}")
        if start + tokens > self.max_length:
            raise CorollaError(f"session max_length={self.max_length} exceeded: {start} + {tokens} tokens")
        if tokens == 0:  # nothing for the servers to compute (Petals allows empty steps)
            if start < self.position:
                self.rollback_to(start)  # as a step from `start` would: the tokens after it are dropped
            return hidden.clone()
        if position_ids is None:
            position_ids = torch.arange(start, start + tokens).unsqueeze(0).expand(batch, -1)
        past = self._positions[:, :start] if self._positions is not None else position_ids[:, :0]
        inputs = _StepInputs(start, torch.cat([past, position_ids.to(torch.int64)], dim=1), attention_mask)
        try:
            output = self.swarm.call(self._step(hidden, inputs), self.swarm.config.call_timeout)
        except TimeoutError:
            self.close()  # streams may be mid-message now; this session cannot continue
            raise CorollaError(f"an inference step took longer than call_timeout="
                               f"{self.swarm.config.call_timeout:.0f} s; the session is closed") from None
        self._advance(inputs, tokens)
        return output

    async def _step(self, hidden: torch.Tensor, inputs: _StepInputs) -> torch.Tensor:
        if not self._hops:
            route = await self.swarm.route(self.start_block, self.end_block, min_cache_tokens=self._cache_tokens,
                                           adapter=self.extras.adapter)
            self._hops = [_HopSession(hop) for hop in route]
        self._step_ids += 1
        attempts = _Attempts(self.swarm, self.failed_servers)
        progress = _Progress(index=0, x=hidden, start=inputs.start)  # hop to run next, and its input
        while progress.index < len(self._hops):
            try:
                # A push chain carries the step's new tokens only (never a replayed hop's whole output).
                if progress.start == inputs.start and self._can_push(progress.index, inputs.start):
                    await self._run_pushed(progress, inputs)
                else:
                    await self._run_direct(progress, inputs)
            except (_RetryableRemoteError, OutputMismatch, *_RECOVERABLE) as e:
                # The hop that failed: the one being run, or one further down a push chain being opened (then the
                # hops before it have not run this step yet, and still will, from progress.index).
                failed_index = progress.contacting
                failed = self._hops[failed_index]
                attempts.failed(failed.hop, e)
                await _no_replacement_names(failed.hop, e, self._reroute(failed_index))
                progress.contacting = progress.index
        await self._send_receipts(due_only=True)
        return progress.x[:, inputs.start - progress.start:]

    def _accepted(self, hop_session: _HopSession, sent: torch.Tensor) -> None:
        """The hop's output for `sent` passed every check: it counts toward the server's receipt."""
        if self.swarm.payer is not None:
            hop = hop_session.hop
            self.swarm.payer.accepted(hop.peer_id, sent.shape[0] * sent.shape[1] * (hop.end - hop.start))

    async def _send_receipts(self, due_only: bool) -> None:
        """Send each server of the route its receipt: when one is due (every few steps), or all owed (closing).
        A failed send is not an error: the next step finds out whether the stream still works."""
        payer = self.swarm.payer
        for hop_session in self._hops if payer is not None else ():
            peer = hop_session.hop.peer_id
            if hop_session.stream is not None and (payer.due(peer) if due_only else payer.owes(peer)):
                try:
                    await asyncio.wait_for(hop_session.stream.send(payer.receipt(peer)), 2)
                except Exception:
                    logger.debug("sending a receipt to %s failed", peer, exc_info=True)

    async def _run_direct(self, progress: "_Progress", inputs: _StepInputs) -> None:
        """Run hop `progress.index` alone. A fresh server (after a re-route) gets the same kind of step, only from
        position 0 and with the hop's whole recorded history, so its output covers every position too."""
        hop_session = self._hops[progress.index]
        full = hop_session.history.put(progress.start, progress.x)
        start = 0 if hop_session.needs_replay else inputs.start
        sent = full[:, start:]
        await self._ensure_open(hop_session)
        # A fresh server holds no rows to reorder: the history it gets is in the new order already.
        await self._send_step(hop_session, sent, start, inputs.positions[:, start:], inputs.attention_mask,
                              reorder=None if hop_session.needs_replay else self._reorder)
        output = await self._receive(hop_session, sent)
        await self._maybe_check(hop_session, full, inputs, output[:, inputs.start - start:])
        self._accepted(hop_session, sent)
        hop_session.needs_replay = False
        progress.advance(output, start)

    async def _maybe_check(self, hop_session: _HopSession, full_input: torch.Tensor, inputs: _StepInputs,
                           output: torch.Tensor) -> None:
        if self.checker.should_check():
            await self.checker.check(hop_session.hop, full_input, inputs.positions, inputs.attention_mask,
                                     inputs.start, output)

    def _can_push(self, index: int, start: int) -> bool:
        rest = self._hops[index:]
        # A pushed step carries one hop's deep prompts only: steps at prompt positions go hop by hop.
        return (self.swarm.config.use_push and len(rest) > 1 and not any(h.needs_replay for h in rest)
                and start >= self.extras.pre_seq_len)

    async def _run_pushed(self, progress: "_Progress", inputs: _StepInputs) -> None:
        """Send the step to hop `index` naming the rest of the chain; each server pushes its output to the next and
        also returns it here (the history needed for recovery). Falls back to direct sends where a push failed."""
        chain = self._hops[progress.index:]
        for offset, hop_session in enumerate(chain):
            progress.contacting = progress.index + offset
            await self._ensure_open(hop_session)
        progress.contacting = progress.index
        targets = [PushTarget(peer_id=h.hop.peer_id, session_id=h.session_id) for h in chain[1:]]
        await self._send_step(chain[0], progress.x, inputs.start, inputs.positions[:, inputs.start:],
                              inputs.attention_mask, push_to=targets, reorder=self._reorder)
        for hop_session in chain:
            reply_pushed, output = await self._receive(hop_session, progress.x, want_pushed=True)
            full = hop_session.history.put(inputs.start, progress.x)
            await self._maybe_check(hop_session, full, inputs, output)
            self._accepted(hop_session, progress.x)
            progress.advance(output, inputs.start)
            if not reply_pushed:
                return  # the next server did not get it: the caller continues hop by hop from here

    async def _reroute(self, index: int) -> None:
        """Replace hops index.. with a new route from the failed hop's first block; each one's next step will start
        at 0 with its whole history."""
        failed = self._hops[index]
        for hop_session in self._hops[index:]:
            hop_session.close()
        new_route = await self.swarm.route(failed.hop.start, self.end_block, min_cache_tokens=self._cache_tokens,
                                           adapter=self.extras.adapter)
        fresh = [_HopSession(hop, needs_replay=True) for hop in new_route]
        fresh[0].history = failed.history  # same first block, so the same inputs
        self._hops[index:] = fresh
        logger.info("re-routed blocks %d:%d via %s", failed.hop.start, self.end_block,
                    ", ".join(f"{h.peer_id[-6:]}[{h.start}:{h.end}]" for h in new_route))

    async def _ensure_open(self, hop_session: _HopSession) -> None:
        if hop_session.stream is not None:
            return
        hop = hop_session.hop
        stream = await self.swarm.connect(hop.peer_id, INFERENCE_PROTOCOL)
        try:
            await stream.send(OpenSession(model_id=self.swarm.model_id, start_block=hop.start, end_block=hop.end,
                                          max_length=self.max_length, batch_size=self.batch_size,
                                          cache_wait=self.swarm.config.cache_wait, adapter=self.extras.adapter,
                                          lora=self.extras.lora_for(hop),
                                          receipt=self.swarm.payer.receipt(hop.peer_id) if self.swarm.payer else None))
            opened = _check_reply(await stream.recv(self.swarm.config.step_timeout), SessionOpened, hop)
        except BaseException:
            stream.close()
            raise
        hop_session.stream, hop_session.session_id = stream, opened.session_id

    async def _send_step(self, hop_session: _HopSession, hidden: torch.Tensor, start: int,
                         position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         push_to: list[PushTarget] = (), reorder: torch.Tensor | None = None) -> None:
        try:
            await hop_session.stream.send(Step(step_id=self._step_ids, start=start,
                                               hidden=encode_hidden(hidden, self.swarm.config.wire_format),
                                               position_ids=WireTensor.from_torch(position_ids),
                                               attention_mask=_optional(attention_mask), push_to=list(push_to),
                                               reorder=_optional(reorder),
                                               prompts=self.extras.prompts_for(hop_session.hop)
                                               if start < self.extras.pre_seq_len else None))
        except BaseException:
            hop_session.close()  # the stream may be out of sync now; a retry opens a new one
            raise

    async def _receive(self, hop_session: _HopSession, sent: torch.Tensor, want_pushed: bool = False):
        """This step's result from `hop_session`, skipping results of earlier steps (duplicates after a push)."""
        try:
            while True:
                reply = _check_reply(await hop_session.stream.recv(self.swarm.config.step_timeout), StepResult,
                                     hop_session.hop)
                if reply.step_id == self._step_ids:
                    break
        except BaseException:
            hop_session.close()
            raise
        expected = wire_signature(sent, self.swarm.config.wire_format)
        output = _check_output(reply.hidden, expected, sent, hop_session.hop)
        return (reply.pushed, output) if want_pushed else output

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        hops = self._hops

        async def close_all():
            await self._send_receipts(due_only=False)
            for hop_session in hops:
                if hop_session.stream is not None:
                    try:
                        await asyncio.wait_for(hop_session.stream.send(CloseSession()), 2)
                    except Exception:
                        pass
                hop_session.close()

        try:
            self.swarm.call(close_all(), timeout=10)
        except Exception:
            logger.debug("closing session streams failed", exc_info=True)
        self._hops = []

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
