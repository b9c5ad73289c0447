"""Llama-style decoder families: rotary positions, RMSNorm, (grouped-query) attention, no per-layer quirks.

Covers Llama 2/3.x, SmolLM/SmolLM2, TinyLlama (model_type "llama").
"""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from corolla.models.rotary import rotary_helpers, rotary_span_runner
from corolla.models.spec import FamilySpec, register

run_rotary_span = rotary_span_runner()

LLAMA = register(
    FamilySpec(
        model_types=("llama",),
        causal_lm_class=LlamaForCausalLM,
        block_class=LlamaDecoderLayer,
        run_span=run_rotary_span,
        make_span_helpers=rotary_helpers(LlamaRotaryEmbedding),
    )
)
