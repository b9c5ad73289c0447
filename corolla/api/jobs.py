"""OpenAI requests -> generation jobs: the chat template, tokenization, and the token-count limits.

Everything a request can get wrong about its content (no chat template, empty prompt, too many tokens, n too
large) is found here, before any work starts on the swarm, and raised as an ApiError naming the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from corolla.api.engine import GenerationJob
from corolla.api.errors import ApiError
from corolla.api.sampling import SamplingParams
from corolla.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingRequest

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass(frozen=True)
class Limits:
    context_length: int  # most prompt + completion tokens per choice
    default_max_tokens: int  # chat completions without max_tokens
    max_n: int  # most choices per request


def chat_job(request: ChatCompletionRequest, tokenizer: PreTrainedTokenizerBase, limits: Limits) -> GenerationJob:
    if not tokenizer.chat_template:
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions with a plain prompt",
                       param="messages", code="no_chat_template")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in request.messages]
    try:
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    except Exception as e:  # the template itself may reject a conversation (e.g. roles out of order)
        raise ApiError(400, f"the model's chat template rejected these messages: {e}", param="messages",
                       code="invalid_messages") from e
    prompt_ids = tuple(int(i) for i in encoded["input_ids"])
    max_tokens = request.max_completion_tokens or request.max_tokens
    return _job(request, prompt_ids, max_tokens, limits.default_max_tokens, "messages", limits)


def completion_jobs(request: CompletionRequest, tokenizer: PreTrainedTokenizerBase,
                    limits: Limits) -> list[GenerationJob]:
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if len(prompts) * request.n > limits.max_n:
        raise ApiError(400, f"{len(prompts)} prompts x n={request.n} asks for {len(prompts) * request.n} choices; "
                            f"this server allows at most {limits.max_n} per request", param="n",
                       code="too_many_choices")
    jobs = []
    for prompt in prompts:
        prompt_ids = tuple(int(i) for i in tokenizer(prompt)["input_ids"])
        jobs.append(_job(request, prompt_ids, request.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt", limits))
    return jobs


def _job(request: SamplingRequest, prompt_ids: tuple[int, ...], max_tokens: int | None, default_max_tokens: int,
         prompt_param: str, limits: Limits) -> GenerationJob:
    if request.n > limits.max_n:
        raise ApiError(400, f"n={request.n} exceeds this server's limit of {limits.max_n} choices per request",
                       param="n", code="too_many_choices")
    if not prompt_ids:
        raise ApiError(400, f"the {prompt_param} tokenize to nothing: give at least one token", param=prompt_param,
                       code="empty_prompt")
    room = limits.context_length - len(prompt_ids)
    if max_tokens is None:
        if room < 1:
            raise _too_long(limits, len(prompt_ids), 1, prompt_param)
        max_tokens = min(default_max_tokens, room)
    elif max_tokens > room:
        raise _too_long(limits, len(prompt_ids), max_tokens, prompt_param)
    sampling = SamplingParams(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
    return GenerationJob(prompt_ids=prompt_ids, max_new_tokens=max_tokens, n=request.n, sampling=sampling,
                         stops=request.stops())


def _too_long(limits: Limits, prompt_tokens: int, max_tokens: int, prompt_param: str) -> ApiError:
    return ApiError(
        400,
        f"this model's maximum context length is {limits.context_length} tokens, but {prompt_tokens + max_tokens} "
        f"were requested ({prompt_tokens} in the {prompt_param}, {max_tokens} for the completion); shorten the "
        f"{prompt_param} or lower max_tokens",
        param="max_tokens" if prompt_tokens < limits.context_length else prompt_param,
        code="context_length_exceeded",
    )
