"""API and chat settings: each default is defined here once; `corolla api` and `corolla chat` generate their options
from these fields. Nothing here imports FastAPI, so the CLI builds its parser without the API's dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ApiConfig:
    model: str = field(metadata={"help": "local model directory (config, tokenizer, embeddings and head)",
                                 "positional": True})
    model_name: str | None = field(default=None, metadata={"help": "the model's name in the DHT and in the API "
                                                                   "(default: the directory name)"})
    dtype: str | None = field(default=None, metadata={"help": "client dtype: float32, float16 or bfloat16"})
    host: str = field(default="127.0.0.1", metadata={"help": "HTTP address to listen on"})
    port: int = field(default=8000, metadata={"help": "HTTP port (0 = any free port)"})
    max_concurrent: int = field(default=8, metadata={"help": "generations run at once; more requests wait"})
    default_max_tokens: int = field(default=512, metadata={"help": "chat completion tokens when max_tokens is "
                                                                   "not given"})
    max_n: int = field(default=8, metadata={"help": "most choices (n) per request"})
    max_context: int | None = field(default=None, metadata={"help": "most prompt + completion tokens (default: "
                                                                    "the model's max_position_embeddings)"})
    draft_tokens: int = field(default=0, metadata={"help": "speculative decoding for greedy requests "
                                                           "(temperature 0, n 1): up to this many tokens drafted by "
                                                           "prompt lookup, verified in one round trip (0 = off)"})
    token_timeout: float = field(default=120.0, metadata={"help": "seconds to wait for the next token before "
                                                                  "failing a request"})
    state_ttl: float = field(default=1.0, metadata={"help": "seconds a swarm map is reused between requests"})
    rtt_timeout: float = field(default=2.0, metadata={"help": "seconds to wait for a server's ping reply"})
    state_refresh: float = field(default=2.0, metadata={"help": "seconds between swarm-page refreshes"})


@dataclass(frozen=True)
class ChatOptions:
    system: str | None = field(default=None, metadata={"help": "system prompt (default: the chat template's)"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature; 0 = greedy"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling mass"})
    max_tokens: int = field(default=256, metadata={"help": "most tokens per answer"})
    seed: int | None = field(default=None, metadata={"help": "sampling seed, for repeatable answers"})
