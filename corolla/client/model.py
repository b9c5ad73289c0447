"""A transformers model whose decoder blocks run in the swarm: `AutoDistributedModelForCausalLM`.

Locally it holds only the embeddings, the final norm and the LM head (transformers' own modules, filled with only
their tensors). `generate()` is transformers' own; the attention cache lives on the servers, represented here by
a RemoteSessionCache that tells `generate` how many tokens the servers already hold.

Fine-tuning (client/tuning.py): with a tuning mode, the model owns trainable prompts or LoRA weights; `forward`
runs the remote blocks through an autograd function (client/training.py), so `loss.backward()` reaches them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.client.blocks import BlockRunner, RemoteBlocks, TransformerParts
from corolla.client.config import ClientConfig
from corolla.client.drafting import DEFAULT_MAX_NGRAM, NgramDrafter
from corolla.client.edits import Edit, check_edits
from corolla.client.extras import NO_EXTRAS, Extras
from corolla.client.remote import InferenceSession, RemoteSequence
from corolla.client.swarm import SwarmClient
from corolla.client.training import RemoteBlocksFunction, RemoteTraining
from corolla.client.tuning import Tuning, TuningConfig, load_tensors, read_tuning
from corolla.errors import CorollaError
from corolla.models.checkpoint import DTYPES, config_dtype, load_client_parts, meta_model
from corolla.models.hub_source import HUB_KWARGS, open_model, swarm_identity
from corolla.models.layout import RowDotLinear, choose_layouts, row_dot
from corolla.models.lora import LoraSettings
from corolla.models.spec import FamilySpec, family_for
from corolla.net.node import NetworkConfig

logger = logging.getLogger(__name__)


class RemoteSessionCache(Cache):
    """Stands for the attention caches that servers keep for one inference session."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.prefix_tokens  # prompt-tuning positions are not the caller's

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.session.reorder(beam_idx)

    def crop(self, tokens: int) -> None:
        """transformers 5.x: crop(-n) drops the last n tokens (speculative decoding's rejected drafts); crop(0) is a
        no-op. Rolling back is free: the next step starts at the shorter position and servers drop what follows."""
        session = self.session
        if tokens == 0:
            return
        # tokens > 0 (older transformers): the length to keep. Never below the prompt-tuning positions.
        kept = session.position + tokens if tokens < 0 else session.prefix_tokens + tokens
        session.rollback_to(min(session.position, max(session.prefix_tokens, kept)))


@dataclasses.dataclass(frozen=True)
class _Generated:
    """What the last `generate()` in a session left, so that the next one can continue from it (Petals' way)."""

    sequences: torch.Tensor  # every token of the session so far (the last one not yet sent to the servers)
    attention_mask: torch.Tensor | None  # for `sequences`; None when all ones
    position: int  # the session's position when that generate() returned; any other means it moved since
    beams: int  # beam search leaves beams in the servers' caches, not the returned rows: not continuable


class ModelInferenceSession(InferenceSession):
    """An InferenceSession opened by a model: as a context manager it is the model's active session in the
    calling thread; it also remembers the tokens of its last `generate()` (`output_ids`, as in Petals)."""

    def __init__(self, model: "DistributedModelForCausalLM", *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._model = model
        self._generated: _Generated | None = None
        self._entered_local: threading.local | None = None

    @property
    def output_ids(self) -> torch.Tensor | None:
        """Every token of this session's generate() calls so far (None before the first one)."""
        return self._generated.sequences if self._generated is not None else None

    def __enter__(self) -> "ModelInferenceSession":
        local = self._model._local
        if self._model.active_session is not None:
            raise CorollaError("an inference session is already active in this thread")
        if self.closed:
            raise CorollaError("this inference session is closed")
        local.session, self._entered_local = self, local
        return self

    def __exit__(self, *exc) -> None:
        if self._entered_local is not None and getattr(self._entered_local, "session", None) is self:
            self._entered_local.session = None
        self._entered_local = None
        self.close()


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """Causal LM with remote blocks. Build it with `AutoDistributedModelForCausalLM.from_pretrained`."""

    config_class = PretrainedConfig
    base_model_prefix = "distributed"
    main_input_name = "input_ids"
    _supports_cache_class = True
    _supports_sdpa = True  # attention runs on the servers; nothing to dispatch here

    def __init__(self, config: PretrainedConfig, parts: dict[str, nn.Module], swarm: SwarmClient):
        super().__init__(config)
        self.spec = family_for(config)
        # Registered as submodules under their transformers paths' last names (embed_tokens, norm, lm_head, ...).
        self.client_parts = nn.ModuleDict({path.replace(".", "_"): module for path, module in parts.items()})
        self._parts_by_path = parts
        self.swarm = swarm
        self.remote = RemoteSequence(swarm)
        self.remote_training = RemoteTraining(self.remote)
        self._local = threading.local()  # the active inference session, per calling thread
        self.tuning: Tuning | None = None  # trainable prompts / LoRA weights (enable_tuning, load_tuning)
        self.swarm_name: str | None = None  # the name the swarm knows the model by (from_pretrained sets it)
        self.active_adapter = None  # a LoRA adapter hosted by servers, used by every request (on the config)
        self._head_pool: ThreadPoolExecutor | None = None  # the LM head's second thread (_two_thread_linear)
        # Petals' module names (client/blocks.py); kept out of the module tree: they are the parts above again.
        runner = BlockRunner(config.num_hidden_layers, config.hidden_size, self._run_blocks, self._span_session)
        embedding_norm = parts[self.spec.embedding_norm_path] if self.spec.embedding_norm_path else nn.Identity()
        object.__setattr__(self, "_transformer", TransformerParts(
            parts[self.spec.embeddings_path], embedding_norm, RemoteBlocks(runner), parts[self.spec.final_norm_path]))

    @property
    def transformer(self) -> TransformerParts:
        """Petals' names: `transformer.word_embeddings`, `.word_embeddings_layernorm` (the family's embedding norm,
        else an identity), `.h` (the remote blocks, sliceable: client/blocks.py) and `.ln_f` (the final norm)."""
        return self._transformer

    @property
    def blocks(self) -> RemoteBlocks:
        """The remote blocks (`transformer.h`)."""
        return self._transformer.h

    @property
    def lm_head(self) -> nn.Module:
        return self.get_output_embeddings()

    @property
    def active_adapter(self) -> str | None:
        """The LoRA adapter hosted by servers that every request uses; kept on the config, where Petals has it
        (`model.config.active_adapter`)."""
        return getattr(self.config, "active_adapter", None)

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self.config.active_adapter = name

    # -- transformers plumbing -----------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self._parts_by_path[self.spec.embeddings_path]

    def set_input_embeddings(self, value: nn.Module) -> None:
        self._parts_by_path[self.spec.embeddings_path] = value
        self.client_parts[self.spec.embeddings_path.replace(".", "_")] = value

    def get_output_embeddings(self) -> nn.Module:
        return self._parts_by_path[self.spec.lm_head_path]

    def embed(self, input_ids=None, inputs_embeds=None, position_ids=None) -> torch.Tensor:
        """Client-side input step: hidden states entering the first remote block."""
        return self.spec.embed(self.config, self._parts_by_path, self.spec, input_ids, inputs_embeds, position_ids)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Client-side output step: logits from the hidden states leaving the last remote block."""
        parts = self._parts_by_path
        lm_head = parts[self.spec.lm_head_path]
        if _splits(lm_head, hidden):
            if self._head_pool is None:
                self._head_pool = ThreadPoolExecutor(1, thread_name_prefix="corolla-lm-head")
            parts = {**parts, self.spec.lm_head_path: functools.partial(_two_thread_linear, lm_head, self._head_pool)}
        return self.spec.head(self.config, parts, self.spec, hidden)

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint

    # -- fine-tuning ------------------------------------------------------------------------------------------

    def enable_tuning(self, tuning: TuningConfig, seed: int | None = None) -> Tuning:
        """Add trainable prompts or LoRA weights (the rest of the model stays frozen); returns them, e.g. for an
        optimizer: `torch.optim.AdamW(model.enable_tuning(...).parameters())`."""
        block = meta_model(self.spec, self.config, torch.float32).get_submodule(self.spec.block_path(0))
        embeddings = self.get_input_embeddings().weight
        self.tuning = Tuning(tuning, self.config, self.spec, block, embedding_std=float(embeddings.float().std()),
                             base_model=self.name_or_path, seed=seed)
        for part in self.client_parts.parameters():
            part.requires_grad_(False)
        return self.tuning

    def load_tuning(self, name_or_path: str | Path, hub_dir: str | Path | None = None) -> Tuning:
        """Load prompts or a LoRA adapter saved by `tuning.save_pretrained` / `push_to_hub` (or by plain peft):
        a local directory or a repo id in the offline hub."""
        from corolla.hub import resolve

        directory = Path(resolve(str(name_or_path), Path(hub_dir) if hub_dir else None))
        config, tensors = read_tuning(directory)
        tuning = self.enable_tuning(config)
        load_tensors(tuning, tensors, directory)
        return tuning

    def _extras(self, batch: int) -> Extras:
        if self.tuning is not None:
            return self.tuning.extras(batch, self.active_adapter)
        return Extras(adapter=self.active_adapter) if self.active_adapter else NO_EXTRAS

    def _run_blocks(self, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                    span: tuple[int, int] | None = None, edits: tuple[Edit, ...] = (),
                    layers: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Remote blocks [span) (default: all), stateless; differentiable when gradients are wanted. `edits`:
        hidden-state edits (client/edits.py); `layers`: a list to append every block's output to. A slice carries
        no deep prompts (they belong to the prompt positions that `forward` adds)."""
        batch, tokens, width = hidden.shape
        start, end = span or (0, self.config.num_hidden_layers)
        edits = check_edits(edits, start, end, batch, tokens, width)
        tuning = self.tuning
        prompts = tuning.prompts(batch) if tuning is not None and span is None else None
        lora = list(tuning.lora_weights) if tuning is not None else []
        wants_grad = torch.is_grad_enabled() and (
            hidden.requires_grad or (prompts is not None and prompts.requires_grad) or any(w.requires_grad for w in lora))
        if not wants_grad:
            extras = self._extras(batch)
            extras = dataclasses.replace(extras, edits=edits, prompts=extras.prompts if span is None else None)
            return self.remote.forward(hidden, position_ids=position_ids, attention_mask=mask, extras=extras,
                                       span=span, layers=layers)
        if layers is not None:
            raise CorollaError("output_hidden_states=True is for forwards without gradients (torch.no_grad()); "
                               "for gradients through inner layers, run slices of model.transformer.h")
        layout = tuning.lora_layout() if tuning is not None else None
        return RemoteBlocksFunction.apply(self.remote_training, position_ids, mask, layout, self.active_adapter,
                                          span, edits, hidden, prompts, *lora)

    def _span_session(self, span: tuple[int, int], max_length: int, batch_size: int) -> InferenceSession:
        """A session over blocks [span) (transformer.h slices): the model's adapter and LoRA weights, no prompts."""
        extras = dataclasses.replace(self._extras(batch_size), prompts=None)
        return InferenceSession(self.swarm, max_length=max_length, batch_size=batch_size, extras=extras, span=span)

    # -- sessions -------------------------------------------------------------------------------------------

    @property
    def active_session(self) -> InferenceSession | None:
        session = getattr(self._local, "session", None)
        return session if session is not None and not session.closed else None

    def inference_session(self, max_length: int, batch_size: int = 1,
                          active_adapter: str | None = None) -> "ModelInferenceSession":
        """A session whose caches live on the servers. `with model.inference_session(...) as session:` makes it the
        active one in this thread (`forward` and `generate` inside continue it) and closes it at the end; without
        `with`, pass it as `generate(..., session=session)` and `close()` it yourself (Petals allows both).

        `max_length` counts the caller's tokens (prompt-tuning positions are added). `active_adapter`: a LoRA adapter
        hosted by servers for this session (default: the model's `active_adapter`)."""
        extras = self._extras(batch_size)
        if active_adapter is not None:
            extras = dataclasses.replace(extras, adapter=active_adapter)
        prefix = self.tuning.pre_seq_len if self.tuning is not None else 0
        return ModelInferenceSession(self, self.swarm, max_length=max_length + prefix, batch_size=batch_size,
                                     extras=extras)

    # -- forward / generate -----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, return_dict: bool = True,
                output_hidden_states: bool | None = None, edits: list[Edit] | tuple[Edit, ...] = (),
                **kwargs) -> CausalLMOutputWithPast:
        """transformers' forward over the swarm. `output_hidden_states=True`: transformers' `hidden_states` tuple
        (the embeddings' output, then every block's, the last after the final norm), each server returning its
        blocks' outputs in one round trip. `edits`: hidden-state edits between blocks (client/edits.py). Both are
        for stateless forwards (outside an inference session)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise CorollaError("output_attentions=True is not supported: attention weights stay on the servers; "
                               "output_hidden_states=True and slices of model.transformer.h give the hidden states")
        session = cache.session if isinstance(cache, RemoteSessionCache) else self.active_session
        if session is not None and (output_hidden_states or edits):
            raise CorollaError("output_hidden_states and edits are for forwards outside an inference session; in a "
                               "session, step slices of model.transformer.h (each slice's session gives the hidden "
                               "states after its last block)")
        batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if position_ids is None:
            offset = session.position - session.prefix_tokens if session is not None else 0
            position_ids = torch.arange(offset, offset + length).unsqueeze(0).expand(batch, -1)
        hidden = self.embed(input_ids, inputs_embeds, position_ids)
        embedded = hidden
        # Prompt tuning: pre_seq_len prompt positions come before the caller's tokens (once per session).
        prefix = self.tuning.pre_seq_len if self.tuning is not None else 0
        add_prefix = prefix > 0 and (session is None or session.position == 0)
        if prefix:
            position_ids = position_ids + prefix
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(batch, prefix), attention_mask], dim=1)
        if add_prefix:
            hidden = torch.cat([self.tuning.prefix(batch).to(hidden.dtype), hidden], dim=1)
            position_ids = torch.cat([torch.arange(prefix).unsqueeze(0).expand(batch, -1), position_ids], dim=1)
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if session is not None:
            start = session.position
            session.prefix_tokens = prefix
            hidden = session.step(hidden, position_ids=position_ids, attention_mask=mask, start=start)
        else:
            if edits and add_prefix:
                raise CorollaError("edits with prompt tuning are not supported: their positions would be shifted "
                                   "by the prompt positions; run slices of model.transformer.h instead")
            layers = [] if output_hidden_states else None
            hidden = self._run_blocks(hidden, position_ids, mask, edits=tuple(edits), layers=layers)
        if add_prefix:
            hidden = hidden[:, prefix:]
        hidden_states = None
        if output_hidden_states:  # as transformers: the final norm's output in place of the last block's
            states = [layer[:, prefix:] if add_prefix else layer for layer in layers[:-1]]
            hidden_states = (embedded, *states, self._parts_by_path[self.spec.final_norm_path](hidden))
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache, hidden_states=hidden_states)

    def generate(self, inputs: torch.Tensor | None = None, *args, session: InferenceSession | None = None,
                 **kwargs):
        """transformers' generate over the swarm. In an inference session (the active one, or `session=`), as in
        Petals: the first call gets the whole prompt; each later call continues from the session's last generated
        token, `inputs` (optional) being new tokens to append, and returns only this call's tokens."""
        if kwargs.get("cache") is not None:
            if session is not None:
                raise CorollaError("generate() got both cache= and session=; give one")
            return super().generate(inputs, *args, **kwargs)
        session = session if session is not None else self.active_session
        if session is not None:
            return self._generate_in_session(session, inputs, args, kwargs)
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            raise CorollaError("generate() outside an inference session needs input_ids")
        config: GenerationConfig = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("max_new_tokens") is not None:
            max_length = ids.shape[1] + kwargs["max_new_tokens"]
        elif kwargs.get("max_length") is not None:
            max_length = kwargs["max_length"]
        elif config.max_new_tokens is not None:
            max_length = ids.shape[1] + config.max_new_tokens
        else:
            max_length = config.max_length or ids.shape[1] + _DEFAULT_NEW_TOKENS
        # Speculative decoding verifies drafts past the final length before rolling back to the accepted tokens.
        if kwargs.get("prompt_lookup_num_tokens") or kwargs.get("assistant_model") is not None:
            max_length += (kwargs.get("prompt_lookup_num_tokens") or config.num_assistant_tokens or 20) + 1
        expand = max(kwargs.get("num_beams") or config.num_beams or 1,
                     kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        with self.inference_session(max_length=max_length, batch_size=ids.shape[0] * expand) as session:
            return super().generate(inputs, *args, cache=RemoteSessionCache(session), **kwargs)

    def _generate_in_session(self, session: InferenceSession, inputs: torch.Tensor | None, args: tuple,
                             kwargs: dict):
        if session.closed:
            raise CorollaError("this inference session is closed")
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        held = session.position - session.prefix_tokens
        generated: _Generated | None = getattr(session, "_generated", None)
        if generated is not None and generated.position != session.position:
            generated = None  # forward(), step() or rollback_to() moved the session since: its tokens are unknown
        if held > 0 and generated is None:
            # Tokens sent by forward()/step(): `inputs` must then be the whole sequence (only the rest is sent).
            if ids is None and kwargs.get("inputs_embeds") is None:
                raise CorollaError(
                    f"generate() without inputs continues from the last generate() in this session, but the "
                    f"session's {held} tokens were sent by forward()/step() since; pass input_ids holding the whole "
                    f"sequence so far plus the new tokens")
            if ids is not None and ids.shape[1] <= held:
                raise CorollaError(
                    f"the session already holds {held} tokens and generate() got {ids.shape[1]}: after forward()/"
                    f"step() calls, input_ids must hold the whole sequence so far plus at least one new token")
        previous = 0
        if generated is not None and held > 0:
            if generated.beams > 1:
                raise CorollaError("generate() cannot continue a session after beam search (the servers' caches "
                                   "hold the beams, not the returned sequences); open a new session")
            if kwargs.get("inputs_embeds") is not None:
                raise CorollaError("continuing a session's generate() takes input_ids, not inputs_embeds")
            if (kwargs.get("num_beams") or 1) > 1:
                raise CorollaError("generate() cannot continue a session with beam search: the session's caches "
                                   "hold one row per sequence; open a new session")
            sequences = generated.sequences
            if ids is not None and ids.shape[0] != sequences.shape[0]:
                raise CorollaError(f"the session's sequences have {sequences.shape[0]} rows; the new input_ids "
                                   f"have {ids.shape[0]}")
            previous = sequences.shape[1]
            new = ids.to(sequences.device) if ids is not None else sequences[:, :0]
            mask = kwargs.get("attention_mask")
            if mask is not None or generated.attention_mask is not None:
                old = generated.attention_mask if generated.attention_mask is not None else torch.ones_like(sequences)
                mask = mask if mask is not None else torch.ones_like(new)
                kwargs["attention_mask"] = torch.cat([old, mask.to(old.device, old.dtype)], dim=1)
            ids = torch.cat([sequences, new], dim=1)
        result = super().generate(ids, *args, cache=RemoteSessionCache(session), **kwargs)
        sequences = result if isinstance(result, torch.Tensor) else result.sequences
        config: GenerationConfig = kwargs.get("generation_config") or self.generation_config
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if bool(mask.all()):
                mask = None
            else:  # generated tokens (pads after an EOS included) were sent as ordinary tokens
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], dim=1)
        session._generated = _Generated(sequences, mask, session.position,
                                        kwargs.get("num_beams") or config.num_beams or 1)
        if previous == 0:
            return result
        if isinstance(result, torch.Tensor):
            return result[:, previous:]
        result.sequences = sequences[:, previous:]
        return result

    def _get_candidate_generator(self, generation_config: GenerationConfig, *args, **kwargs):
        """transformers' hook for speculative decoding's drafts: prompt lookup (`prompt_lookup_num_tokens`) gets
        our NgramDrafter, which drafts more accepted tokens on repetitive text at less cost per step; an
        assistant model and every other kind stay transformers' own."""
        if (generation_config.prompt_lookup_num_tokens is None or kwargs.get("assistant_model") is not None
                or generation_config.assistant_early_exit is not None):
            return super()._get_candidate_generator(generation_config, *args, **kwargs)
        return NgramDrafter(generation_config.prompt_lookup_num_tokens, generation_config.max_length,
                            generation_config._eos_token_tensor,
                            generation_config.max_matching_ngram_size or DEFAULT_MAX_NGRAM)

    def close(self) -> None:
        if self._head_pool is not None:
            self._head_pool.shutdown()
        self.swarm.close()


_SPLIT_MIN_BYTES = 4 * 2**20  # below this, the hand-off to a second thread (~30-50 us) costs more than it saves
_SPLIT_MAX_ROWS = 8  # more rows: a matrix product, which torch's own threads already share


def _splits(lm_head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether the LM head runs on two threads: a large plain nn.Linear (or RowDotLinear) on CPU, torch allowed
    more than one thread, a few rows (decoding; a RowDotLinear: as many as its dot products take, measured on two
    threads), and no autograd graph to record (grad mode is per thread)."""
    max_rows = max(_SPLIT_MAX_ROWS, lm_head.max_rows if type(lm_head) is RowDotLinear else 1)
    return (_splittable(lm_head) and not torch.is_grad_enabled()
            and hidden.numel() <= max_rows * lm_head.weight.shape[1])


def _splittable(lm_head: nn.Module) -> bool:
    if type(lm_head) not in (nn.Linear, RowDotLinear) or torch.get_num_threads() < 2:
        return False
    weight = lm_head.weight
    return weight.device.type == "cpu" and weight.numel() * weight.element_size() >= _SPLIT_MIN_BYTES


def _two_thread_linear(linear: nn.Linear, pool: ThreadPoolExecutor, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)`, half of the outputs computed on a second thread. For a few rows, a CPU matrix-vector product
    runs on one thread (in MKL whatever torch's thread count; numpy's dot products for a RowDotLinear); two threads
    reading half each read memory faster than one (32000 x 512 float32 LM head: 3.2 -> 2.7 ms column-major,
    docs/benchmarks.md). Each output is the same product of the same row as in one call (bitwise equal in the
    cases measured; BLAS may block a half differently, which changes float rounding order at most). At batch 1 the
    servers are idle meanwhile, so the second core is free; the pool's thread sleeps on a queue between calls (no
    spinning)."""
    half = linear.out_features // 2
    bias = linear.bias
    product = functools.partial(row_dot, max_rows=linear.max_rows) if type(linear) is RowDotLinear else F.linear
    second = pool.submit(_no_grad, product, x, linear.weight[half:], None if bias is None else bias[half:])
    first = product(x, linear.weight[:half], None if bias is None else bias[:half])
    return torch.cat([first, second.result()], dim=-1)


def _no_grad(product, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    with torch.no_grad():  # the caller's grad mode does not reach this thread
        return product(x, weight, bias)


def _lay_out_lm_head(parts: dict[str, nn.Module], spec: FamilySpec, layout: str) -> None:
    """The LM head weight in the layout measured faster for one-token steps (models/layout.py). A tied head stays
    the embeddings' Parameter: the measurement then counts a one-token lookup in it too. A head that decoding will
    run on two threads (_splits) is measured that way."""
    embedding = getattr(parts[spec.embeddings_path], "weight", None)
    lm_head = parts[spec.lm_head_path]
    (parts[spec.lm_head_path],), timings = choose_layouts([lm_head], layout, embedding=embedding,
                                                          split=_splittable(lm_head))
    for timing in timings:
        logger.info("LM head weight layout: %s", timing.describe())


_DEFAULT_NEW_TOKENS = 20  # what transformers generates where neither the call nor the model's config says

_ANY, _NEVER = object(), object()
# transformers' from_pretrained arguments that change nothing here, with the values that keep it so.
_HARMLESS_KWARGS = {
    "low_cpu_mem_usage": _ANY,  # any value: the client always reads only its own parts' tensors
    "trust_remote_code": False,  # Corolla runs no repository code (True is refused below)
    "use_safetensors": True,  # Corolla reads safetensors only (False is refused below)
    "device_map": "cpu",  # the client's parts stay on the CPU; the blocks run on the servers
}
# Those that mean nothing here (or need what Corolla does not do), with why.
_REFUSED_KWARGS = {
    "trust_remote_code": "Corolla runs only the model families it implements (docs/models.md), never a "
                         "repository's own code",
    "use_safetensors": "Corolla reads only *.safetensors checkpoints",
    "device_map": "the decoder blocks run on the servers and the client's embeddings and head stay on the CPU",
    "max_memory": "the decoder blocks run on the servers; the client holds only the embeddings and the head",
    "offload_folder": "the decoder blocks run on the servers; the client holds only the embeddings and the head",
    "quantization_config": "quantization is the servers' choice (`corolla server --quant`)",
    "load_in_8bit": "quantization is the servers' choice (`corolla server --quant int8`)",
    "load_in_4bit": "quantization is the servers' choice (`corolla server --quant`)",
    "attn_implementation": "attention runs on the servers, which pin one implementation per family so every "
                           "peer computes alike",
    "config": "the config is read from the model directory (servers and clients must share it: it is hashed "
              "into the model's id in the swarm)",
    "use_auth_token": "its new name is token=",
    "force_download": "files are fetched once into the Hugging Face cache; remove them there to fetch them again",
    "subfolder": "give the model directory itself",
    "output_loading_info": "the client loads only its own parts; there is no loading info to return",
    "return_unused_kwargs": "unknown keyword arguments are refused, not returned",
    "tp_plan": "the decoder blocks run on the servers, split by blocks, not by tensor parallelism",
}


def _check_transformers_kwargs(kwargs: dict) -> None:
    """Refuse transformers' keyword arguments that mean nothing here, by name and why; unknown ones as Python
    would (never swallowed, so a typo does not go unnoticed)."""
    for name, value in kwargs.items():
        known = name in _HARMLESS_KWARGS or name in _REFUSED_KWARGS
        if known and (value is None or _HARMLESS_KWARGS.get(name, _NEVER) in (_ANY, value)):
            continue  # None is transformers' "not given"
        if name in _REFUSED_KWARGS:
            raise CorollaError(f"from_pretrained({name}={value!r}) is not supported: {_REFUSED_KWARGS[name]}")
        raise TypeError(f"from_pretrained() got an unexpected keyword argument {name!r}")


class AutoDistributedModelForCausalLM:
    """Entry point, shaped like transformers' Auto classes."""

    @staticmethod
    def from_pretrained(model_dir: str | Path, initial_peers: list[str] | tuple[str, ...],
                        dtype: torch.dtype | str | None = None, model_name: str | None = None,
                        client_config: ClientConfig | None = None,
                        network: NetworkConfig | None = None, tuning_mode: str | None = None,
                        pre_seq_len: int = 0, lora: LoraSettings | None = None, tuned: str | Path | None = None,
                        active_adapter: str | None = None, hub_dir: str | Path | None = None,
                        seed: int | None = None, torch_dtype: torch.dtype | str | None = None,
                        **transformers_kwargs) -> DistributedModelForCausalLM:
        """Load the client-side parts of a local model directory, or of a Hugging Face Hub repo id "owner/name"
        (models/hub_source.py: only the shards of those parts, the config and the tokenizer are fetched; transformers'
        `revision`, `cache_dir` (default `hub_dir`), `token` and `local_files_only` apply), and join the swarm
        through `initial_peers`.

        `model_name` must match the servers' (default: the directory's name, or the repo's NAME, as servers
        default to).
        Fine-tuning: `tuning_mode` "ptune" / "deep_ptune" (with `pre_seq_len`) or "lora" (with `lora` settings) adds
        trainable parameters (`seed` for their initialisation); `tuned` loads saved ones (a directory or a repo id
        in the offline hub at `hub_dir`); `active_adapter` uses a LoRA adapter that servers host.

        transformers' names: `torch_dtype` is `dtype`'s old name, `"auto"` the checkpoint's dtype; its other keyword
        arguments are accepted where harmless (_HARMLESS_KWARGS) and refused, saying why, where they mean nothing
        here (_REFUSED_KWARGS).
        """
        hub_options = {name: transformers_kwargs.pop(name) for name in HUB_KWARGS if name in transformers_kwargs}
        _check_transformers_kwargs(transformers_kwargs)
        if torch_dtype is not None:
            if dtype is not None:
                raise CorollaError("from_pretrained got both dtype and torch_dtype (its old name); give one")
            dtype = torch_dtype
        if dtype == "auto":
            dtype = None
        # A directory or a Hub repo id; transformers' cache_dir, when given, wins over hub_dir.
        source = open_model(model_dir, **{"cache_dir": hub_dir, **hub_options})
        identity = swarm_identity(source, model_name)
        config = identity.config
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise CorollaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        dtype = dtype or config_dtype(config)
        if not initial_peers:
            raise CorollaError("initial_peers is empty: give the multiaddr of at least one peer of the swarm")
        client_config = client_config or ClientConfig()
        parts = load_client_parts(source.fetch_client_parts(config), config, dtype)
        _lay_out_lm_head(parts, family_for(config), client_config.weight_layout)
        network = network or NetworkConfig(initial_peers=tuple(initial_peers))
        swarm = SwarmClient(network, identity.model_id, config.num_hidden_layers, client_config)
        try:
            model = DistributedModelForCausalLM(config, parts, swarm)
            model.eval()
            model.name_or_path = str(model_dir)
            model.swarm_name = identity.name
            model.active_adapter = active_adapter
            if tuned is not None:
                model.load_tuning(tuned, hub_dir)
            elif tuning_mode is not None:
                model.enable_tuning(TuningConfig(tuning_mode, pre_seq_len, lora or LoraSettings()), seed=seed)
            try:
                model.generation_config = GenerationConfig.from_pretrained(source.directory)
            except OSError:
                model.generation_config = GenerationConfig.from_model_config(config)
        except BaseException:
            swarm.close()
            raise
        return model
