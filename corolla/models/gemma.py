"""Gemma 2 and Gemma 3 (text): the Llama calling convention, with Gemma's differences kept as data.

- Embeddings are scaled by sqrt(hidden_size) inside transformers' own embedding module (client side, as is).
- Layers alternate sliding-window and global attention (`config.layer_types`); each mask type is built from the
  cache layer of the span's first layer of that type.
- Gemma 3 has one rotary embedding per layer type (local and global rope bases).
- Final logit soft-capping (`config.final_logit_softcapping`, Gemma 2) is applied on the client after the LM head.
- Gemma 2 soft-caps attention logits, which sdpa cannot do: it runs eager attention, as transformers does.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Gemma2ForCausalLM, Gemma3ForCausalLM, PretrainedConfig
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer, Gemma2RotaryEmbedding
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer, Gemma3RotaryEmbedding

from corolla.errors import UnsupportedModelError
from corolla.models.rotary import check_layer_types, rotary_family
from corolla.models.spec import FamilySpec, lm_head_logits, register


def softcapped_logits(config: PretrainedConfig, parts: dict[str, nn.Module], spec: FamilySpec,
                      hidden: torch.Tensor) -> torch.Tensor:
    """Final norm, LM head, then tanh soft-capping of the logits when the config asks for it."""
    logits = lm_head_logits(config, parts, spec, hidden)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def check_gemma3_text(config: PretrainedConfig) -> None:
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("this gemma3_text config uses bidirectional attention (an embedding model such "
                                    "as EmbeddingGemma); Corolla serves causal language models only")
    check_layer_types(config)


GEMMA2 = register(
    rotary_family(
        model_types=("gemma2",),
        causal_lm_class=Gemma2ForCausalLM,
        block_class=Gemma2DecoderLayer,
        rotary_class=Gemma2RotaryEmbedding,
        head=softcapped_logits,
        attn_implementation="eager",
    )
)

GEMMA3_TEXT = register(
    rotary_family(
        model_types=("gemma3_text",),
        causal_lm_class=Gemma3ForCausalLM,
        block_class=Gemma3DecoderLayer,
        rotary_class=Gemma3RotaryEmbedding,
        rotary_per_layer_type=True,
        head=softcapped_logits,
        check_config=check_gemma3_text,
    )
)
