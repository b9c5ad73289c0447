"""The engine: the one owner of a server's inference sessions and their KV memory (vLLM's engine core, small).

Handlers translate messages into requests and await the answers; they never touch caches or device tensors.
The engine's compute thread repeats three calls on plain data:
- `plan()` picks the next batch: all waiting steps that can share a forward with the first one (same blocks,
  same number of new tokens, same adapter, no padding mask or deep prompts), else one request; under contention,
  in credits order (`_in_line`: credited sessions first, one plan in FREE_RIDER_TURN for the oldest step);
- `execute(plan)` runs it: from a CUDA graph captured for the batch's size bucket where it can (graphs.py), else
  the ordinary way over the paged KV memory (kv.py);
- `apply(plan, outputs)` sets each session's length and resolves its request.

Counter model: a session's `length` is the number of tokens its rows hold. A step with `start` <= length
replaces tokens >= start with its new ones (a rollback, or a failover replay when start = 0): length = start + new.
Rewinding is setting that length; a beam reorder permutes the rows' tokens inside the KV memory before the step;
closing a session returns its pages at once.

Session table and page allocations change on the event loop's thread only (open, reserve, close); a session has at
most one request in flight, and its pages are never returned while one is, so the compute thread reads them safely.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from corolla.errors import BadRequestError, CacheFullError
from corolla.models.spec import SpanInputs
from corolla.server.backend import BlockBackend
from corolla.server.cache import Allocation, CacheManager, Grow
from corolla.server.graphs import BatchGraphs
from corolla.server.kv import KVStore, StepIndex

logger = logging.getLogger(__name__)

_INLINE_MAX_S = 0.05  # a lone session's decode steps run on the loop's thread only while they take less than this
# When fewer steps wait than the last plan ran, the compute thread waits this long at most (and at most a quarter of
# the last plan's time) for the others: sessions that were answered together come back one by one, and starting
# with the first alone splits one batch into two forwards that each read every weight (a GPU decode step costs
# about the same at 1 or 32 rows).
_BATCH_WAIT_S = 0.002
# Under contention, credited steps go first, except that one plan in FREE_RIDER_TURN starts with the oldest waiting
# step of any kind (about 20% of the plans: nobody starves, a free rider nor a credited step of low standing that
# cannot share a forward with those above it; each waits at most FREE_RIDER_TURN x its place in line plans).
FREE_RIDER_TURN = 5


class NonFiniteOutputError(RuntimeError):
    """A step computed NaN or Inf (the inputs were finite): this server is faulty for this request."""


@dataclass(eq=False)
class EngineSession:
    """What the engine keeps per inference session."""

    start_block: int
    end_block: int
    batch_size: int
    max_length: int
    lora: dict | None  # LoRA deltas per block for every step (a hosted adapter's or the client's own)
    allocation: Allocation
    length: int = 0
    number: int = 0  # for logs
    priority: float = 0.0  # credits standing (credits/book.py), set by the handlers; 0 = free rider
    _slots: torch.Tensor | None = field(default=None, repr=False)  # [rows, pages * page_tokens] flat token indices
    _slots_version: int = -1

    def slots(self, page_tokens: int, device: torch.device) -> torch.Tensor:
        """Each row's flat token indices into the KV arenas, in position order (rebuilt when pages were added)."""
        if self._slots_version != self.allocation.version:
            pages = torch.tensor(self.allocation.pages, dtype=torch.int64).view(self.batch_size, -1)
            tokens = (pages.unsqueeze(-1) * page_tokens + torch.arange(page_tokens)).view(self.batch_size, -1)
            self._slots, self._slots_version = tokens.to(device), self.allocation.version
        return self._slots


@dataclass(eq=False)
class Step:
    """An inference step of one session: `inputs.hidden` holds the new tokens, which start at position `start`."""

    session: EngineSession
    start: int
    inputs: SpanInputs  # on the CPU, as parsed; inputs.cache is unused (the engine's KV memory is the cache)
    reorder: torch.Tensor | None = None  # beam search: row i becomes the old row reorder[i] (before this step)

    @property
    def tokens(self) -> int:
        return self.inputs.hidden.shape[1]

    @property
    def rows(self) -> int:
        return self.inputs.hidden.shape[0]

    @property
    def shareable(self) -> bool:
        """Can run in one forward with other sessions' steps (those of `group`)."""
        return self.inputs.attention_mask is None and self.inputs.prompts is None

    @property
    def group(self) -> tuple:
        # Sessions share a forward only with the same adapter: the same hosted adapter object, or none.
        lora = self.inputs.lora
        return (self.session.start_block, self.session.end_block, self.tokens, self.inputs.hidden.dtype,
                id(lora) if lora else None)


@dataclass(eq=False)
class SpanRequest:
    """A stateless forward (grad_output None) or backward pass over blocks [start_block, end_block)."""

    start_block: int
    end_block: int
    inputs: SpanInputs
    grad_output: torch.Tensor | None = None


@dataclass(eq=False)  # queued items are removed by identity; comparing their tensors would be an error
class _Pending:
    request: Step | SpanRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop = field(repr=False)


@dataclass
class Plan:
    """What the compute thread runs next: steps of sessions in one forward, or one stateless request."""

    pending: list[_Pending]

    @property
    def steps(self) -> list[Step]:
        return [p.request for p in self.pending if isinstance(p.request, Step)]


@dataclass
class EngineStats:
    forwards: int = 0  # plans executed
    batched_requests: int = 0  # steps that ran together with others
    largest_batch: int = 1  # most steps in one forward
    graph_steps: int = 0  # plans replayed from CUDA graphs


class Engine:
    def __init__(self, backend: BlockBackend, cache: CacheManager, max_batch: int = 64, thread: bool = True):
        """thread=False: no compute thread; the caller runs what is queued with `drain()` (deterministic tests)."""
        self.backend, self.pages, self.max_batch = backend, cache, max_batch
        self.kv = KVStore(backend.start, backend.end, cache.arena_pages, cache.page_tokens, backend.device)
        self.graphs = BatchGraphs(backend, self.kv) if backend.cuda_graphs else None
        self.stats = EngineStats()
        self.sessions: set[EngineSession] = set()
        self._numbers = itertools.count(1)
        self._inference: deque[_Pending] = deque()
        self._turn = 0  # plans in a row put in credits order (every FREE_RIDER_TURN-th starts with the oldest)
        self._forward: deque[_Pending] = deque()
        self._wake = threading.Condition()
        self._computing = False  # a plan is being executed (guarded by _wake)
        self._decode_seconds = float("inf")  # the last lone decode step's compute time (none yet: unknown)
        self._last_rows, self._last_seconds = 0, 0.0  # the last plan of steps: its rows and its compute time
        self._stopping = False
        if thread:
            threading.Thread(target=self._loop, name="corolla-compute", daemon=True).start()

    # ---- the session table (event loop thread) -----------------------------------------------------------------

    def longest_session(self, batch_size: int) -> int:
        """The most tokens a session of `batch_size` sequences could ever hold here."""
        return self.pages.longest_row(batch_size)

    def open(self, start_block: int, end_block: int, batch_size: int, max_length: int,
             lora: dict | None = None) -> EngineSession:
        if not self.backend.start <= start_block < end_block <= self.backend.end:
            raise BadRequestError(f"blocks {start_block}:{end_block} are not inside this server's span "
                                  f"{self.backend.start}:{self.backend.end}")
        longest = self.longest_session(batch_size)
        if max_length > longest:
            raise CacheFullError(f"server cache full: a session of max_length={max_length} x batch {batch_size} "
                                 f"could never fit this server's {self.pages.total_tokens} tokens (at most "
                                 f"max_length={longest} at this batch size)")
        session = EngineSession(start_block, end_block, batch_size, max_length, lora,
                                Allocation(rows=batch_size), number=next(self._numbers))
        self.sessions.add(session)
        return session

    async def reserve(self, session: EngineSession, tokens: int, timeout: float) -> None:
        """Make each row of `session` hold room for `tokens` tokens, waiting up to `timeout` s for other sessions
        to end; raises CacheFullError."""
        await self.pages.grow(session.allocation, tokens, timeout, priority=session.priority)

    def reserve_now(self, session: EngineSession, tokens: int) -> None:
        """Like reserve, without waiting (start-up measurements, tests)."""
        result = self.pages.try_grow(session.allocation, tokens)
        if result != Grow.OK:
            raise CacheFullError(f"server cache full: no room for {tokens} tokens per row now ({result.value})")

    async def close(self, session: EngineSession) -> None:
        """End a session (no request of it in flight): its pages are free for others at once."""
        if session in self.sessions:
            self.sessions.discard(session)
            await self.pages.release(session.allocation)

    def close_now(self, session: EngineSession) -> None:
        """Like close, from outside an event loop (nobody waits for pages then)."""
        if session in self.sessions:
            self.sessions.discard(session)
            self.pages.release_now(session.allocation)

    # ---- requests (event loop thread) ---------------------------------------------------------------------------

    async def step(self, step: Step, alone: bool = False) -> torch.Tensor:
        """The span's output for `step` (on the CPU, in the dtype the hidden states came in).

        `alone`: the caller's session is the only one open. On a CPU its decode steps then run right here, on the
        event loop's thread, while the compute thread is idle: there is nothing to batch them with, and the two
        thread hand-offs cost ~0.1 + 0.2 ms a step on a busy 2-core machine (docs/benchmarks.md). Only while the last
        such step took under _INLINE_MAX_S: the loop's other work (pings, new sessions, the DHT) must not wait."""
        if step.start > step.session.length:
            raise BadRequestError(f"start={step.start} is past the session's {step.session.length} cached tokens")
        if step.session.allocation.row_pages * self.pages.page_tokens < step.start + step.tokens:
            raise CacheFullError("internal: step submitted before its cache room was reserved")
        return await self._submit(step, inference=True, inline_ok=alone)

    async def forward(self, request: SpanRequest):
        """A stateless forward (returns the output) or, with grad_output, a backward pass (returns Gradients)."""
        return await self._submit(request, inference=False)

    async def _submit(self, request, inference: bool, inline_ok: bool = False):
        loop = asyncio.get_running_loop()
        pending = _Pending(request, loop.create_future(), loop)
        with self._wake:
            inline = inline_ok and self._runs_inline(request)
            if inline:
                self._computing = True
            else:
                (self._inference if inference else self._forward).append(pending)
                self._wake.notify()
        if not inline:
            return await pending.future
        try:
            return self._run_here(pending)
        finally:
            self._idle()

    def run_now(self, request: Step | SpanRequest):
        """Run one request on the calling thread (start-up measurements, tests): the engine must be idle."""
        with self._wake:
            if self._inference or self._forward or self._computing:
                raise RuntimeError("run_now needs an idle engine")
            self._computing = True
        try:
            return self._run_here(_Pending(request, None, None))
        finally:
            self._idle()

    def _run_here(self, pending: _Pending):
        plan = Plan([pending])
        try:
            outputs = self.execute(plan)
        except Exception as error:
            outputs = error
        result = self.apply(plan, outputs)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _runs_inline(self, request) -> bool:
        return (self.backend.device.type == "cpu" and isinstance(request, Step) and request.tokens == 1
                and self._decode_seconds < _INLINE_MAX_S
                and not (self._inference or self._forward or self._computing))

    # ---- compute thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inference or self._forward or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                self._wait_for_batch()
                plan = self.plan()
                self._computing = True
            self._finish(plan)

    def _wait_for_batch(self) -> None:
        """(With _wake held.) Give the sessions of the last batch a moment to come back (_BATCH_WAIT_S)."""
        if not self._inference:
            return
        deadline = time.monotonic() + min(_BATCH_WAIT_S, self._last_seconds / 4)
        while sum(p.request.rows for p in self._inference) < self._last_rows and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.wait(remaining)

    def drain(self) -> int:
        """Run everything queued on the calling thread, as the compute thread would; returns the plans run."""
        plans = 0
        while True:
            with self._wake:
                if not (self._inference or self._forward):
                    return plans
                plan = self.plan()
                self._computing = True
            self._finish(plan)
            plans += 1

    def _finish(self, plan: Plan) -> None:
        try:
            outputs = self.execute(plan)
        except Exception as error:  # the handlers report it; the thread goes on
            outputs = error
        self._idle()  # before the results: a lone session's next step may then run inline
        for pending, result in zip(plan.pending, self.apply(plan, outputs)):
            setter = _set_exception if isinstance(result, Exception) else _set_result
            pending.loop.call_soon_threadsafe(setter, pending.future, result)

    def _idle(self) -> None:
        with self._wake:
            self._computing = False

    def plan(self) -> Plan:
        """Pick what runs next (with _wake held): all waiting steps that can share a forward with the first
        inference step, in priority order (`_in_line`), up to max_batch sequences; else the oldest stateless
        request. Nothing running is ever pre-empted; with room for everyone waiting, the order changes nothing."""
        if not self._inference:
            return Plan([self._forward.popleft()])
        line = self._in_line()
        first = line[0]
        self._inference.remove(first)
        batch = [first]
        if first.request.shareable:
            rows, group = first.request.rows, first.request.group
            for pending in line[1:]:
                step = pending.request
                if step.shareable and step.group == group and rows + step.rows <= self.max_batch:
                    self._inference.remove(pending)
                    batch.append(pending)
                    rows += step.rows
        return Plan(batch)

    def _in_line(self) -> list[_Pending]:
        """Waiting steps in the order they get places: credited ones first (highest standing, then oldest), then
        free riders (oldest first); every FREE_RIDER_TURN-th plan the oldest waiting step of any kind goes first
        (a free rider, or a credited step of low standing that cannot share a forward with those above it)."""
        queue = list(self._inference)  # oldest first
        credited = sorted((p for p in queue if p.request.session.priority > 0),
                          key=lambda p: -p.request.session.priority)  # stable: oldest first among equals
        free = [p for p in queue if p.request.session.priority <= 0]
        if not credited:
            self._turn = 0
            return free
        if self._turn >= FREE_RIDER_TURN - 1:
            self._turn = 0
            oldest = queue[0]
            return [oldest] + [p for p in credited + free if p is not oldest]
        self._turn += 1
        return credited + free

    def execute(self, plan: Plan) -> list:
        """Run a plan; returns one output per request (CPU tensors in the wire dtype, or Gradients)."""
        self.stats.forwards += 1
        steps = plan.steps
        if not steps:
            request = plan.pending[0].request
            if request.grad_output is not None:
                return [self.backend.backward_sync(request.start_block, request.end_block, request.inputs,
                                                   request.grad_output)]
            return [self.backend.run_sync(request.start_block, request.end_block, request.inputs)]
        if len(steps) > 1:
            self.stats.batched_requests += len(steps)
            self.stats.largest_batch = max(self.stats.largest_batch, len(steps))
        began = time.perf_counter()
        outputs = self._run_steps(steps)
        seconds = time.perf_counter() - began
        if len(steps) == 1 and steps[0].tokens == 1:
            self._decode_seconds = seconds
        self._last_rows, self._last_seconds = sum(step.rows for step in steps), seconds
        return outputs

    def apply(self, plan: Plan, outputs) -> list:
        """Advance each session whose step succeeded; returns each request's result: its output, or an exception
        (`outputs` itself when the plan failed as a whole)."""
        if isinstance(outputs, Exception):
            return [outputs] * len(plan.pending)
        results = []
        for pending, output in zip(plan.pending, outputs):
            request = pending.request
            if isinstance(request, Step):
                if not bool(torch.isfinite(output).all()):
                    output = NonFiniteOutputError(f"blocks {request.session.start_block}:{request.session.end_block}"
                                                  f" computed non-finite hidden states from finite inputs")
                else:
                    request.session.length = request.start + request.tokens
            results.append(output)
        return results

    def _run_steps(self, steps: list[Step]) -> list[torch.Tensor]:
        backend, device = self.backend, self.backend.device
        for step in steps:
            if step.reorder is not None:
                self._reorder(step)
        wire_dtype = steps[0].inputs.hidden.dtype
        hidden = _joined([step.inputs.hidden for step in steps]).to(device, backend.dtype)
        positions = _joined([step.inputs.position_ids for step in steps]).to(device)
        if self.graphs is not None and self.graphs.eligible(steps):
            self.stats.graph_steps += 1
            output = self.graphs.run(steps, hidden, positions, self._slots(steps))
        else:
            output = self._run_eager(steps, hidden, positions)
        output = output.to("cpu", wire_dtype)
        sizes = [step.rows for step in steps]
        return list(output.split(sizes)) if len(steps) > 1 else [output]

    def _slots(self, steps: list[Step]) -> list[torch.Tensor]:
        return [step.session.slots(self.pages.page_tokens, self.backend.device) for step in steps]

    def _reorder(self, step: Step) -> None:
        """Row i of the session's first `start` tokens becomes the old row reorder[i]."""
        slots = step.session.slots(self.pages.page_tokens, self.backend.device)[:, :step.start]
        order = step.reorder.to(slots.device)
        with torch.inference_mode():
            self.kv.copy_rows(slots[order].reshape(-1), slots.reshape(-1))

    def _run_eager(self, steps: list[Step], hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The ordinary way: a lone step's long prefill goes through in chunks of backend.prefill_chunk tokens
        (bounded attention memory); steps of several sessions run as one forward over left-padded rows."""
        first = steps[0].inputs
        chunk = self.backend.prefill_chunk
        if len(steps) > 1 or hidden.shape[1] <= chunk:
            return self._forward_rows(steps, [step.start for step in steps], hidden, positions)
        mask = None if first.attention_mask is None else first.attention_mask.to(self.backend.device)
        outputs = []
        for begin in range(0, hidden.shape[1], chunk):
            end = min(begin + chunk, hidden.shape[1])
            outputs.append(self._forward_rows(steps, [steps[0].start + begin], hidden[:, begin:end],
                                              positions[:, begin:end], mask))
        return torch.cat(outputs, dim=1)

    def _forward_rows(self, steps: list[Step], starts: list[int], hidden: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of new tokens at `starts` (one per step) over the KV memory."""
        new = hidden.shape[1]
        slots = self._slots(steps)
        lengths = [start + new for start in starts]
        longest = max(lengths)
        write = _joined([rows[:, start:start + new].reshape(-1) for rows, start in zip(slots, starts)])
        if all(length == longest for length in lengths):
            read = _joined([rows[:, :longest] for rows in slots])
            if mask is None and len(steps) == 1 and steps[0].inputs.attention_mask is not None:
                mask = steps[0].inputs.attention_mask.to(self.backend.device)
            if mask is not None:
                mask = mask[:, :longest]
        else:  # left padding, so that the new tokens land in the same columns for everyone
            read = torch.cat([torch.nn.functional.pad(rows[:, :length], (longest - length, 0),
                                                      value=self.kv.padding_token)
                              for rows, length in zip(slots, lengths)])
            mask = torch.cat([torch.cat([torch.zeros(step.rows, longest - length, dtype=torch.int64),
                                         torch.ones(step.rows, length, dtype=torch.int64)], dim=1)
                              for step, length in zip(steps, lengths)]).to(self.backend.device)
        first = steps[0]
        inputs = replace(first.inputs, hidden=hidden, position_ids=positions, attention_mask=mask, cache=self.kv.cache,
                         prompts=None if first.inputs.prompts is None else
                         first.inputs.prompts.to(self.backend.device, self.backend.dtype),
                         first_position=starts[0])
        self.kv.step = StepIndex(write=write, read=read, past=longest - new)
        try:
            return self.backend.compute(first.session.start_block, first.session.end_block, inputs)
        finally:
            self.kv.step = None

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along dim 0; a lone one as it is (most steps on a CPU server: no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
