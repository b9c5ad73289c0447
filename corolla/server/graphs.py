"""Steps of one or many sessions replayed from CUDA graphs, captured per batch-size bucket.

At batch 1 a GPU server is bound by its CPU: every block launches ~35 kernels, and the Python between them costs
more than the GPU's own work (a 16-block span of an 8B model: ~15 ms of launching for ~3 ms of GPU time). A graph
launches a whole span's step at once.

A graph needs fixed shapes and addresses. The engine's KV memory (kv.py) never moves, so a graph is captured over
static index buffers instead of over any session's cache: for a step of `rows` sequences (one session or several,
padded up to a bucket of ROW_BUCKETS) with `new` tokens each (1 for decode, up to MAX_GRAPH_TOKENS to verify a
speculative draft), reading at most `read` tokens per row (a power of two), it holds
- where each row's new tokens are written and which tokens each row reads (flat indices into the arenas),
- each row's cached length, from which the attention mask is computed inside the graph: new token i of a row
  sees the row's cached tokens and the new ones up to itself.
Before a replay the engine's indices for the step are copied into those buffers. Rows that only pad the bucket
write and read the padding page (cache.py), which no session owns. One graph per (blocks, rows bucket, new tokens,
read bucket), captured the first time such a step comes, all in one memory pool (they never run at once).

With capture=False (CPU tests) the same bookkeeping runs eagerly.
"""

from __future__ import annotations

import logging
import time

import torch

from corolla.models.spec import SpanInputs
from corolla.server.kv import KVStore, StepIndex

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # a step's rows are padded up to the next bucket
MIN_READ = 256  # tokens per row a graph reads at least (a multiple of 16, as memory-efficient attention wants)
MAX_GRAPH_TOKENS = 16  # longer steps (prefills) run the ordinary way: their launches are amortized over the tokens
# Bucket rows x read tokens above this run the ordinary way: a graph's memory pool keeps its largest gathered keys
# and values for good (64 rows x 4096 tokens of an 8B model's 8 KV heads of 128: 1 GiB of bf16 keys and values).
MAX_GRAPH_READ = 64 * 4096


def read_bucket(tokens: int) -> int:
    bucket = MIN_READ
    while bucket < tokens:
        bucket *= 2
    return bucket


def rows_bucket(rows: int) -> int | None:
    return next((bucket for bucket in ROW_BUCKETS if bucket >= rows), None)


class StepGraph:
    """The static buffers, the graph (None until captured, or when running eagerly) and the output of one shape."""

    def __init__(self, rows: int, new: int, read: int, hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.hidden = torch.zeros(rows, new, hidden_size, dtype=dtype, device=device)
        self.position_ids = torch.zeros(rows, new, dtype=torch.long, device=device)
        self.write = torch.zeros(rows * new, dtype=torch.long, device=device)
        self.read = torch.zeros(rows, read, dtype=torch.long, device=device)
        self.past = torch.zeros(rows, dtype=torch.long, device=device)
        self.columns = torch.arange(read, device=device).view(1, 1, 1, read)
        self.offsets = torch.arange(new, device=device).view(1, 1, new, 1)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output: torch.Tensor | None = None


class BatchGraphs:
    """The graphs of one engine."""

    def __init__(self, backend, kv: KVStore, capture: bool = True, max_rows: int = ROW_BUCKETS[-1]):
        self.backend, self.kv = backend, kv
        self.static = backend.spec.static_decode
        self.capture = capture and backend.device.type == "cuda"
        self.max_rows = max_rows
        self.capture_stream = torch.cuda.Stream(backend.device) if self.capture else None
        self.pool = None  # the memory pool of every graph (made at the first capture)
        self.graphs: dict[tuple[int, int, int, int, int], StepGraph] = {}
        self.captures = 0  # graphs captured
        self.replays = 0  # steps run from a graph (or, with capture=False, from its buffers)

    def eligible(self, steps) -> bool:
        first = steps[0]
        new = first.tokens
        rows = sum(step.rows for step in steps)
        if not 1 <= new <= MAX_GRAPH_TOKENS or rows > self.max_rows:
            return False
        if rows_bucket(rows) * read_bucket(max(step.start for step in steps) + new) > MAX_GRAPH_READ:
            return False
        if not all(step.inputs.plain and step.inputs.attention_mask is None for step in steps):
            return False
        return self.static.supports(self.backend.config, first.session.start_block, first.session.end_block)

    def run(self, steps, hidden: torch.Tensor, positions: torch.Tensor, slots: list[torch.Tensor]) -> torch.Tensor:
        """The span's output for steps that `eligible` accepted; `hidden` and `positions` are on the device,
        `slots` are the sessions' token indices (EngineSession.slots)."""
        device = self.backend.device
        if device.type != "cuda":
            return self._run(steps, hidden, positions, slots)
        with torch.cuda.device(device):  # copies and replays go to this device's current stream, in order
            return self._run(steps, hidden, positions, slots)

    def _run(self, steps, hidden, positions, slots) -> torch.Tensor:
        rows, new = hidden.shape[:2]
        starts = [step.start for step in steps]
        longest = max(starts) + new
        start, end = steps[0].session.start_block, steps[0].session.end_block
        key = (start, end, rows_bucket(rows), new, read_bucket(longest))
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = StepGraph(key[2], new, key[4], hidden.shape[2], self.backend.dtype, hidden.device)
        self._fill(graph, steps, hidden, positions, slots)
        if self.capture and graph.graph is None:
            try:
                self._capture(graph, start, end)
            except Exception:  # e.g. a kernel that cannot be captured: steps go on, without graphs
                logger.exception("capturing a step graph failed; this server's steps run without CUDA graphs")
                self.capture = False
        self.replays += 1
        if graph.graph is not None:
            graph.graph.replay()
            output = graph.output
        else:
            output = self._body(graph, start, end)
        return output[:rows]

    def _fill(self, graph: StepGraph, steps, hidden, positions, slots) -> None:
        rows, new = hidden.shape[:2]
        padding = self.kv.padding_token
        read = graph.read.shape[1]
        graph.hidden[:rows].copy_(hidden)
        graph.position_ids[:rows].copy_(positions)
        writes = [token_rows[:, step.start:step.start + new].reshape(-1) for step, token_rows in zip(steps, slots)]
        reads = [torch.nn.functional.pad(token_rows[:, :step.start + new], (0, read - step.start - new), value=padding)
                 for step, token_rows in zip(steps, slots)]
        pasts = [torch.full((step.rows,), step.start, dtype=torch.long) for step in steps]
        if graph.hidden.shape[0] > rows:  # rows that pad the bucket: the padding page, nothing cached
            extra = graph.hidden.shape[0] - rows
            graph.hidden[rows:].zero_()
            writes.append(torch.arange(padding, padding + new, device=hidden.device).repeat(extra))
            reads.append(torch.full((extra, read), padding, dtype=torch.long, device=hidden.device))
            pasts.append(torch.zeros(extra, dtype=torch.long))
        graph.write.copy_(torch.cat(writes))
        graph.read.copy_(torch.cat(reads))
        graph.past.copy_(torch.cat(pasts))

    def _body(self, graph: StepGraph, start: int, end: int) -> torch.Tensor:
        # New token i of a row sees the row's cached tokens and the new ones up to itself.
        mask = graph.columns <= graph.past.view(-1, 1, 1, 1) + graph.offsets
        inputs = SpanInputs(hidden=graph.hidden, position_ids=graph.position_ids, attention_mask=None,
                            cache=self.kv.cache)
        blocks = self.backend.blocks[start - self.backend.start:end - self.backend.start]
        self.kv.step = StepIndex(write=graph.write, read=graph.read, past=graph.read.shape[1] - graph.hidden.shape[1])
        try:
            with torch.inference_mode():
                return self.static.run(self.backend.config, self.backend.helpers, blocks, start, inputs, mask)
        finally:
            self.kv.step = None

    def _capture(self, graph: StepGraph, start: int, end: int) -> None:
        began = time.perf_counter()
        device, side = self.backend.device, self.capture_stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy kernel loading, cuBLAS workspaces
            self._body(graph, start, end)  # writes the step's own keys and values, as the replay will again
        torch.cuda.current_stream(device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        captured = torch.cuda.CUDAGraph()
        # A stream of this device: torch.cuda.graph's default capture stream is made once per process, on whichever
        # device was current then; kernels of another device's tensors would run there uncaptured (an empty graph).
        with torch.cuda.graph(captured, pool=self.pool, stream=side):  # records; nothing runs until replay
            graph.output = self._body(graph, start, end)
        graph.graph = captured
        self.captures += 1
        rows, new = graph.hidden.shape[:2]
        logger.info("step graph captured: blocks %d:%d, %d row(s), %d new token(s), reading %d tokens, %.0f ms",
                    start, end, rows, new, graph.read.shape[1], 1000 * (time.perf_counter() - began))
