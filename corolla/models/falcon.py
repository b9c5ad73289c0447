"""Falcon, all three layouts of transformers' one FalconDecoderLayer (chosen by config fields, not by name):

- new decoder architecture (Falcon-40B/180B, Falcon2-11B): grouped KV heads, parallel attention and MLP;
- the older one (Falcon-7B): multi-query attention, parallel attention and MLP, rotary positions;
- ALiBi instead of rotary (Falcon-RW): `config.alibi`, sequential attention then MLP.

The layer takes `(hidden, alibi, attention_mask, position_ids, layer_past=cache, use_cache, position_embeddings)`
and returns a tuple. With ALiBi, FalconModel folds the bias into the materialized attention mask; each server does
the same from the 2-D padding mask over all tokens so far.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import FalconForCausalLM, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.falcon.modeling_falcon import FalconDecoderLayer, FalconRotaryEmbedding, build_alibi_tensor

from corolla.models.bloom import padding_mask
from corolla.models.spec import FamilySpec, SpanInputs, StaticDecode, register


def run_falcon_span(config: PretrainedConfig, helpers: dict[str, nn.Module], blocks: list[nn.Module],
                    first_block: int, inputs: SpanInputs) -> torch.Tensor:
    hidden = inputs.hidden
    batch = hidden.shape[0]
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=inputs.attention_mask,
                              cache=inputs.cache, position_ids=inputs.position_ids, layer_idx=first_block,
                              allow_is_causal_skip=False)  # materialized, so ALiBi can be folded into it
    alibi = None
    if config.alibi:
        alibi = build_alibi_tensor(padding_mask(inputs, first_block), config.num_attention_heads, dtype=hidden.dtype)
        if mask is not None and mask.ndim == 4:
            # As FalconModel.forward does: the scaled bias where attention is allowed, the dtype minimum elsewhere.
            min_dtype = torch.finfo(hidden.dtype).min
            if mask.dtype == torch.bool:
                mask = torch.where(mask, torch.full((), 0.0, device=mask.device, dtype=hidden.dtype), min_dtype)
            bias = alibi.reshape(batch, -1, *alibi.shape[1:])
            mask = torch.masked_fill(bias / math.sqrt(config.hidden_size // config.num_attention_heads),
                                     mask < -1, min_dtype)
    return _run_layers(helpers, blocks, inputs, alibi, mask)


def _run_layers(helpers: dict[str, nn.Module], blocks: list[nn.Module], inputs: SpanInputs, alibi, mask):
    hidden = inputs.hidden
    position_embeddings = helpers["rotary"](hidden, position_ids=inputs.position_ids)
    for block in blocks:
        hidden = block(hidden, alibi=alibi, attention_mask=mask, position_ids=inputs.position_ids,
                       layer_past=inputs.cache, use_cache=inputs.cache is not None,
                       position_embeddings=position_embeddings)[0]
    return hidden


# Rotary Falcon (7B/40B/180B) takes a caller-made boolean mask straight into sdpa, so its steps can be captured in
# CUDA graphs; ALiBi Falcon folds a bias into the mask, which the graphs' mask does not carry.
FALCON_STATIC_DECODE = StaticDecode(
    supports=lambda config, start, end: not config.alibi,
    run=lambda config, helpers, blocks, first_block, inputs, mask: _run_layers(helpers, blocks, inputs, None, mask),
)


FALCON = register(
    FamilySpec(
        model_types=("falcon",),
        causal_lm_class=FalconForCausalLM,
        block_class=FalconDecoderLayer,
        run_span=run_falcon_span,
        make_span_helpers=lambda config: {"rotary": FalconRotaryEmbedding(config=config)},
        block_prefix="transformer.h.{index}.",
        embeddings_path="transformer.word_embeddings",
        final_norm_path="transformer.ln_f",
        static_decode=FALCON_STATIC_DECODE,
    )
)
