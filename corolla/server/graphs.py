"""Single-token decode steps replayed from CUDA graphs.

At batch 1 a GPU server is bound by its CPU: every block launches ~35 kernels, and the Python between them costs
more than the GPU's own work (a 16-block span of an 8B model: ~15 ms of launching for ~3 ms of GPU time). A graph
launches a whole span's step at once.

A graph needs fixed shapes and addresses, so a session that decodes gets a static cache (transformers'
StaticLayer, which writes each new token at a counter kept on the device) with room for `capacity` tokens, and a
graph of its step over it; the attention mask, "every slot up to the new token", is computed inside the graph from
that counter. The session's own DynamicCache stays the authority: after each step its layers are views of the
static buffers, so rollbacks, batched steps and multi-token steps work on it as before. When one of those has left
it elsewhere, its contents are copied back before the next step. A session outgrowing its capacity gets a new
static cache of twice the capacity, and a new graph.
"""

from __future__ import annotations

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


def capacity_for(tokens: int) -> int:
    capacity = MIN_CAPACITY
    while capacity < tokens:
        capacity *= 2
    return capacity


class SpanGraph:
    """One session's static cache over blocks [start, end) and its decode step, captured or (capture=False, for
    CPU tests of the bookkeeping) run eagerly."""

    def __init__(self, owner: "DecodeGraphs", start: int, end: int, blocks: list[nn.Module], session_cache: Cache,
                 batch: int, hidden_size: int, capacity: int):
        self.owner, self.start, self.end, self.blocks = owner, start, end, blocks
        self.batch, self.capacity = batch, capacity
        device, dtype = owner.device, owner.dtype
        self.cache = Cache(layers=[StaticLayer(max_cache_len=capacity) for _ in range(end)])
        for index in range(start, end):  # only the span's layers get buffers
            own = session_cache.layers[index]
            self.cache.layers[index].lazy_initialization(own.keys, own.values)
        self.hidden = torch.zeros(batch, 1, hidden_size, dtype=dtype, device=device)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.slots = torch.arange(capacity, device=device)
        self.counted = -1  # the tokens the device-side counters say the static cache holds (-1: unknown)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None

    def _layers(self):
        return [self.cache.layers[index] for index in range(self.start, self.end)]

    def _body(self) -> torch.Tensor:
        counter = self.cache.layers[self.start].cumulative_length  # the new token's slot (before the update)
        mask = (self.slots <= counter).view(1, 1, 1, -1)
        inputs = SpanInputs(hidden=self.hidden, position_ids=self.position_ids, attention_mask=None, cache=self.cache)
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

    def _capture(self, tokens: int) -> None:
        began = time.perf_counter()
        device, side = self.owner.device, self.owner.capture_stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy kernel loading, cuBLAS workspaces
            self._body()
        torch.cuda.current_stream(device).wait_stream(side)
        self._set_counters(tokens)  # the warm-up advanced them; its write to the step's slot is rewritten below
        graph = torch.cuda.CUDAGraph()
        # A stream of this device: torch.cuda.graph's default capture stream is made once per process, on whichever
        # device was current then; kernels of another device's tensors would run there uncaptured (an empty graph).
        with torch.cuda.graph(graph, stream=side):  # records; nothing runs until replay
            self.output = self._body()
        self.graph = graph
        self.owner.captures += 1
        logger.info("decode graph captured: blocks %d:%d, batch %d, capacity %d tokens, %.0f ms", self.start,
                    self.end, self.batch, self.capacity, 1000 * (time.perf_counter() - began))

    def step(self, session_cache: Cache, inputs: SpanInputs, tokens: int) -> torch.Tensor:
        """One new token per sequence after `tokens` cached ones; returns the span's output (on the device)."""
        if self.owner.device.type != "cuda":
            return self._step(session_cache, inputs, tokens)
        # Replays and copies go to the current device's current stream: this device's, so that they are ordered.
        with torch.cuda.device(self.owner.device):
            return self._step(session_cache, inputs, tokens)

    def _step(self, session_cache: Cache, inputs: SpanInputs, tokens: int) -> torch.Tensor:
        self._adopt(session_cache, tokens)
        self.hidden.copy_(inputs.hidden)
        self.position_ids.copy_(inputs.position_ids)
        if self.owner.capture and self.graph is None:
            try:
                self._capture(tokens)
            except Exception:  # e.g. a kernel that cannot be captured: steps go on, without graphs
                logger.exception("capturing a decode graph failed; this server's steps run without CUDA graphs")
                self.owner.capture = False
                self._set_counters(tokens)
        if self.graph is not None:
            self.graph.replay()
            output = self.output
        else:
            output = self._body()
        self.counted = tokens + 1
        for index, static in zip(range(self.start, self.end), self._layers()):
            own = session_cache.layers[index]
            own.keys, own.values = static.keys[:, :, :tokens + 1], static.values[:, :, :tokens + 1]
        return output


class DecodeGraphs:
    """The decode graphs of one backend: one SpanGraph per (session cache, span), forgotten with the cache."""

    def __init__(self, config: PretrainedConfig, static: StaticDecode, helpers: dict[str, nn.Module],
                 device: torch.device, dtype: torch.dtype, capture: bool = True, max_sessions: int = 16):
        self.config, self.static, self.helpers = config, static, helpers
        self.device, self.dtype, self.capture = device, dtype, capture
        self.max_sessions = max_sessions  # more sessions run the ordinary way: bounds the extra memory
        self.capture_stream = torch.cuda.Stream(device) if device.type == "cuda" and capture else None
        self.captures = 0  # graphs captured
        self.steps = 0  # steps run from a static cache
        self._spans: weakref.WeakKeyDictionary[Cache, dict[tuple[int, int], SpanGraph]] = weakref.WeakKeyDictionary()

    def eligible(self, start: int, end: int, inputs: SpanInputs) -> bool:
        cache = inputs.cache
        if cache is None or inputs.hidden.shape[1] != 1 or inputs.attention_mask is not None or not inputs.plain:
            return False
        if not plain_span_layers(cache, start, end):
            return False
        if cache not in self._spans and len(self._spans) >= self.max_sessions:
            return False
        return self.static.supports(self.config, start, end)

    def run(self, start: int, end: int, blocks: list[nn.Module], inputs: SpanInputs) -> torch.Tensor:
        """A step that `eligible` accepted, with inputs already on the device."""
        cache = inputs.cache
        spans = self._spans.setdefault(cache, {})
        tokens = cache.layers[start].keys.shape[-2]
        batch, hidden_size = inputs.hidden.shape[0], inputs.hidden.shape[-1]
        span = spans.get((start, end))
        if span is None or span.batch != batch or tokens + 1 > span.capacity:
            capacity = capacity_for(tokens + 1)
            spans.pop((start, end), None)
            span = spans[(start, end)] = SpanGraph(self, start, end, blocks, cache, batch, hidden_size, capacity)
        self.steps += 1
        return span.step(cache, inputs, tokens)
