"""Mistral (sliding-window attention) and Mixtral (sparse mixture-of-experts MLP): the Llama calling convention.

Every layer is a sliding-window layer when `config.sliding_window` is set (as MistralModel / MixtralModel decide).
Mixtral checkpoints store one tensor per expert (`block_sparse_moe.experts.N.w1`); transformers' own conversion
mapping fuses them into the layer's `mlp.experts.gate_up_proj` at load (see checkpoint.load_blocks).
"""

from __future__ import annotations

from transformers import MistralForCausalLM, MixtralForCausalLM
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer, MistralRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

from corolla.models.rotary import rotary_helpers, rotary_span_runner
from corolla.models.spec import FamilySpec, register

MISTRAL = register(
    FamilySpec(
        model_types=("mistral",),
        causal_lm_class=MistralForCausalLM,
        block_class=MistralDecoderLayer,
        run_span=rotary_span_runner(),
        make_span_helpers=rotary_helpers(MistralRotaryEmbedding),
    )
)

MIXTRAL = register(
    FamilySpec(
        model_types=("mixtral",),
        causal_lm_class=MixtralForCausalLM,
        block_class=MixtralDecoderLayer,
        run_span=rotary_span_runner(),
        make_span_helpers=rotary_helpers(MixtralRotaryEmbedding),
    )
)
