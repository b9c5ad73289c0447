"""Qwen2 / Qwen2.5, Qwen3 and Qwen3-MoE: the Llama calling convention.

Qwen2/Qwen3 list each layer's attention type in `config.layer_types` (sliding layers from `max_window_layers` on
when `use_sliding_window`); Qwen3-MoE slides every layer when `config.sliding_window` is set. Qwen3-MoE checkpoints
store one tensor per expert; transformers' conversion mapping fuses them at load.
"""

from __future__ import annotations

from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer, Qwen3MoeRotaryEmbedding

from corolla.models.rotary import rotary_family
from corolla.models.spec import register

QWEN2 = register(
    rotary_family(
        model_types=("qwen2",),
        causal_lm_class=Qwen2ForCausalLM,
        block_class=Qwen2DecoderLayer,
        rotary_class=Qwen2RotaryEmbedding,
    )
)

QWEN3 = register(
    rotary_family(
        model_types=("qwen3",),
        causal_lm_class=Qwen3ForCausalLM,
        block_class=Qwen3DecoderLayer,
        rotary_class=Qwen3RotaryEmbedding,
    )
)

QWEN3_MOE = register(
    rotary_family(
        model_types=("qwen3_moe",),
        causal_lm_class=Qwen3MoeForCausalLM,
        block_class=Qwen3MoeDecoderLayer,
        rotary_class=Qwen3MoeRotaryEmbedding,
    )
)
