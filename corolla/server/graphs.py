"""Decode steps, and the few-token steps that verify speculative drafts, replayed from CUDA graphs.

At batch 1 a GPU server is bound by its CPU: every block launches ~35 kernels, and the Python between them costs
more than the GPU's own work (a 16-block span of an 8B model: ~15 ms of launching for ~3 ms of GPU time). A graph
launches a whole span's step at once.

A graph needs fixed shapes and addresses, so a session that decodes gets a static cache (transformers'
StaticLayer, which writes each new token at a counter kept on the device) with room for `capacity` tokens, and a
graph of its step over it; the attention mask, "every slot up to the new token", is computed inside the graph from
that counter. The session's own DynamicCache stays the authority: after each step its layers are views of the
static buffers, so rollbacks, batched steps and longer steps work on it as before. When one of those has left it
elsewhere, its contents are copied back before the next step. A session outgrowing its capacity gets a new static
cache of twice the capacity, and new graphs.

A step of n new tokens (1 to MAX_GRAPH_TOKENS: a decode step, or a speculative draft being verified) has a graph
of its own, captured the first time a session takes a step of that length; a session's graphs share one memory
pool, since they never run at once. Verifying a draft eagerly launches as many kernels as a decode step, so
without graphs it cost a GPU server several times a decode step (docs/benchmarks.md, "Speculative decoding").
"""

from __future__ import annotations

import collections
import logging
import time
import weakref

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, StaticLayer

from corolla.models.spec import SpanInputs, StaticDecode, plain_span_layers

logger = logging.getLogger(__name__)

MIN_CAPACITY = 256  # tokens; a multiple of 16, as memory-efficient attention wants of its mask
MAX_GRAPH_TOKENS = 16  # longer steps (prefills) run the ordinary way: their launches are amortized over the tokens


def capacity_for(tokens: int) -> int:
    capacity = MIN_CAPACITY
    while capacity < tokens:
        capacity *= 2
    return capacity


class StepGraph:
    """The static inputs, the graph (None until captured, or when running eagerly) and the output of one step
    length."""

    def __init__(self, batch: int, tokens: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.hidden = torch.zeros(batch, tokens, hidden_size, dtype=dtype, device=device)
        self.position_ids = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        self.offsets = torch.arange(tokens, device=device).view(-1, 1)  # each new token's slot after the first's
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None


class SpanGraph:
    """One session's static cache over blocks [start, end) and its steps' graphs, captured or (capture=False, for
    CPU tests of the bookkeeping) run eagerly."""

    def __init__(self, owner: "DecodeGraphs", start: int, end: int, blocks: list[nn.Module], session_cache: Cache,
                 batch: int, hidden_size: int, capacity: int):
        self.owner, self.start, self.end, self.blocks = owner, start, end, blocks
        self.batch, self.hidden_size, self.capacity = batch, hidden_size, capacity
        self.cache = Cache(layers=[StaticLayer(max_cache_len=capacity) for _ in range(end)])
        for index in range(start, end):  # only the span's layers get buffers
            own = session_cache.layers[index]
            self.cache.layers[index].lazy_initialization(own.keys, own.values)
        self.slots = torch.arange(capacity, device=owner.device).view(1, -1)
        self.counted = -1  # the tokens the device-side counters say the static cache holds (-1: unknown)
        self.steps: dict[int, StepGraph] = {}  # new tokens -> that step's graph
        self.pool = None  # the memory pool of this session's graphs (made at the first capture)

    def _layers(self):
        return [self.cache.layers[index] for index in range(self.start, self.end)]

    def _body(self, step: StepGraph) -> torch.Tensor:
        counter = self.cache.layers[self.start].cumulative_length  # the first new token's slot (before the update)
        # New token i sees every slot up to its own: the cached tokens, the new ones before it, itself.
        mask = (self.slots <= counter + step.offsets).view(1, 1, step.offsets.shape[0], -1)
        inputs = SpanInputs(hidden=step.hidden, position_ids=step.position_ids, attention_mask=None, cache=self.cache)
        return self.owner.static.run(self.owner.config, self.owner.helpers, self.blocks, self.start, inputs, mask)

    def _set_counters(self, tokens: int) -> None:
        for layer in self._layers():
            layer.cumulative_length.fill_(tokens)
        self.counted = tokens

    def _adopt(self, session_cache: Cache, tokens: int) -> None:
        """Make the static cache hold the session's `tokens` cached tokens."""
        for index, static in zip(range(self.start, self.end), self._layers()):
            own = session_cache.layers[index]
            if own.keys.data_ptr() != static.keys.data_ptr():  # a step taken another way moved it elsewhere
                static.keys[:, :, :tokens].copy_(own.keys)
                static.values[:, :, :tokens].copy_(own.values)
        if self.counted != tokens:
            self._set_counters(tokens)

    def _capture(self, step: StepGraph, tokens: int) -> None:
        began = time.perf_counter()
        device, side = self.owner.device, self.owner.capture_stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy kernel loading, cuBLAS workspaces
            self._body(step)
        torch.cuda.current_stream(device).wait_stream(side)
        self._set_counters(tokens)  # the warm-up advanced them; its writes to the step's slots are rewritten below
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # A stream of this device: torch.cuda.graph's default capture stream is made once per process, on whichever
        # device was current then; kernels of another device's tensors would run there uncaptured (an empty graph).
        with torch.cuda.graph(graph, pool=self.pool, stream=side):  # records; nothing runs until replay
            step.output = self._body(step)
        step.graph = graph
        self.owner.captures += 1
        logger.info("decode graph captured: blocks %d:%d, batch %d, %d new token(s), capacity %d tokens, %.0f ms",
                    self.start, self.end, self.batch, step.hidden.shape[1], self.capacity,
                    1000 * (time.perf_counter() - began))

    def step(self, session_cache: Cache, inputs: SpanInputs, tokens: int) -> torch.Tensor:
        """The new tokens of `inputs` after `tokens` cached ones; returns the span's output (on the device)."""
        if self.owner.device.type != "cuda":
            return self._step(session_cache, inputs, tokens)
        # Replays and copies go to the current device's current stream: this device's, so that they are ordered.
        with torch.cuda.device(self.owner.device):
            return self._step(session_cache, inputs, tokens)

    def _step(self, session_cache: Cache, inputs: SpanInputs, tokens: int) -> torch.Tensor:
        new = inputs.hidden.shape[1]
        step = self.steps.get(new)
        if step is None:
            step = self.steps[new] = StepGraph(self.batch, new, self.hidden_size, self.owner.dtype, self.owner.device)
        self._adopt(session_cache, tokens)
        step.hidden.copy_(inputs.hidden)
        step.position_ids.copy_(inputs.position_ids)
        if self.owner.capture and step.graph is None:
            try:
                self._capture(step, tokens)
            except Exception:  # e.g. a kernel that cannot be captured: steps go on, without graphs
                logger.exception("capturing a decode graph failed; this server's steps run without CUDA graphs")
                self.owner.capture = False
                self._set_counters(tokens)
        if step.graph is not None:
            step.graph.replay()
            output = step.output
        else:
            output = self._body(step)
        self.counted = tokens + new
        for index, static in zip(range(self.start, self.end), self._layers()):
            own = session_cache.layers[index]
            own.keys, own.values = static.keys[:, :, :tokens + new], static.values[:, :, :tokens + new]
        return output


class DecodeGraphs:
    """The graphs of one backend: one SpanGraph per (session cache, span). When a session's cache is gone, its
    SpanGraphs wait for new sessions, graphs and all: a new session adopts one of the same span and batch with
    room for it (the smallest), so that it pays no captures for the step lengths that span already has."""

    def __init__(self, config: PretrainedConfig, static: StaticDecode, helpers: dict[str, nn.Module],
                 device: torch.device, dtype: torch.dtype, capture: bool = True, max_sessions: int = 16):
        self.config, self.static, self.helpers = config, static, helpers
        self.device, self.dtype, self.capture = device, dtype, capture
        # More sessions run the ordinary way, and at most as many ended sessions' SpanGraphs wait: bounds the memory.
        self.max_sessions = max_sessions
        self.capture_stream = torch.cuda.Stream(device) if device.type == "cuda" and capture else None
        self.captures = 0  # graphs captured
        self.steps = 0  # steps run from a static cache
        self.reused = 0  # SpanGraphs that a new session took over from an ended one
        self._spans: weakref.WeakKeyDictionary[Cache, dict[tuple[int, int], SpanGraph]] = weakref.WeakKeyDictionary()
        # Ended sessions' SpanGraphs, oldest first. A cache's finalizer only appends to `_ended` (it may run in any
        # thread, at any allocation); steps move them to `_idle`.
        self._ended: collections.deque[dict[tuple[int, int], SpanGraph]] = collections.deque()
        self._idle: list[SpanGraph] = []

    def eligible(self, start: int, end: int, inputs: SpanInputs) -> bool:
        cache = inputs.cache
        if cache is None or not 1 <= inputs.hidden.shape[1] <= MAX_GRAPH_TOKENS or inputs.attention_mask is not None \
                or not inputs.plain:
            return False
        if not plain_span_layers(cache, start, end):
            return False
        if cache not in self._spans and len(self._spans) >= self.max_sessions:
            return False
        return self.static.supports(self.config, start, end)

    def run(self, start: int, end: int, blocks: list[nn.Module], inputs: SpanInputs) -> torch.Tensor:
        """A step that `eligible` accepted, with inputs already on the device."""
        cache = inputs.cache
        spans = self._spans.get(cache)
        if spans is None:
            spans = self._spans[cache] = {}
            weakref.finalize(cache, self._ended.append, spans)
        tokens = cache.layers[start].keys.shape[-2]
        batch, new, hidden_size = inputs.hidden.shape
        span = spans.get((start, end))
        if span is None or span.batch != batch or tokens + new > span.capacity:
            spans.pop((start, end), None)  # outgrown: the session's layers still view it until this step
            span = self._take_idle(start, end, batch, tokens + new)
            if span is None:
                span = SpanGraph(self, start, end, blocks, cache, batch, hidden_size, capacity_for(tokens + new))
            spans[(start, end)] = span
        self.steps += 1
        return span.step(cache, inputs, tokens)

    def _take_idle(self, start: int, end: int, batch: int, tokens: int) -> SpanGraph | None:
        """An ended session's SpanGraph over blocks [start, end) for `batch` sequences with room for `tokens`."""
        while self._ended:
            self._idle.extend(self._ended.popleft().values())
        del self._idle[:max(0, len(self._idle) - self.max_sessions)]
        fits = [span for span in self._idle
                if (span.start, span.end, span.batch) == (start, end, batch) and span.capacity >= tokens]
        if not fits:
            return None
        span = min(fits, key=lambda candidate: candidate.capacity)
        self._idle.remove(span)
        span.counted = -1  # its counters are the ended session's; the adopting step sets them
        self.reused += 1
        return span
