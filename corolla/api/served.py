"""The model an API app serves: its names, token limits, generation engine, and a cached view of its swarm."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from corolla.api.config import ApiConfig
from corolla.api.engine import Engine
from corolla.api.errors import ApiError
from corolla.api.jobs import Limits
from corolla.api.state import SwarmState, collect_state
from corolla.client.config import ClientConfig
from corolla.client.model import AutoDistributedModelForCausalLM, DistributedModelForCausalLM
from corolla.client.swarm import SwarmClient
from corolla.errors import NotAModelError
from corolla.net.node import NetworkConfig


class SwarmMonitor:
    """The swarm map, read through the client's own peer and reused for `ttl` seconds (many pages may poll)."""

    def __init__(self, swarm: SwarmClient, model: str, ttl: float, rtt_timeout: float):
        self.swarm, self.model, self.ttl, self.rtt_timeout = swarm, model, ttl, rtt_timeout
        self._lock = asyncio.Lock()
        self._state: SwarmState | None = None
        self._read_at = -float("inf")

    async def state(self) -> SwarmState:
        async with self._lock:
            if self._state is None or time.monotonic() - self._read_at > self.ttl:
                coroutine = collect_state(self.swarm.node, self.model, self.swarm.model_id, self.swarm.num_blocks,
                                          self.rtt_timeout)
                timeout = 10 + 2 * self.rtt_timeout
                try:
                    self._state = await asyncio.to_thread(self.swarm.call, coroutine, timeout)
                except TimeoutError:
                    raise ApiError(504, f"reading the swarm map took more than {timeout:.0f} s",
                                   type="server_error", code="timeout") from None
                self._read_at = time.monotonic()
            return self._state


@dataclass
class ServedModel:
    name: str  # what clients pass as `model`
    engine: Engine
    limits: Limits
    monitor: SwarmMonitor
    created: int  # unix time the API started serving it

    @property
    def model(self) -> DistributedModelForCausalLM:
        return self.engine.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def check_model(self, requested: str) -> None:
        if requested not in (self.name, self.model.swarm.model_id):
            raise ApiError(404, f"the model {requested!r} does not exist here; this server serves {self.name!r} "
                                f"(see GET /v1/models)", param="model", code="model_not_found")

    @classmethod
    def create(cls, model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase, name: str,
               config: ApiConfig) -> "ServedModel":
        context = config.max_context or getattr(model.config, "max_position_embeddings", None) or 2048
        limits = Limits(context_length=context, default_max_tokens=config.default_max_tokens, max_n=config.max_n)
        engine = Engine(model, tokenizer, max_concurrent=config.max_concurrent, token_timeout=config.token_timeout,
                        draft_tokens=config.draft_tokens)
        monitor = SwarmMonitor(model.swarm, name, config.state_ttl, config.rtt_timeout)
        return cls(name=name, engine=engine, limits=limits, monitor=monitor, created=int(time.time()))

    def close(self) -> None:
        """Stop the engine (the model is closed by whoever loaded it)."""
        self.engine.close()


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError) as e:
        raise NotAModelError(f"{str(model_dir)!r} has no usable tokenizer ({e}); the API needs tokenizer files "
                             f"(tokenizer.json or the like) next to config.json") from e


def load_model(config: ApiConfig, network: NetworkConfig,
               client: ClientConfig | None = None) -> tuple[DistributedModelForCausalLM, PreTrainedTokenizerBase, str]:
    """The client model joined to the swarm, its tokenizer, and the name it is served under."""
    tokenizer = load_tokenizer(config.model)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        config.model, initial_peers=network.initial_peers, dtype=config.dtype, model_name=config.model_name,
        client_config=client, network=network)
    return model, tokenizer, model.swarm_name  # --model-name, else the name the servers announce
