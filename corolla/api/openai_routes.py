"""`/v1/models`, `/v1/completions`, `/v1/chat/completions`: the OpenAI API over the served model.

A streamed request answers with server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. The
response starts only once the first token is there, so a request the swarm cannot serve still gets a plain
error with its status code; a failure after that is sent as a last `data: {"error": ...}` event.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi import APIRouter
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from corolla.api.engine import ChoiceEnd, Event, GenerationJob, TextDelta
from corolla.api.errors import api_error
from corolla.api.jobs import chat_job, completion_jobs
from corolla.api.schemas import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
                                 ChatCompletionRequest, ChunkDelta, Completion, CompletionChoice, CompletionRequest,
                                 ErrorResponse, FinishReason, ModelCard, ModelList, Usage)
from corolla.api.served import ServedModel

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 502, 503, 504)}


class _Outcome:
    """What the events of a request add up to: each choice's text and finish reason, and the token counts."""

    def __init__(self, jobs: list[GenerationJob]):
        choices = sum(job.n for job in jobs)
        self.texts = [""] * choices
        self.finish_reasons: list[FinishReason] = ["length"] * choices
        self.prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
        self.completion_tokens = 0

    def add(self, event: Event) -> None:
        if isinstance(event, TextDelta):
            self.texts[event.index] += event.text
        else:
            self.finish_reasons[event.index] = event.finish_reason
            self.completion_tokens += event.completion_tokens

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)


def _sse(chunk: BaseModel) -> bytes:
    return format_sse_event(data_str=chunk.model_dump_json())


async def _stream(events: AsyncIterator[Event], outcome: _Outcome, opening: Iterable[BaseModel],
                  chunks: Callable[[Event], BaseModel],
                  closing: Callable[[], Iterable[BaseModel]]) -> EventSourceResponse:
    """Wait for the first event (errors before it propagate as plain error responses), then stream the rest."""
    iterator = aiter(events)
    first: Event | None = await anext(iterator, None)

    async def body() -> AsyncIterator[bytes]:
        try:
            for chunk in opening:
                yield _sse(chunk)
            if first is not None:
                outcome.add(first)
                yield _sse(chunks(first))
                async for event in iterator:
                    outcome.add(event)
                    yield _sse(chunks(event))
            for chunk in closing():
                yield _sse(chunk)
            yield format_sse_event(data_str="[DONE]")
        except Exception as error:  # the stream already began: report in-band, as OpenAI does
            yield format_sse_event(data_str=api_error(error).sse_data())
        finally:
            await iterator.aclose()  # cancels the generation if the client went away (e.g. a stop button)

    return EventSourceResponse(body(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def openai_router(served: ServedModel) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=served.name, created=served.created)])

    @router.get("/models/{model}", response_model=ModelCard, responses=_ERRORS)
    async def get_model(model: str) -> ModelCard:
        served.check_model(model)
        return ModelCard(id=served.name, created=served.created)

    @router.post("/chat/completions", response_model=ChatCompletion, responses=_ERRORS)
    async def chat_completions(request: ChatCompletionRequest):
        served.check_model(request.model)
        jobs = [chat_job(request, served.tokenizer, served.limits)]
        outcome, ident, created = _Outcome(jobs), f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = served.engine.stream(jobs)
        if not request.stream:
            async for event in events:
                outcome.add(event)
            choices = [ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)
                       for i, (text, reason) in enumerate(zip(outcome.texts, outcome.finish_reasons))]
            return ChatCompletion(id=ident, created=created, model=served.name, choices=choices,
                                  usage=outcome.usage())

        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=ident, created=created, model=served.name, choices=choices, usage=usage)

        def event_chunk(event: Event) -> ChatCompletionChunk:
            if isinstance(event, TextDelta):
                return chunk([ChatChunkChoice(index=event.index, delta=ChunkDelta(content=event.text))])
            return chunk([ChatChunkChoice(index=event.index, delta=ChunkDelta(), finish_reason=event.finish_reason)])

        def closing() -> list[ChatCompletionChunk]:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return [chunk([], outcome.usage())] if include_usage else []

        opening = [chunk([ChatChunkChoice(index=i, delta=ChunkDelta(role="assistant", content=""))])
                   for i in range(len(outcome.texts))]
        return await _stream(events, outcome, opening, event_chunk, closing)

    @router.post("/completions", response_model=Completion, responses=_ERRORS)
    async def completions(request: CompletionRequest):
        served.check_model(request.model)
        jobs = completion_jobs(request, served.tokenizer, served.limits)
        outcome, ident, created = _Outcome(jobs), f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = served.engine.stream(jobs)
        if not request.stream:
            async for event in events:
                outcome.add(event)
            choices = [CompletionChoice(index=i, text=text, finish_reason=reason)
                       for i, (text, reason) in enumerate(zip(outcome.texts, outcome.finish_reasons))]
            return Completion(id=ident, created=created, model=served.name, choices=choices, usage=outcome.usage())

        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> Completion:
            return Completion(id=ident, created=created, model=served.name, choices=choices, usage=usage)

        def event_chunk(event: Event) -> Completion:
            if isinstance(event, ChoiceEnd):
                return chunk([CompletionChoice(index=event.index, text="", finish_reason=event.finish_reason)])
            return chunk([CompletionChoice(index=event.index, text=event.text, finish_reason=None)])

        def closing() -> list[Completion]:
            include_usage = request.stream_options is not None and request.stream_options.include_usage
            return [chunk([], outcome.usage())] if include_usage else []

        return await _stream(events, outcome, [], event_chunk, closing)

    return router
