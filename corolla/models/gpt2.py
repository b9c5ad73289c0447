"""GPT-2 style models: learned absolute positions (`wpe`), added on the client; plain causal masks on servers.

GPT2Block takes `(hidden, cache, attention_mask, ..., use_cache)` and returns a Tensor.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GPT2LMHeadModel, PretrainedConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from corolla.models.spec import FamilySpec, SpanInputs, register


def run_gpt2_span(config: PretrainedConfig, helpers: dict[str, nn.Module], blocks: list[nn.Module],
                  first_block: int, inputs: SpanInputs) -> torch.Tensor:
    hidden = inputs.hidden
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=inputs.attention_mask,
                              cache=inputs.cache, position_ids=inputs.position_ids, layer_idx=first_block)
    for block in blocks:
        hidden = block(hidden, cache=inputs.cache, attention_mask=mask, use_cache=inputs.cache is not None,
                       position_ids=inputs.position_ids)
    return hidden


def gpt2_embed(config: PretrainedConfig, parts: dict[str, nn.Module], spec: FamilySpec,
               input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
               position_ids: torch.Tensor | None) -> torch.Tensor:
    """Token embeddings plus learned position embeddings (positions 0.. when none are given)."""
    embeds = parts[spec.embeddings_path](input_ids) if inputs_embeds is None else inputs_embeds
    if position_ids is None:
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    return embeds + parts["transformer.wpe"](position_ids).to(embeds.device)


GPT2 = register(
    FamilySpec(
        model_types=("gpt2",),
        causal_lm_class=GPT2LMHeadModel,
        block_class=GPT2Block,
        run_span=run_gpt2_span,
        block_prefix="transformer.h.{index}.",
        embeddings_path="transformer.wte",
        extra_client_paths=("transformer.wpe",),
        final_norm_path="transformer.ln_f",
        embed=gpt2_embed,
    )
)
