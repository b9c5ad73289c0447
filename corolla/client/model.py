"""A transformers model whose decoder blocks run in the swarm: `AutoDistributedModelForCausalLM`.

Locally it holds only the embeddings, the final norm and the LM head (transformers' own modules, filled with only
their tensors). `generate()` is transformers' own; the attention cache lives on the servers, represented here by
a RemoteSessionCache that tells `generate` how many tokens the servers already hold.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from corolla.client.config import ClientConfig
from corolla.client.remote import InferenceSession, RemoteSequence
from corolla.client.swarm import SwarmClient
from corolla.errors import CorollaError
from corolla.models.checkpoint import DTYPES, config_dtype, load_client_parts, load_config, model_id
from corolla.models.spec import family_for
from corolla.net.node import NetworkConfig


class RemoteSessionCache(Cache):
    """Stands for the attention caches that servers keep for one inference session."""

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

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
        if tokens < 0:
            self.session.position = max(0, self.session.position + tokens)
        elif tokens > 0:  # older transformers: the length to keep
            self.session.position = min(self.session.position, tokens)


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
        self._local = threading.local()  # the active inference session, per calling thread

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
        return self.spec.head(self.config, self._parts_by_path, self.spec, hidden)

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint

    # -- sessions -------------------------------------------------------------------------------------------

    @property
    def active_session(self) -> InferenceSession | None:
        session = getattr(self._local, "session", None)
        return session if session is not None and not session.closed else None

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1):
        """Open a session whose caches live on the servers; `forward` and `generate` inside it continue it."""
        if self.active_session is not None:
            raise CorollaError("an inference session is already active in this thread")
        session = InferenceSession(self.swarm, max_length=max_length, batch_size=batch_size)
        self._local.session = session
        try:
            yield session
        finally:
            self._local.session = None
            session.close()

    # -- forward / generate -----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0, return_dict: bool = True,
                **kwargs) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        session = cache.session if isinstance(cache, RemoteSessionCache) else self.active_session
        if position_ids is None:
            batch, length = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
            offset = session.position if session is not None else 0
            position_ids = torch.arange(offset, offset + length).unsqueeze(0).expand(batch, -1)
        hidden = self.embed(input_ids, inputs_embeds, position_ids)
        mask = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        if session is not None:
            start = session.position
            hidden = session.step(hidden, position_ids=position_ids, attention_mask=mask, start=start)
        else:
            hidden = self.remote.forward(hidden, position_ids=position_ids, attention_mask=mask)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        if kwargs.get("cache") is not None:
            return super().generate(inputs, *args, **kwargs)
        session = self.active_session
        if session is not None:
            return super().generate(inputs, *args, cache=RemoteSessionCache(session), **kwargs)
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
            max_length = config.max_length
        # Speculative decoding verifies drafts past the final length before rolling back to the accepted tokens.
        if kwargs.get("prompt_lookup_num_tokens") or kwargs.get("assistant_model") is not None:
            max_length += (kwargs.get("prompt_lookup_num_tokens") or config.num_assistant_tokens or 20) + 1
        expand = max(kwargs.get("num_beams") or config.num_beams or 1,
                     kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        with self.inference_session(max_length=max_length, batch_size=ids.shape[0] * expand) as session:
            return super().generate(inputs, *args, cache=RemoteSessionCache(session), **kwargs)

    def close(self) -> None:
        self.swarm.close()


class AutoDistributedModelForCausalLM:
    """Entry point, shaped like transformers' Auto classes."""

    @staticmethod
    def from_pretrained(model_dir: str | Path, initial_peers: list[str] | tuple[str, ...],
                        dtype: torch.dtype | str | None = None, model_name: str | None = None,
                        client_config: ClientConfig | None = None,
                        network: NetworkConfig | None = None) -> DistributedModelForCausalLM:
        """Load the client-side parts of a local model directory and join the swarm through `initial_peers`.

        `model_name` must match the servers' (default: the directory's name, as servers default to).
        """
        config = load_config(model_dir)
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise CorollaError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            dtype = DTYPES[dtype]
        dtype = dtype or config_dtype(config)
        if not initial_peers:
            raise CorollaError("initial_peers is empty: give the multiaddr of at least one peer of the swarm")
        parts = load_client_parts(model_dir, config, dtype)
        name = model_name or Path(model_dir).resolve().name
        network = network or NetworkConfig(initial_peers=tuple(initial_peers))
        swarm = SwarmClient(network, model_id(config, name), config.num_hidden_layers, client_config or ClientConfig())
        try:
            model = DistributedModelForCausalLM(config, parts, swarm)
            model.eval()
            try:
                model.generation_config = GenerationConfig.from_pretrained(model_dir)
            except OSError:
                model.generation_config = GenerationConfig.from_model_config(config)
        except BaseException:
            swarm.close()
            raise
        return model
