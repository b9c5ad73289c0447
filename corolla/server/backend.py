"""The blocks a server holds and how one request runs on them: the engine's worker (called from the engine's compute
thread only, server/engine.py). It holds no session state: a step's cache comes with its inputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from corolla.models.edits import edits_applied
from corolla.models.lora import lora_applied
from corolla.models.prompts import prompts_applied
from corolla.models.spec import FamilySpec, SpanInputs


@dataclass
class Gradients:
    """What a backward pass returns: gradients of the loss with respect to what the client sent."""

    hidden: torch.Tensor  # [batch, tokens, hidden_size], same dtype as the hidden states sent
    prompts: torch.Tensor | None  # like SpanInputs.prompts, when prompts were sent
    lora: list[tuple[torch.Tensor, torch.Tensor]]  # (grad A, grad B) per delta, in the order of `lora_order`


@dataclass
class SpanOutput:
    """A stateless forward's result when each block's output was asked for (inputs.record_layers)."""

    hidden: torch.Tensor  # [batch, tokens, hidden_size] output of the last block, like run_sync's plain result
    layers: torch.Tensor | None  # [blocks - 1, batch, tokens, hidden_size] outputs of the other blocks; None for one


def lora_order(inputs: SpanInputs) -> list[tuple[int, str]]:
    """(block, module path) of every delta of a request, in the order gradients are returned."""
    return [(block, path) for block in sorted(inputs.lora or {}) for path in inputs.lora[block]]


class BlockBackend:
    """Blocks [start, end) of one model on one device."""

    def __init__(self, config: PretrainedConfig, spec: FamilySpec, blocks: list[nn.Module],
                 helpers: dict[str, nn.Module], start: int, device: torch.device, dtype: torch.dtype,
                 prefill_chunk: int = 1024, cuda_graphs: bool = True):
        self.config, self.spec, self.blocks, self.helpers = config, spec, blocks, helpers
        self.start, self.end = start, start + len(blocks)
        self.device, self.dtype = device, dtype
        self.prefill_chunk = prefill_chunk  # longer inputs run in chunks through the cache: bounded attention memory
        if device.type == "cuda":
            # cuDNN's attention builds a new execution plan for every new key length, ~2.7 ms per layer on an H100:
            # every decode step has a new length. Flash / memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)
        # Decode steps may be replayed from CUDA graphs (server/graphs.py) where the family allows it.
        self.cuda_graphs = cuda_graphs and device.type == "cuda" and spec.static_decode is not None

    def new_cache(self) -> Cache:
        return self.spec.make_cache(self.config)

    def run_sync(self, start_block: int, end_block: int, inputs: SpanInputs) -> torch.Tensor | SpanOutput:
        """A stateless forward of blocks [start_block, end_block); inputs longer than `prefill_chunk` tokens go
        through in chunks over a temporary cache, so no tokens x tokens attention matrix is built. With
        inputs.record_layers, a SpanOutput with every block's output."""
        if inputs.cache is not None:
            raise ValueError("run_sync is for stateless forwards; session steps go through the engine")
        if inputs.record_layers:
            return self._run_recorded(start_block, end_block, inputs)
        return self._run_chunked(start_block, end_block, inputs)

    def _run_recorded(self, start_block: int, end_block: int, inputs: SpanInputs) -> SpanOutput:
        recorded: list[list[torch.Tensor]] = [[] for _ in range(end_block - start_block)]  # per block, per chunk
        hidden = self._run_chunked(start_block, end_block, inputs, recorded)
        layers = [torch.cat(chunks, dim=1).to("cpu", inputs.hidden.dtype) for chunks in recorded[:-1]]
        return SpanOutput(hidden, torch.stack(layers) if layers else None)

    def _run_chunked(self, start_block: int, end_block: int, inputs: SpanInputs,
                     recorded: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        tokens = inputs.hidden.shape[1]
        if tokens <= self.prefill_chunk:
            return self._run_once(start_block, end_block, inputs, recorded)
        cache = self.new_cache()
        outputs = []
        for begin in range(0, tokens, self.prefill_chunk):
            end = min(begin + self.prefill_chunk, tokens)
            mask = None if inputs.attention_mask is None else inputs.attention_mask[:, :end]
            chunk = replace(inputs, hidden=inputs.hidden[:, begin:end], position_ids=inputs.position_ids[:, begin:end],
                            attention_mask=mask, cache=cache, first_position=inputs.first_position + begin)
            outputs.append(self._run_once(start_block, end_block, chunk, recorded))
        return torch.cat(outputs, dim=1)

    def on_device(self, inputs: SpanInputs) -> SpanInputs:
        return replace(
            inputs,
            hidden=inputs.hidden.to(self.device, self.dtype),
            position_ids=inputs.position_ids.to(self.device),
            attention_mask=None if inputs.attention_mask is None else inputs.attention_mask.to(self.device),
            prompts=None if inputs.prompts is None else inputs.prompts.to(self.device, self.dtype),
        )

    @contextlib.contextmanager
    def _extras(self, start_block: int, end_block: int, inputs: SpanInputs,
                recorded: list[list[torch.Tensor]] | None = None):
        """The request's LoRA deltas, deep prompts and hidden-state edits (and the recording of each block's
        output), hooked onto the blocks for this run only."""
        blocks = self.blocks[start_block - self.start:end_block - self.start]
        deltas = [(inputs.lora or {}).get(block) for block in range(start_block, end_block)]
        with (lora_applied(blocks, deltas), prompts_applied(blocks, inputs.prompts, inputs.first_position),
              edits_applied(blocks, start_block, inputs.edits, inputs.first_position, recorded)):
            yield blocks

    def _run_once(self, start_block: int, end_block: int, inputs: SpanInputs,
                  recorded: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        return self.compute(start_block, end_block, self.on_device(inputs), recorded).to("cpu", inputs.hidden.dtype)

    def compute(self, start_block: int, end_block: int, inputs: SpanInputs,
                recorded: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Blocks [start_block, end_block) on inputs already on the device, the ordinary way (the request's LoRA,
        deep prompts and edits hooked on for this run only); returns the output on the device."""
        with torch.inference_mode(), self._extras(start_block, end_block, inputs, recorded) as blocks:
            return self.spec.run_span(self.config, self.helpers, blocks, start_block, inputs)

    def backward_sync(self, start_block: int, end_block: int, inputs: SpanInputs,
                      grad_output: torch.Tensor) -> Gradients:
        """Gradients of sum(output * grad_output) with respect to the inputs, the prompts and the LoRA weights
        sent: the forward is recomputed (nothing is kept between requests) and the blocks' own weights get no
        gradient (they are frozen)."""
        wire_dtype = inputs.hidden.dtype
        order = lora_order(inputs)
        # Leaves on the device, in the compute dtype: the gradients are taken with respect to these.
        hidden = inputs.hidden.to(self.device, self.dtype).requires_grad_(True)
        prompts = None if inputs.prompts is None else inputs.prompts.to(self.device, self.dtype).requires_grad_(True)
        lora = {block: {path: replace(delta, a=delta.a.to(self.device).requires_grad_(True),
                                      b=delta.b.to(self.device).requires_grad_(True))
                        for path, delta in deltas.items()} for block, deltas in (inputs.lora or {}).items()}
        # _on_device leaves tensors already on the device in the compute dtype as they are (the leaves above).
        on_device = self.on_device(replace(inputs, hidden=hidden, prompts=prompts, lora=lora or None))
        with torch.enable_grad(), self._extras(start_block, end_block, on_device) as blocks:
            output = self.spec.run_span(self.config, self.helpers, blocks, start_block, on_device)
            leaves = [hidden] + ([prompts] if prompts is not None else [])
            leaves += [t for block, path in order for t in (lora[block][path].a, lora[block][path].b)]
            grads = torch.autograd.grad(output, leaves, grad_output.to(self.device, output.dtype), allow_unused=True)
        grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
        grad_prompts = grads[1].to("cpu", inputs.prompts.dtype) if prompts is not None else None
        rest = grads[1 + (prompts is not None):]
        return Gradients(hidden=grads[0].to("cpu", wire_dtype), prompts=grad_prompts,
                         lora=[(rest[2 * i].cpu(), rest[2 * i + 1].cpu()) for i in range(len(order))])
