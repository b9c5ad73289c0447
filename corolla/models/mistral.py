"""Mistral (sliding-window attention) and Mixtral (sparse mixture-of-experts MLP): the Llama calling convention.

Every layer is a sliding-window layer when `config.sliding_window` is set (as MistralModel / MixtralModel decide).
Mixtral checkpoints store one tensor per expert (`block_sparse_moe.experts.N.w1`); transformers' own conversion
mapping fuses them into the layer's `mlp.experts.gate_up_proj` at load (see checkpoint.load_blocks).
"""

from __future__ import annotations

from transformers import MistralForCausalLM, MixtralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from corolla.models.rotary import rotary_family
from corolla.models.spec import register

MISTRAL = register(
    rotary_family(
        model_types=("mistral",),
        causal_lm_class=MistralForCausalLM,
        block_class=MistralDecoderLayer,
        rotary_class=MistralRotaryEmbedding,
    )
)

MIXTRAL = register(
    rotary_family(
        model_types=("mixtral",),
        causal_lm_class=MixtralForCausalLM,
        block_class=MixtralDecoderLayer,
        rotary_class=MixtralRotaryEmbedding,
    )
)
