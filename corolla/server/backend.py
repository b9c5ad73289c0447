"""The blocks a server holds and how one request runs on them (called from the compute thread only:
see scheduler.py, which owns that thread)."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from corolla.models.spec import FamilySpec, SpanInputs


class BlockBackend:
    """Blocks [start, end) of one model on one device."""

    def __init__(self, config: PretrainedConfig, spec: FamilySpec, blocks: list[nn.Module],
                 helpers: dict[str, nn.Module], start: int, device: torch.device, dtype: torch.dtype,
                 prefill_chunk: int = 1024):
        self.config, self.spec, self.blocks, self.helpers = config, spec, blocks, helpers
        self.start, self.end = start, start + len(blocks)
        self.device, self.dtype = device, dtype
        self.prefill_chunk = prefill_chunk  # longer inputs run in chunks through the cache: bounded attention memory
        if device.type == "cuda":
            # cuDNN's attention builds a new execution plan for every new key length, ~2.7 ms per layer on an H100:
            # every decode step has a new length. Flash / memory-efficient attention have no such cost.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def new_cache(self) -> Cache:
        return self.spec.make_cache(self.config)

    def run_sync(self, start_block: int, end_block: int, inputs: SpanInputs) -> torch.Tensor:
        """Run blocks [start_block, end_block) on one request; inputs longer than `prefill_chunk` tokens go through
        in chunks (a stateless forward gets a temporary cache), so no tokens x tokens attention matrix is built."""
        tokens = inputs.hidden.shape[1]
        if tokens <= self.prefill_chunk:
            return self._run_once(start_block, end_block, inputs)
        cache = inputs.cache if inputs.cache is not None else self.new_cache()
        past = cache.get_seq_length(start_block) if inputs.cache is not None else 0
        outputs = []
        for begin in range(0, tokens, self.prefill_chunk):
            end = min(begin + self.prefill_chunk, tokens)
            mask = None if inputs.attention_mask is None else inputs.attention_mask[:, :past + end]
            chunk = SpanInputs(hidden=inputs.hidden[:, begin:end], position_ids=inputs.position_ids[:, begin:end],
                               attention_mask=mask, cache=cache)
            outputs.append(self._run_once(start_block, end_block, chunk))
        return torch.cat(outputs, dim=1)

    def _run_once(self, start_block: int, end_block: int, inputs: SpanInputs) -> torch.Tensor:
        wire_dtype = inputs.hidden.dtype
        on_device = replace(
            inputs,
            hidden=inputs.hidden.to(self.device, self.dtype),
            position_ids=inputs.position_ids.to(self.device),
            attention_mask=None if inputs.attention_mask is None else inputs.attention_mask.to(self.device),
        )
        blocks = self.blocks[start_block - self.start:end_block - self.start]
        with torch.inference_mode():
            output = self.spec.run_span(self.config, self.helpers, blocks, start_block, on_device)
        return output.to("cpu", wire_dtype)
