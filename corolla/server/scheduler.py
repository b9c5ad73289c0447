"""The compute thread's loop: plan a batch, compute it, hand back the results (vLLM's engine step, small).

Handlers submit work and await a future; they never touch the device. Inference steps come before forward
requests and backward passes. Single-token decode steps of different sessions over the same blocks are run as one forward
(continuous batching: sessions of different lengths together), each session keeping its own cache:
their caches are stacked left-padded into a temporary one, a padding mask hides the pads, and afterwards each
session's cache holds views of its rows of the result (its own entries, the new token's included). The math per
session is the same as alone (masked positions get exactly zero attention weight).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from corolla.models.spec import SpanInputs, plain_span_layers
from corolla.server.backend import BlockBackend

logger = logging.getLogger(__name__)

_INLINE_MAX_S = 0.05  # a lone session's decode steps run on the loop's thread only while they take less than this


@dataclass(eq=False)  # queued items are removed by identity; comparing their tensors would be an error
class Work:
    """One request for the compute thread."""

    start_block: int
    end_block: int
    inputs: SpanInputs
    inference: bool  # inference steps have priority over forward requests
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop = field(repr=False)
    grad_output: torch.Tensor | None = None  # set for a backward pass: the gradient of the loss w.r.t. the output

    @property
    def decode(self) -> bool:
        """An inference step of one new token per sequence."""
        return self.inference and self.inputs.hidden.shape[1] == 1

    @property
    def batchable(self) -> bool:
        """A decode step with a plain cache, no padding and no deep prompts can share a forward with others (those
        with the same LoRA weights: see _group)."""
        inputs = self.inputs
        return (self.decode and inputs.cache is not None and inputs.attention_mask is None and inputs.prompts is None
                and plain_span_layers(inputs.cache, self.start_block, self.end_block))


def _group(work: Work) -> tuple:
    # Sessions share a forward only with the same adapter: the same hosted adapter object, or none.
    adapter = id(work.inputs.lora) if work.inputs.lora else None
    return work.start_block, work.end_block, work.inputs.hidden.dtype, adapter


@dataclass
class SchedulerStats:
    steps: int = 0  # forwards run
    batched_requests: int = 0  # requests that ran together with others
    largest_batch: int = 1


class Scheduler:
    def __init__(self, backend: BlockBackend, max_batch: int = 64):
        self.backend, self.max_batch = backend, max_batch
        self.stats = SchedulerStats()
        self._inference: deque[Work] = deque()
        self._forward: deque[Work] = deque()
        self._wake = threading.Condition()
        self._computing = False  # the compute thread is running a batch (guarded by _wake)
        self._decode_seconds = float("inf")  # the last single decode step's compute time (none yet: unknown)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="corolla-compute", daemon=True)
        self._thread.start()

    async def run(self, start_block: int, end_block: int, inputs: SpanInputs, inference: bool,
                  grad_output: torch.Tensor | None = None, alone: bool = False):
        """The output of blocks [start_block, end_block) on `inputs`; with `grad_output`, a backward pass instead
        (returns backend.Gradients).

        `alone`: the caller's inference session is the only one open. On a CPU, its decode steps then run right
        here, on the event loop's thread, while the compute thread is idle: there is nothing to batch them with, and
        the two thread hand-offs cost ~0.1 + 0.2 ms a step on a busy 2-core machine (docs/benchmarks.md). Nothing
        else can be submitted meanwhile (submissions come from this thread), so computations never overlap. Only
        while the last decode step took under _INLINE_MAX_S: the loop's other work (pings, new sessions, the DHT)
        must not wait longer."""
        loop = asyncio.get_running_loop()
        work = Work(start_block, end_block, inputs, inference, loop.create_future(), loop, grad_output)
        with self._wake:
            inline = alone and self._runs_inline(work)
            if not inline:
                (self._inference if inference else self._forward).append(work)
                self._wake.notify()
        if inline:
            return self._compute([work])[0]
        return await work.future

    def _runs_inline(self, work: Work) -> bool:
        return (self.backend.device.type == "cpu" and work.decode and work.grad_output is None
                and self._decode_seconds < _INLINE_MAX_S and not (self._inference or self._forward or self._computing))

    # ---- compute thread ---------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._inference or self._forward or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
                try:
                    batch = self._plan()
                except Exception:  # never let planning kill the compute thread
                    logger.exception("planning a batch failed; running the first request alone")
                    queue = self._inference or self._forward
                    batch = [queue.popleft()]
                self._computing = True
            try:
                outputs = self._compute(batch)
            except Exception as e:  # the handler reports it; the thread goes on
                self._idle()
                for work in batch:
                    work.loop.call_soon_threadsafe(_set_exception, work.future, e)
                continue
            self._idle()  # before the results: a lone session's next step may then run inline
            for work, output in zip(batch, outputs):
                work.loop.call_soon_threadsafe(_set_result, work.future, output)

    def _idle(self) -> None:
        with self._wake:
            self._computing = False

    def _plan(self) -> list[Work]:
        """Pick what runs next: all waiting batchable decode steps over the first one's blocks, else one request."""
        queue = self._inference or self._forward
        first = queue.popleft()
        batch = [first]
        if first.batchable:
            for work in list(self._inference):
                if len(batch) >= self.max_batch:
                    break
                if work.batchable and _group(work) == _group(first):
                    self._inference.remove(work)
                    batch.append(work)
        return batch

    def _compute(self, batch: list[Work]) -> list[torch.Tensor]:
        self.stats.steps += 1
        if len(batch) == 1:
            work = batch[0]
            if work.grad_output is not None:
                return [self.backend.backward_sync(work.start_block, work.end_block, work.inputs, work.grad_output)]
            began = time.perf_counter()
            output = self.backend.run_sync(work.start_block, work.end_block, work.inputs)
            if work.decode:
                self._decode_seconds = time.perf_counter() - began
            return [output]
        self.stats.batched_requests += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        return self._compute_batched(batch)

    def _compute_batched(self, batch: list[Work]) -> list[torch.Tensor]:
        start, end = batch[0].start_block, batch[0].end_block
        sizes = [work.inputs.hidden.shape[0] for work in batch]
        lengths = [work.inputs.cache.layers[start].keys.shape[-2] for work in batch]
        longest = max(lengths)
        stacked = self.backend.new_cache()
        for layer_index in range(start, end):
            layers = [work.inputs.cache.layers[layer_index] for work in batch]
            if all(length == longest for length in lengths):  # common case, no padding to add
                keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
            else:  # left padding, so the new token lands in the same column for everyone
                keys = [torch.nn.functional.pad(layer.keys, (0, 0, longest - length, 0))
                        for layer, length in zip(layers, lengths)]
                values = [torch.nn.functional.pad(layer.values, (0, 0, longest - length, 0))
                          for layer, length in zip(layers, lengths)]
            stacked.update(torch.cat(keys), torch.cat(values), layer_index)
        mask = None if all(length == longest for length in lengths) else torch.cat(
            [torch.cat([torch.zeros(size, longest - length, dtype=torch.int64),
                        torch.ones(size, length + 1, dtype=torch.int64)], dim=1) for size, length in zip(sizes, lengths)])
        inputs = SpanInputs(hidden=torch.cat([work.inputs.hidden for work in batch]),
                            position_ids=torch.cat([work.inputs.position_ids for work in batch]),
                            attention_mask=mask, cache=stacked, lora=batch[0].inputs.lora)
        output = self.backend.run_sync(start, end, inputs)
        # Each session's cache becomes its rows of the stacked cache (views: no copies, no kernel launches). The
        # next batched step stacks them again; a step alone appends to them as to any cache.
        offsets = [sum(sizes[:i]) for i in range(len(batch))]
        for layer_index in range(start, end):
            layer = stacked.layers[layer_index]
            for work, offset, size, length in zip(batch, offsets, sizes, lengths):
                own = work.inputs.cache.layers[layer_index]
                own.keys = layer.keys[offset:offset + size, :, longest - length:]
                own.values = layer.values[offset:offset + size, :, longest - length:]
        return [output[offset:offset + size] for offset, size in zip(offsets, sizes)]

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()


def _set_result(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
