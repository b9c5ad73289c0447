"""What the rest of Corolla needs to know about a model family, as plain fields (one spec per family).

Nothing outside corolla/models looks at `model_type`: servers and clients read a FamilySpec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache

from corolla.errors import UnsupportedModelError


@dataclass(frozen=True)
class SpanInputs:
    """Everything one run of a span of blocks needs, already validated.

    hidden:          [batch, new_tokens, hidden_size] activations entering the first block of the span.
    position_ids:    [batch, new_tokens] positions of the new tokens (rotary / learned positions).
    attention_mask:  [batch, past_tokens + new_tokens] 1 for real tokens, 0 for padding; None = no padding.
    cache:           the session's attention cache (None for a stateless forward).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: Cache | None


def embed_tokens(config: PretrainedConfig, parts: dict[str, nn.Module], spec: "FamilySpec",
                 input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
    """Default client-side input step: the token embeddings (or the caller's inputs_embeds) as they are."""
    return parts[spec.embeddings_path](input_ids) if inputs_embeds is None else inputs_embeds


def lm_head_logits(config: PretrainedConfig, parts: dict[str, nn.Module], spec: "FamilySpec",
                   hidden: torch.Tensor) -> torch.Tensor:
    """Default client-side output step: final norm, then the LM head."""
    return parts[spec.lm_head_path](parts[spec.final_norm_path](hidden))


def dynamic_cache(config: PretrainedConfig) -> Cache:
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config)


# Runs blocks[first:...] on SpanInputs: (config, helpers built once per span, the blocks, first block index, inputs).
SpanRunner = Callable[[PretrainedConfig, dict[str, nn.Module], list[nn.Module], int, SpanInputs], torch.Tensor]


@dataclass(frozen=True)
class FamilySpec:
    """One model family, described by data; the decoder layers are transformers' own classes."""

    model_types: tuple[str, ...]  # config.model_type values this spec serves
    causal_lm_class: type  # transformers' *ForCausalLM class (client-side parts are built from it)
    block_class: type  # transformers' decoder layer class, built as block_class(config, layer_idx)
    run_span: SpanRunner  # how a span of blocks is run (masks, positions, cache)
    make_span_helpers: Callable[[PretrainedConfig], dict[str, nn.Module]]  # e.g. the rotary embedding
    block_prefix: str = "model.layers.{index}."  # checkpoint name prefix of block `index`
    embeddings_path: str = "model.embed_tokens"  # module path of the input embeddings in causal_lm_class
    final_norm_path: str = "model.norm"  # module path of the final norm
    lm_head_path: str = "lm_head"  # module path of the LM head
    # Client side: inputs -> hidden entering block 0 (embeddings, learned positions, scaling, ...).
    embed: Callable[..., torch.Tensor] = embed_tokens
    # Client side: hidden leaving the last block -> logits (final norm, LM head, soft-capping, ...).
    head: Callable[..., torch.Tensor] = lm_head_logits
    # Server side: a new, empty attention cache for one session over this model.
    make_cache: Callable[[PretrainedConfig], Cache] = dynamic_cache

    @property
    def client_paths(self) -> tuple[str, ...]:
        return (self.embeddings_path, self.final_norm_path, self.lm_head_path)


_REGISTRY: dict[str, FamilySpec] = {}


def register(spec: FamilySpec) -> FamilySpec:
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec
    return spec


def supported_model_types() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


def family_for(config: PretrainedConfig) -> FamilySpec:
    _load_families()
    spec = _REGISTRY.get(config.model_type)
    if spec is None:
        raise UnsupportedModelError(
            f"model_type {config.model_type!r} is not supported; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return spec


def _load_families() -> None:
    # Importing the family modules registers them; kept lazy so importing this module stays cheap.
    from corolla.models import llama  # noqa: F401
