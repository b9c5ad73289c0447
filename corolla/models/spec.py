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
from corolla.models.edits import BlockEdit
from corolla.models.lora import BlockLora


@dataclass(frozen=True)
class SpanInputs:
    """Everything one run of a span of blocks needs, already validated.

    hidden:          [batch, new_tokens, hidden_size] activations entering the first block of the span.
    position_ids:    [batch, new_tokens] positions of the new tokens (rotary / learned positions).
    attention_mask:  [batch, past_tokens + new_tokens] 1 for real tokens, 0 for padding; None = no padding.
    cache:           the session's attention cache (None for a stateless forward).
    lora:            LoRA deltas per block index (models/lora.py); None = the base model.
    prompts:         [blocks of the request, batch, pre_seq_len, hidden] deep prompts (models/prompts.py), or None.
    first_position:  position of the first new token (where the prompt positions are among them).
    edits:           hidden-state edits after blocks (models/edits.py), applied in order.
    record_layers:   a stateless forward also returns each block's output but the last (models/edits.py).
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    cache: Cache | None
    lora: dict[int, BlockLora] | None = None
    prompts: torch.Tensor | None = None
    first_position: int = 0
    edits: tuple[BlockEdit, ...] = ()
    record_layers: bool = False

    @property
    def plain(self) -> bool:
        """No adapter and no prompts: the base model's math, which any request on the same blocks shares."""
        return not self.lora and self.prompts is None and not self.edits


def embed_tokens(config: PretrainedConfig, parts: dict[str, nn.Module], spec: "FamilySpec",
                 input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 position_ids: torch.Tensor | None) -> torch.Tensor:
    """Default client-side input step: the token embeddings (or the caller's inputs_embeds) as they are.

    Families that scale their embeddings (Gemma) do it inside transformers' own embedding module."""
    return parts[spec.embeddings_path](input_ids) if inputs_embeds is None else inputs_embeds


def lm_head_logits(config: PretrainedConfig, parts: dict[str, nn.Module], spec: "FamilySpec",
                   hidden: torch.Tensor) -> torch.Tensor:
    """Default client-side output step: final norm, then the LM head."""
    return parts[spec.lm_head_path](parts[spec.final_norm_path](hidden))


def full_history_cache(config: PretrainedConfig) -> Cache:
    """A session cache that keeps every token of every layer (transformers' DynamicCache with full layers).

    Sliding-window layers see only their window through the mask, not through a truncated cache, so a session can
    be rolled back or replayed to any position (transformers' sliding cache layers refuse to roll back past their
    window). The server's token budget already reserves full-length caches per session."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache()


# Runs blocks[first:...] on SpanInputs: (config, helpers built once per span, the blocks, first block index, inputs).
SpanRunner = Callable[[PretrainedConfig, dict[str, nn.Module], list[nn.Module], int, SpanInputs], torch.Tensor]


@dataclass(frozen=True)
class StaticDecode:
    """How a family runs a step of a few new tokens over the engine's KV memory with the attention mask made by the
    caller (a boolean [rows, 1, new, read] mask): a step with fixed shapes and addresses, which a server captures in
    a CUDA graph (server/graphs.py)."""

    supports: Callable[[PretrainedConfig, int, int], bool]  # (config, start, end): can blocks [start, end) run so?
    # (config, helpers, blocks, first block, inputs over the KV memory, mask [rows, 1, new, read]) -> hidden
    run: Callable[[PretrainedConfig, dict[str, nn.Module], list[nn.Module], int, SpanInputs, torch.Tensor],
                  torch.Tensor]


def no_helpers(config: PretrainedConfig) -> dict[str, nn.Module]:
    return {}


def accept_config(config: PretrainedConfig) -> None:
    pass


@dataclass(frozen=True)
class FamilySpec:
    """One model family, described by data; the decoder layers are transformers' own classes."""

    model_types: tuple[str, ...]  # config.model_type values this spec serves
    causal_lm_class: type  # transformers' *ForCausalLM class (blocks and client parts are taken from it)
    block_class: type  # transformers' decoder layer class (the modules at block_prefix are of this class)
    run_span: SpanRunner  # how a span of blocks is run (masks, positions, ALiBi, cache)
    make_span_helpers: Callable[[PretrainedConfig], dict[str, nn.Module]] = no_helpers  # e.g. the rotary embedding
    block_prefix: str = "model.layers.{index}."  # module path (and checkpoint name prefix) of block `index`
    embeddings_path: str = "model.embed_tokens"  # module path of the input embeddings in causal_lm_class
    final_norm_path: str = "model.norm"  # module path of the final norm
    # Module path of a norm right after the embeddings (BLOOM's), or None: Petals' `word_embeddings_layernorm`.
    embedding_norm_path: str | None = None
    lm_head_path: str = "lm_head"  # module path of the LM head
    # Further client-side modules (learned positions, the embedding LayerNorm of BLOOM, ...).
    extra_client_paths: tuple[str, ...] = ()
    # Client side: inputs -> hidden entering block 0 (embeddings, learned positions, scaling, ...).
    embed: Callable[..., torch.Tensor] = embed_tokens
    # Client side: hidden leaving the last block -> logits (final norm, LM head, soft-capping, ...).
    head: Callable[..., torch.Tensor] = lm_head_logits
    # Server side: a new, empty attention cache for one session over this model.
    make_cache: Callable[[PretrainedConfig], Cache] = full_history_cache
    # The attention implementation every peer uses: what transformers picks by default for this family
    # ("sdpa" where supported; "eager" where sdpa would be wrong, e.g. logit soft-capping or ALiBi added to scores).
    attn_implementation: str = "sdpa"
    # Raises UnsupportedModelError for configs of this model_type that the spec cannot run exactly (checked when
    # the model directory is opened, by servers and clients alike).
    check_config: Callable[[PretrainedConfig], None] = accept_config
    # Steps with a caller-made mask (for CUDA graphs); None: this family's steps always run the ordinary way.
    static_decode: StaticDecode | None = None

    @property
    def client_paths(self) -> tuple[str, ...]:
        return (self.embeddings_path, *self.extra_client_paths, self.final_norm_path, self.lm_head_path)

    def block_path(self, index: int) -> str:
        return self.block_prefix.format(index=index).rstrip(".")


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
    from corolla.models import bloom, falcon, gemma, gpt2, llama, mistral, phi3, qwen  # noqa: F401
