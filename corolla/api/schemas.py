"""The OpenAI API shapes Corolla serves, as typed pydantic models (requests validated once, at the boundary).

Requests forbid unknown fields, so an unsupported OpenAI parameter (e.g. `logprobs`) is answered with a 400
naming it instead of being silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

_MAX_STOPS = 4  # as OpenAI

StopField = Annotated[
    str | Annotated[list[str], Field(max_length=_MAX_STOPS)] | None,
    Field(description=f"up to {_MAX_STOPS} strings; generation ends before the first one produced"),
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


# ---- requests -------------------------------------------------------------------------------------------------

class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts (joined)")
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = Field(default=False, description="send one last chunk with the usage and no choices")


class SamplingRequest(_Request):
    model: str = Field(description="a name from GET /v1/models")
    max_tokens: int | None = Field(default=None, ge=1, description="most tokens to generate per choice")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="nucleus sampling mass")
    n: int = Field(default=1, ge=1, description="choices per prompt")
    stop: StopField = None
    seed: int | None = Field(default=None, ge=0, description="same seed and request -> same output")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted and ignored (OpenAI end-user id)")

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="newer name of max_tokens")


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(description="one prompt or a list of prompts")


# ---- responses ------------------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length"]


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="unix time, seconds")
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Response):
    """Also the shape of each streamed completion chunk (as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "corolla"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(_Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Response):
    error: ErrorBody
