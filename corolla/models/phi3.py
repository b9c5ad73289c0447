"""Phi-3 (fused qkv_proj and gate_up_proj, optional sliding window): the Llama calling convention."""

from __future__ import annotations

from transformers import Phi3ForCausalLM
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

from corolla.models.rotary import rotary_helpers, rotary_span_runner
from corolla.models.spec import FamilySpec, register

PHI3 = register(
    FamilySpec(
        model_types=("phi3",),
        causal_lm_class=Phi3ForCausalLM,
        block_class=Phi3DecoderLayer,
        run_span=rotary_span_runner(),
        make_span_helpers=rotary_helpers(Phi3RotaryEmbedding),
    )
)
