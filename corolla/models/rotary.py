"""The span runner shared by every rotary-position decoder family (Llama, Mistral, Qwen, Phi-3, Gemma, MoE ones).

Their decoder layers take the same keywords in transformers 5.24:
`layer(hidden, attention_mask=..., position_ids=..., cache=..., use_cache=..., position_embeddings=(cos, sin))`
and return a Tensor. What differs between them is data: which layers use a sliding window (transformers'
own per-layer types, from `config.layer_types` or `config.sliding_window`) and whether the rotary embedding
depends on the layer type (Gemma 3: local and global rope bases).
"""

from __future__ import annotations

import weakref
from typing import Callable

from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from corolla.errors import UnsupportedModelError
from corolla.models.spec import FamilySpec, SpanInputs, SpanRunner, StaticDecode

# transformers' mask builder for each attention layer type (as its *Model.forward maps them).
MASK_BUILDERS = {
    "full_attention": create_causal_mask,
    "sliding_attention": create_sliding_window_causal_mask,
}


def layer_types(config: PretrainedConfig) -> list[str]:
    """Attention type of every layer, decided the way transformers decides it for its caches: `config.layer_types`
    if present, else every layer is sliding when `config.sliding_window` is set, else full."""
    types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    unknown = sorted(set(types) - MASK_BUILDERS.keys())
    if unknown:
        raise UnsupportedModelError(f"layer types {unknown} of model_type {config.model_type!r} are not supported "
                                    f"(supported: {', '.join(MASK_BUILDERS)})")
    return list(types)


_LAYER_TYPES: dict[int, tuple[weakref.ref, list[str]]] = {}


def cached_layer_types(config: PretrainedConfig) -> list[str]:
    """`layer_types(config)`, computed once per config object: transformers' lookup costs ~0.1 ms, on every step."""
    entry = _LAYER_TYPES.get(id(config))
    if entry is None or entry[0]() is not config:
        entry = _LAYER_TYPES[id(config)] = (weakref.ref(config), layer_types(config))
    return entry[1]


def span_masks(config: PretrainedConfig, inputs: SpanInputs, first_block: int, types: list[str]) -> dict:
    """One attention mask per layer type present in the span, sized from the cache layer of the span's first block
    of that type (cache layers before the span stay empty on this server)."""
    masks = {}
    for offset, layer_type in enumerate(types):
        if layer_type not in masks:
            masks[layer_type] = MASK_BUILDERS[layer_type](
                config=config,
                inputs_embeds=inputs.hidden,
                attention_mask=inputs.attention_mask,
                cache=inputs.cache,
                position_ids=inputs.position_ids,
                layer_idx=first_block + offset,
            )
    return masks


def _run_layers(helpers: dict[str, nn.Module], blocks: list[nn.Module], types: list[str], inputs: SpanInputs,
                masks: dict, rotary_per_layer_type: bool):
    hidden = inputs.hidden
    rotary = helpers["rotary"]
    if rotary_per_layer_type:
        position_embeddings = {t: rotary(hidden, inputs.position_ids, t) for t in set(types)}
    else:
        shared = rotary(hidden, inputs.position_ids)
        position_embeddings = {t: shared for t in set(types)}
    for block, layer_type in zip(blocks, types):
        hidden = block(
            hidden,
            attention_mask=masks[layer_type],
            position_ids=inputs.position_ids,
            cache=inputs.cache,
            use_cache=inputs.cache is not None,
            position_embeddings=position_embeddings[layer_type],
        )
    return hidden


def rotary_span_runner(rotary_per_layer_type: bool = False) -> SpanRunner:
    """A runner for consecutive rotary decoder layers, run the way transformers' *Model.forward runs them."""

    def run_rotary_span(config: PretrainedConfig, helpers: dict[str, nn.Module], blocks: list[nn.Module],
                        first_block: int, inputs: SpanInputs):
        types = cached_layer_types(config)[first_block:first_block + len(blocks)]
        masks = span_masks(config, inputs, first_block, types)
        return _run_layers(helpers, blocks, types, inputs, masks, rotary_per_layer_type)

    return run_rotary_span


def rotary_static_decode(rotary_per_layer_type: bool = False) -> StaticDecode:
    """Steps of a few tokens with a caller-made mask (CUDA graphs) for spans whose layers all use full attention
    (sliding-window layers would need a windowed mask; they run the ordinary way)."""

    def supports(config: PretrainedConfig, start: int, end: int) -> bool:
        return all(t == "full_attention" for t in cached_layer_types(config)[start:end])

    def run(config: PretrainedConfig, helpers: dict[str, nn.Module], blocks: list[nn.Module], first_block: int,
            inputs: SpanInputs, mask):
        types = cached_layer_types(config)[first_block:first_block + len(blocks)]
        return _run_layers(helpers, blocks, types, inputs, {"full_attention": mask}, rotary_per_layer_type)

    return StaticDecode(supports=supports, run=run)


def check_layer_types(config: PretrainedConfig) -> None:
    layer_types(config)


def rotary_helpers(rotary_class: type) -> Callable[[PretrainedConfig], dict[str, nn.Module]]:
    """Span helpers of a rotary family: its rotary embedding module (buffers computed from the config)."""

    def make(config: PretrainedConfig) -> dict[str, nn.Module]:
        return {"rotary": rotary_class(config=config)}

    return make


def rotary_family(*, rotary_class: type, rotary_per_layer_type: bool = False, **fields) -> FamilySpec:
    """A FamilySpec for a rotary family: this module's runner, its rotary embedding as span helper, and a check
    that every layer type has a mask builder. `fields` are the other FamilySpec fields."""
    fields.setdefault("check_config", check_layer_types)
    if fields.get("attn_implementation", "sdpa") == "sdpa":  # the caller's mask is a boolean one, as sdpa takes
        fields.setdefault("static_decode", rotary_static_decode(rotary_per_layer_type))
    return FamilySpec(run_span=rotary_span_runner(rotary_per_layer_type),
                      make_span_helpers=rotary_helpers(rotary_class), **fields)
