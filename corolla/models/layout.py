"""How CPU linear weights are stored and multiplied for one-token steps, chosen by measuring them.

A one-token step multiplies each weight [out, in] by one vector: a matrix-vector product, bound by how fast the
weight is read from memory. How fast depends on the kernel and the memory layout, and which wins depends on the
shape and the CPU. Three ways are measured, with the same values:
* `row`: row-major (as loaded), through `F.linear` (MKL in PyTorch's x86 builds);
* `column`: column-major (`w.T.contiguous().T`, transposed strides), through `F.linear`;
* `rowdot`: row-major, one dot product per output row (`numpy.vecdot`, float32 only). On the development machine
  (AMD EPYC, Zen 4) it reads tiny-llama's weights at ~20 GB/s, as fast as a plain sum, where MKL's one-token
  products read at 9-17 GB/s.
Each shape's way is measured at start-up, on the weights that will be used, in the order a step reads them
(docs/benchmarks.md, "Hot-path cuts"). A `rowdot` weight is then measured with a few rows at a time too (FEW_ROWS:
a speculative decoding step verifies several drafted tokens): block by block of weight rows, each block's dot
products with every input row while the block is in cache. Up to the largest row count that wins, several rows go
that way; more rows, autograd, and other dtypes or devices go through `F.linear`.

transformers' modules are unchanged, except that a plain `nn.Linear` whose weight takes `rowdot` is replaced by a
`RowDotLinear` over the same Parameters (as quantization replaces them).
"""

from __future__ import annotations

import contextlib
import functools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from corolla.errors import CorollaError

KERNELS = ("row", "column", "rowdot")
LAYOUTS = ("auto", *KERNELS)  # auto: measure each shape, keep the fastest
_MARGIN = 0.05  # another way is kept only when at least this much faster than `row`: noise must not flip a choice
_ROWDOT_DTYPES = (torch.float32,)  # numpy has no bfloat16, and its float16 dot products are slow
FEW_ROWS = (2, 4, 8, 16)  # row counts measured for a rowdot weight, in order, while its dot products keep winning
_BLOCK_BYTES = 2**19  # weight rows read from memory once per block, then reused from cache for every input row


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise CorollaError(f"weight layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def column_major(tensor: torch.Tensor) -> torch.Tensor:
    """The same values with transposed strides (stride 1 along dim 0)."""
    return tensor.T.contiguous().T


def layout_of(tensor: torch.Tensor) -> str:
    return "column" if tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.shape[1] > 1 else "row"


def set_layout(weight: nn.Parameter, layout: str) -> None:
    """Store `weight` column-major for `column`, row-major otherwise, in place: the Parameter object stays, so
    modules sharing it (a tied LM head and embedding) keep sharing it."""
    wanted = "column" if layout == "column" else "row"
    if layout_of(weight) != wanted:
        weight.data = column_major(weight.data) if wanted == "column" else weight.data.contiguous()


class RowDotLinear(nn.Linear):
    """An nn.Linear whose products with up to `max_rows` input rows are one dot product per output and input row
    (`numpy.vecdot` over the weight's memory, no copy). Anything else (more rows, autograd, other dtypes or devices)
    goes through `F.linear`. The results equal `F.linear`'s up to float rounding order; each input row's outputs
    equal, bit for bit, what that row alone gives (a verified draft token gets the logits of a one-token step)."""

    max_rows: int = 1  # set from the measurement (choose_layouts)

    @classmethod
    def over(cls, linear: nn.Linear) -> RowDotLinear:
        """A RowDotLinear holding `linear`'s own Parameters (a tied weight stays tied)."""
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        return module.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return row_dot(x, self.weight, self.bias, self.max_rows)


def row_dot(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            max_rows: int = 1) -> torch.Tensor:
    """`F.linear(x, weight, bias)`; for 1 to `max_rows` input rows (float32, CPU, row-major weight, no autograd)
    computed with `numpy.vecdot` over the weight's memory. (Ordered so that the common case costs a few
    microseconds: it runs ~30 times per token and server.)"""
    if (x.dtype in _ROWDOT_DTYPES and weight.dtype == x.dtype and x.is_cpu and weight.is_cpu
            and 0 < x.numel() <= max_rows * weight.shape[1] and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))):
        out = torch.from_numpy(_vecdot_rows(weight.detach().numpy(), x.detach().reshape(-1, weight.shape[1]).numpy()))
        if bias is not None:
            out += bias.detach()
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _vecdot_rows(weight: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[rows, out]: every row's dot product with every weight row. Several rows go block by block of weight rows,
    so that a block is read from memory once, not once per row."""
    if rows.shape[0] == 1:
        return np.vecdot(weight, rows[0])[None]
    out = np.empty((rows.shape[0], weight.shape[0]), dtype=weight.dtype)
    block = max(1, _BLOCK_BYTES // (weight.shape[1] * weight.itemsize))
    for begin in range(0, weight.shape[0], block):
        np.vecdot(weight[None, begin:begin + block], rows[:, None], out=out[:, begin:begin + block])
    return out


def linear_weights(modules: list[nn.Module]) -> list[nn.Parameter]:
    """The weights of the CPU nn.Linear layers inside `modules`, in module order (a decoder layer registers its
    projections in the order its forward runs them), each once."""
    seen, weights = set(), []
    for module in modules:
        for sub in module.modules():
            weight = getattr(sub, "weight", None)
            if (isinstance(sub, nn.Linear) and isinstance(weight, nn.Parameter) and weight.dim() == 2
                    and weight.device.type == "cpu" and weight.is_floating_point() and id(weight) not in seen):
                seen.add(id(weight))
                weights.append(weight)
    return weights


@dataclass(frozen=True)
class ShapeTiming:
    """One-token product time of all measured weights of one shape and dtype, per way (KERNELS)."""

    shape: tuple[int, int]  # [out_features, in_features]
    dtype: torch.dtype
    count: int  # weights of this shape in the measured passes
    seconds: dict[str, float]  # way -> fastest pass's summed time of those weights' products (load only adds)
    rowdot_rows: int = 1  # for `rowdot`: the most input rows that still go through dot products (FEW_ROWS)

    @property
    def best(self) -> str:
        return self.best_among(KERNELS)

    def best_among(self, ways: tuple[str, ...]) -> str:
        measured = {way: s for way, s in self.seconds.items() if way in ways}
        fastest = min(measured, key=measured.get)
        return fastest if measured[fastest] < self.seconds["row"] * (1 - _MARGIN) else "row"

    def describe(self) -> str:
        nbytes = self.count * self.shape[0] * self.shape[1] * self.dtype.itemsize
        rates = ", ".join(f"{way} {nbytes / s / 1e9:.1f} GB/s" for way, s in self.seconds.items())
        rows = f" (up to {self.rowdot_rows} rows)" if self.best == "rowdot" else ""
        return f"[{self.shape[0]}, {self.shape[1]}] x{self.count}: {rates} -> {self.best}{rows}"

    def wins(self, way: str) -> bool:
        return self.best_among(("row", way)) == way


def _product(way: str, weight: torch.Tensor, x: torch.Tensor) -> None:
    if way == "rowdot":
        _vecdot_rows(weight.numpy(), x.numpy())
    else:
        F.linear(x, weight)


def _split_product(pool: ThreadPoolExecutor, way: str, weight: torch.Tensor, x: torch.Tensor) -> None:
    """The product as two halves of the outputs, one on `pool`'s thread (as the client's LM head runs)."""
    half = weight.shape[0] // 2
    second = pool.submit(_product, way, weight[half:], x)
    _product(way, weight[:half], x)
    second.result()


def measure_layouts(weights: list[torch.Tensor], rounds: int = 9, budget_s: float = 3.0,
                    embedding_index: int | None = None, split: bool = False, rows: int = 1,
                    ways: tuple[str, ...] = KERNELS) -> list[ShapeTiming]:
    """Time a product with each weight (`rows` input rows: one token by default), in order, once per way per round
    (the ways' passes alternate, their order rotates), after one warm-up round; at least 3 rounds, more up to
    `rounds` within `budget_s`. Each way keeps its fastest pass: load from other processes only ever adds time.
    `rowdot` is measured for float32 weights only.

    A column-major copy of every weight is held during the measurement when `column` is among `ways`.
    `embedding_index`: the weight that is also an embedding table (a tied LM head); each pass then includes a
    one-token lookup in it, which is slower column-major. `split`: time each product as two halves on two
    threads, the way the client runs its LM head (halves of a row-major weight are contiguous, halves of a
    column-major one are not)."""
    copies = {"row": [w.detach().contiguous() for w in weights]}
    if "column" in ways:
        copies["column"] = [column_major(w.detach()) for w in weights]
    copies["rowdot"] = copies["row"]
    keys = [(tuple(w.shape), w.dtype) for w in weights]
    inputs = {(w.shape[1], w.dtype): torch.randn(rows, w.shape[1]).to(w.dtype) for w in weights}
    token = torch.zeros(1, dtype=torch.long)
    passes: dict[str, list[dict]] = {way: [] for way in ways}
    pool = ThreadPoolExecutor(1) if split else None
    product = functools.partial(_split_product, pool) if split else _product
    began = time.perf_counter()
    with torch.inference_mode(), pool or contextlib.nullcontext():
        for round_index in range(rounds + 1):
            shift = round_index % len(ways)
            for way in ways[shift:] + ways[:shift]:
                totals: dict = {}
                for i, (weight, key) in enumerate(zip(copies[way], keys)):
                    if way == "rowdot" and key[1] not in _ROWDOT_DTYPES:
                        continue
                    x = inputs[(key[0][1], key[1])]
                    start = time.perf_counter()
                    product(way, weight, x)
                    if i == embedding_index:
                        F.embedding(token, weight)
                    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
                if round_index > 0:  # round 0 warms up
                    passes[way].append(totals)
            if round_index >= 3 and time.perf_counter() - began > budget_s:
                break
    del copies
    counts: dict = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [ShapeTiming(shape=key[0], dtype=key[1], count=count,
                        seconds={way: min(p[key] for p in passes[way]) for way in ways if key in passes[way][0]})
            for key, count in counts.items()]


def choose_layouts(roots: list[nn.Module], layout: str, sample_bytes: int = 128 * 2**20,
                   embedding: torch.Tensor | None = None,
                   split: bool = False) -> tuple[list[nn.Module], list[ShapeTiming]]:
    """Give every CPU linear weight inside `roots` the way `layout` names; with "auto", the way measured fastest
    for its shape and dtype, and for `rowdot` the most input rows measured faster that way (FEW_ROWS; one with an
    explicit `rowdot`). Returns `roots` (a root that is itself an nn.Linear taking `rowdot` is replaced by its
    RowDotLinear; inner modules are replaced in place) and the measurements (none unless "auto").

    The measurement uses the first weights, in order, up to `sample_bytes` (all of them when they are fewer): more
    than a CPU's last-level cache, so a pass reads them from memory as a step of a large span does, and the
    time and the extra memory (a column-major copy of the sample) stay bounded. `split`: see measure_layouts."""
    check_layout(layout)
    weights = linear_weights(roots)
    timings: list[ShapeTiming] = []
    if layout == "auto":
        sample, total = [], 0
        for weight in weights:
            if total >= sample_bytes:
                break
            sample.append(weight)
            total += weight.numel() * weight.element_size()
        if not sample:  # e.g. quantized layers: no float weights to lay out
            return roots, []
        tied = next((i for i, weight in enumerate(sample) if weight is embedding), None)
        data = [weight.data for weight in sample]
        timings = _measure_rowdot_rows(measure_layouts(data, embedding_index=tied, split=split), data, split)
        by_key = {(t.shape, t.dtype): t for t in timings}
        # Only a plain nn.Linear can become a RowDotLinear; others (e.g. Falcon's subclass) keep their forward.
        plain = {id(m.weight) for root in roots for m in root.modules() if type(m) in (nn.Linear, RowDotLinear)}
        ways = {}
        for w in weights:
            timing = by_key.get((tuple(w.shape), w.dtype))
            if timing is None:  # shapes past the sample (rare: spans mix shapes early) stay as loaded
                ways[id(w)] = layout_of(w)
            else:
                ways[id(w)] = timing.best if id(w) in plain else timing.best_among(("row", "column"))
        rows = {id(w): by_key[(tuple(w.shape), w.dtype)].rowdot_rows for w in weights if ways[id(w)] == "rowdot"}
    else:
        ways = {id(w): layout for w in weights}
        rows = {id(w): 1 for w in weights} if layout == "rowdot" else {}
    for weight in weights:
        set_layout(weight, ways[id(weight)])
    return [_with_row_dot(root, rows) for root in roots], timings


def _measure_rowdot_rows(timings: list[ShapeTiming], sample: list[torch.Tensor], split: bool) -> list[ShapeTiming]:
    """`timings` with `rowdot_rows` measured for the shapes that take `rowdot`: the row counts of FEW_ROWS in
    order, each `rowdot` against `row` on the sample's weights of those shapes, while `rowdot` wins."""
    rows = {(t.shape, t.dtype): 1 for t in timings if t.best == "rowdot"}
    winning = set(rows)
    for count in FEW_ROWS:
        weights = [w for w in sample if (tuple(w.shape), w.dtype) in winning]
        if not weights:
            break
        measured = measure_layouts(weights, rounds=3, budget_s=0.5, split=split, rows=count, ways=("row", "rowdot"))
        winning = {(t.shape, t.dtype) for t in measured if t.wins("rowdot")}
        rows.update({key: count for key in winning})
    return [replace(t, rowdot_rows=rows.get((t.shape, t.dtype), 1)) for t in timings]


def _with_row_dot(root: nn.Module, rows: dict[int, int]) -> nn.Module:
    """`root` with every plain nn.Linear whose weight is in `rows` replaced by a RowDotLinear over the same
    Parameters, taking up to that many input rows (subclasses of nn.Linear, e.g. Falcon's, keep their forward)."""
    def row_dot_over(linear: nn.Linear) -> RowDotLinear:
        module = RowDotLinear.over(linear)
        module.max_rows = rows[id(linear.weight)]
        return module

    if type(root) is nn.Linear:
        return row_dot_over(root) if id(root.weight) in rows else root
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and id(child.weight) in rows:
                setattr(parent, name, row_dot_over(child))
    return root
