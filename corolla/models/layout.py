"""Memory layout of linear weights on CPU, chosen by measuring one-token steps.

A weight [out, in] can be stored row-major (as loaded) or column-major: the same values with transposed strides
(`w.T.contiguous().T`). transformers' modules use either unchanged (`F.linear` takes any strides), but the BLAS
kernel behind them differs: for one token a step (a matrix-vector product, bound by memory reads) MKL's float32
kernels on the development machine (AMD EPYC, Zen 4) read the 32000 x 512 LM head at 2.5 ms column-major against
6.3 ms row-major, a [1376, 512] weight at 14-17 GB/s against 9-10, but a [512, 1376] one at 9-11 against 14.
No rule by shape holds across CPUs and BLAS builds, so each shape's layout is measured at start-up, on the weights
that will be used, in the order a step reads them (docs/benchmarks.md, "Hot-path cuts").
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from corolla.errors import CorollaError

LAYOUTS = ("auto", "row", "column")  # auto: measure each shape, keep the faster
_MARGIN = 0.05  # column-major is kept only when at least this much faster: noise must not flip a layout


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise CorollaError(f"weight layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")


def column_major(tensor: torch.Tensor) -> torch.Tensor:
    """The same values with transposed strides (stride 1 along dim 0)."""
    return tensor.T.contiguous().T


def layout_of(tensor: torch.Tensor) -> str:
    return "column" if tensor.dim() == 2 and tensor.stride(0) == 1 and tensor.shape[1] > 1 else "row"


def set_layout(weight: nn.Parameter, layout: str) -> None:
    """Store `weight` in `layout`, in place: the Parameter object stays, so modules sharing it (a tied LM head and
    embedding) keep sharing it."""
    if layout_of(weight) != layout:
        weight.data = column_major(weight.data) if layout == "column" else weight.data.contiguous()


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
    """One-token (M=1) `F.linear` time of all measured weights of one shape and dtype, per layout."""

    shape: tuple[int, int]  # [out_features, in_features]
    dtype: torch.dtype
    count: int  # weights of this shape in the measured passes
    row_s: float  # fastest pass's summed time of those weights' products, row-major (other load only adds)
    column_s: float  # the same, column-major

    @property
    def best(self) -> str:
        return "column" if self.column_s < self.row_s * (1 - _MARGIN) else "row"

    def describe(self) -> str:
        nbytes = self.count * self.shape[0] * self.shape[1] * self.dtype.itemsize
        return (f"[{self.shape[0]}, {self.shape[1]}] x{self.count}: row {nbytes / self.row_s / 1e9:.1f} GB/s, "
                f"column {nbytes / self.column_s / 1e9:.1f} GB/s -> {self.best}")


def measure_layouts(weights: list[torch.Tensor], rounds: int = 9, budget_s: float = 3.0,
                    embedding_index: int | None = None) -> list[ShapeTiming]:
    """Time a one-token product with each weight, in order, once per layout per round (the layouts' passes
    alternate, their order too), after one warm-up round; at least 3 rounds, more up to `rounds` within `budget_s`.
    Each layout keeps its fastest pass: load from other processes only ever adds time.

    A column-major copy of every weight is held during the measurement. `embedding_index`: the weight that is also an
    embedding table (a tied LM head); each pass then includes a one-token lookup in it, which is slower
    column-major."""
    copies = {"row": [w.contiguous() for w in weights], "column": [column_major(w) for w in weights]}
    keys = [(tuple(w.shape), w.dtype) for w in weights]
    inputs = {(w.shape[1], w.dtype): torch.randn(1, w.shape[1]).to(w.dtype) for w in weights}
    token = torch.zeros(1, dtype=torch.long)
    passes: dict[str, list[dict]] = {"row": [], "column": []}
    began = time.perf_counter()
    with torch.inference_mode():
        for round_index in range(rounds + 1):
            order = ("row", "column") if round_index % 2 == 0 else ("column", "row")
            for layout in order:
                totals: dict = {}
                for i, (weight, key) in enumerate(zip(copies[layout], keys)):
                    x = inputs[(key[0][1], key[1])]
                    start = time.perf_counter()
                    F.linear(x, weight)
                    if i == embedding_index:
                        F.embedding(token, weight)
                    totals[key] = totals.get(key, 0.0) + time.perf_counter() - start
                if round_index > 0:  # round 0 warms up
                    passes[layout].append(totals)
            if round_index >= 3 and time.perf_counter() - began > budget_s:
                break
    del copies
    counts: dict = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [ShapeTiming(shape=key[0], dtype=key[1], count=count,
                        row_s=min(p[key] for p in passes["row"]),
                        column_s=min(p[key] for p in passes["column"]))
            for key, count in counts.items()]


def choose_layouts(weights: list[nn.Parameter], layout: str, sample_bytes: int = 128 * 2**20,
                   embedding: torch.Tensor | None = None) -> list[ShapeTiming]:
    """Put every weight in `layout`; with "auto", in the layout measured faster for its shape and dtype.

    The measurement uses the first weights, in order, up to `sample_bytes` (all of them when they are fewer): more
    than a CPU's last-level cache, so a pass reads them from memory as a step of a large span does, and the
    time and the extra memory (a column-major copy of the sample) stay bounded. Returns the measurements (none
    unless "auto")."""
    check_layout(layout)
    if layout != "auto":
        for weight in weights:
            set_layout(weight, layout)
        return []
    sample, total = [], 0
    for weight in weights:
        if total >= sample_bytes:
            break
        sample.append(weight)
        total += weight.numel() * weight.element_size()
    if not sample:  # e.g. quantized layers: no float weights to lay out
        return []
    tied = next((i for i, weight in enumerate(sample) if weight is embedding), None)
    timings = measure_layouts([weight.data for weight in sample], embedding_index=tied)
    best = {(t.shape, t.dtype): t.best for t in timings}
    for weight in weights:
        # Shapes past the sample (rare: spans mix shapes early) stay as loaded.
        set_layout(weight, best.get((tuple(weight.shape), weight.dtype), layout_of(weight)))
    return timings
