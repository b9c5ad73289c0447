"""Llama-style decoder families: rotary positions, RMSNorm, (grouped-query) attention, no per-layer quirks.

Covers Llama 2/3.x, SmolLM/SmolLM2, TinyLlama (model_type "llama").
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from corolla.models.spec import FamilySpec, SpanInputs, register


def run_rotary_span(config: PretrainedConfig, helpers: dict[str, nn.Module], blocks: list[nn.Module],
                    first_block: int, inputs: SpanInputs):
    """Run consecutive rotary decoder layers the way transformers' *Model.forward runs them."""
    hidden = inputs.hidden
    # layer_idx: the mask is sized from this span's first cache layer (layers before the span stay empty here).
    mask = create_causal_mask(
        config=config,
        inputs_embeds=hidden,
        attention_mask=inputs.attention_mask,
        cache=inputs.cache,
        position_ids=inputs.position_ids,
        layer_idx=first_block,
    )
    position_embeddings = helpers["rotary"](hidden, position_ids=inputs.position_ids)
    for block in blocks:
        hidden = block(
            hidden,
            attention_mask=mask,
            position_ids=inputs.position_ids,
            cache=inputs.cache,
            use_cache=inputs.cache is not None,
            position_embeddings=position_embeddings,
        )
    return hidden


LLAMA = register(
    FamilySpec(
        model_types=("llama",),
        causal_lm_class=LlamaForCausalLM,
        block_class=LlamaDecoderLayer,
        run_span=run_rotary_span,
        make_span_helpers=lambda config: {"rotary": LlamaRotaryEmbedding(config=config)},
    )
)
