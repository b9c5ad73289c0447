"""Phi-3 (fused qkv_proj and gate_up_proj, optional sliding window): the Llama calling convention."""

from __future__ import annotations

from transformers import Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

from corolla.models.rotary import rotary_family
from corolla.models.spec import register

PHI3 = register(
    rotary_family(
        model_types=("phi3",),
        causal_lm_class=Phi3ForCausalLM,
        block_class=Phi3DecoderLayer,
        rotary_class=Phi3RotaryEmbedding,
    )
)
