"""Llama-style decoder families: rotary positions, RMSNorm, (grouped-query) attention, no per-layer quirks.

Covers Llama 2/3.x, SmolLM/SmolLM2, TinyLlama (model_type "llama").
"""

from __future__ import annotations

from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from corolla.models.rotary import rotary_family
from corolla.models.spec import register

LLAMA = register(
    rotary_family(
        model_types=("llama",),
        causal_lm_class=LlamaForCausalLM,
        block_class=LlamaDecoderLayer,
        rotary_class=LlamaRotaryEmbedding,
    )
)
