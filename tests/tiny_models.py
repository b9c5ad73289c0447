"""Tiny random models built locally (no hub): one builder per family, saved as Hugging Face-format directories.

Every model has hidden size 64 and 3-4 layers. Sliding windows (Mistral, Qwen2, Phi-3, Gemma) are 6 tokens, shorter
than the test prompts, so the window really matters. Vocabulary: 320 tokens; 0 = padding, 1 = BOS, 2 = EOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 320
SLIDING_WINDOW = 6
_IDS = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ROTARY = dict(_IDS, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512)


def make_tiny_llama(path: Path, num_layers: int = 5, tie: bool = False, seed: int = 0) -> Path:
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path


# family name -> (config class name, config fields). Each is a real architecture's layout, shrunk.
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(_ROTARY, num_hidden_layers=4, rms_norm_eps=1e-6)),
    "mistral": ("MistralConfig", dict(_ROTARY, num_hidden_layers=4, sliding_window=SLIDING_WINDOW)),
    # Qwen2.5 small models tie embeddings; layers >= max_window_layers slide.
    "qwen2": ("Qwen2Config", dict(_ROTARY, num_hidden_layers=4, tie_word_embeddings=True, use_sliding_window=True,
                                  sliding_window=SLIDING_WINDOW, max_window_layers=2)),
    "qwen3": ("Qwen3Config", dict(_ROTARY, num_hidden_layers=4, head_dim=16)),
    "phi3": ("Phi3Config", dict(_ROTARY, num_hidden_layers=4, sliding_window=SLIDING_WINDOW)),
    # Gemma 2: alternating sliding/global layers, attention and final logit soft-capping, tied embeddings.
    "gemma2": ("Gemma2Config", dict(_ROTARY, num_hidden_layers=4, head_dim=16, sliding_window=SLIDING_WINDOW,
                                    query_pre_attn_scalar=16, final_logit_softcapping=30.0,
                                    attn_logit_softcapping=50.0)),
    # Gemma 3 (text): one rotary per layer type (local base 10k, global 1M), q/k norms.
    "gemma3_text": ("Gemma3TextConfig", dict(_ROTARY, num_hidden_layers=4, head_dim=16,
                                             sliding_window=SLIDING_WINDOW, query_pre_attn_scalar=16,
                                             layer_types=["sliding_attention", "sliding_attention",
                                                          "full_attention", "sliding_attention"])),
    "mixtral": ("MixtralConfig", dict(_ROTARY, num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=2)),
    # Qwen3-MoE with one dense layer (mlp_only_layers) among the sparse ones.
    "qwen3_moe": ("Qwen3MoeConfig", dict(_ROTARY, num_hidden_layers=4, head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[2])),
    # Falcon-40B/180B layout: grouped KV heads, parallel attention + MLP, two layer norms.
    "falcon_new": ("FalconConfig", dict(_IDS, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        num_kv_heads=2, new_decoder_architecture=True, parallel_attn=True,
                                        bias=False, alibi=False)),
    # Falcon-7B layout: multi-query attention, parallel attention + MLP, rotary.
    "falcon_old": ("FalconConfig", dict(_IDS, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                        new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                        bias=False, alibi=False)),
    # Falcon-RW layout: ALiBi instead of rotary, sequential attention then MLP, biases.
    "falcon_alibi": ("FalconConfig", dict(_IDS, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          new_decoder_architecture=False, multi_query=False, parallel_attn=False,
                                          bias=True, alibi=True)),
    "bloom": ("BloomConfig", dict(_IDS, hidden_size=64, n_layer=4, n_head=4)),
    "gpt2": ("GPT2Config", dict(_IDS, n_embd=64, n_layer=4, n_head=4, n_positions=128)),
}


def tiny_config(family: str, **overrides):
    class_name, fields = FAMILY_CONFIGS[family]
    return getattr(transformers, class_name)(**{**fields, **overrides})


def make_tiny(family: str, path: Path, seed: int = 0, save: Callable | None = None, **overrides) -> Path:
    """Build transformers' own model of `family` with random weights and save it to `path` (once)."""
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(seed)
    config = tiny_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    (save or (lambda m, p: m.save_pretrained(p)))(model, path)
    return path


def make_family(family: str, models_dir: Path) -> Path:
    """The tiny model of `family` used by the family tests (in-process and swarm), made once per test session."""
    return make_tiny(family, models_dir / f"family-{family}")
