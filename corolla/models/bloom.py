"""BLOOM: ALiBi position biases, a LayerNorm right after the embeddings, eager attention only.

BloomBlock takes `(hidden, alibi, attention_mask, layer_past=cache, use_cache)` and returns a tuple. The ALiBi
bias depends only on the padding mask over all tokens so far (past + new), so each server rebuilds it from the 2-D
mask (or from the cache length when there is no padding). The embedding LayerNorm stays on the client.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BloomForCausalLM, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from corolla.models.spec import FamilySpec, SpanInputs, register


def past_length(inputs: SpanInputs, first_block: int) -> int:
    return inputs.cache.get_seq_length(first_block) if inputs.cache is not None else 0


def padding_mask(inputs: SpanInputs, first_block: int) -> torch.Tensor:
    """The 2-D [batch, past + new] padding mask, all ones when the client sent none."""
    if inputs.attention_mask is not None:
        return inputs.attention_mask
    batch, new = inputs.hidden.shape[:2]
    return torch.ones(batch, past_length(inputs, first_block) + new, dtype=torch.long, device=inputs.hidden.device)


def run_bloom_span(config: PretrainedConfig, helpers: dict[str, nn.Module], blocks: list[nn.Module],
                   first_block: int, inputs: SpanInputs) -> torch.Tensor:
    hidden = inputs.hidden
    alibi = build_alibi_tensor(padding_mask(inputs, first_block), config.n_head, dtype=hidden.dtype)
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=inputs.attention_mask,
                              cache=inputs.cache, layer_idx=first_block)
    for block in blocks:
        hidden = block(hidden, alibi=alibi, attention_mask=mask, layer_past=inputs.cache,
                       use_cache=inputs.cache is not None)[0]
    return hidden


def bloom_embed(config: PretrainedConfig, parts: dict[str, nn.Module], spec: FamilySpec,
                input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                position_ids: torch.Tensor | None) -> torch.Tensor:
    embeds = parts[spec.embeddings_path](input_ids) if inputs_embeds is None else inputs_embeds
    return parts[spec.embedding_norm_path](embeds)


BLOOM = register(
    FamilySpec(
        model_types=("bloom",),
        causal_lm_class=BloomForCausalLM,
        block_class=BloomBlock,
        run_span=run_bloom_span,
        block_prefix="transformer.h.{index}.",
        embeddings_path="transformer.word_embeddings",
        extra_client_paths=("transformer.word_embeddings_layernorm",),
        embedding_norm_path="transformer.word_embeddings_layernorm",
        final_norm_path="transformer.ln_f",
        embed=bloom_embed,
        attn_implementation="eager",
    )
)
