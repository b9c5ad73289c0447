"""Runs generation jobs on a swarm-served model and streams what they produce.

Each job runs in a worker thread of its own (the client model keeps one inference session per thread), so
requests are served concurrently: their steps interleave on the swarm. A job is one prompt sampled `n` times as
one batch of n rows in one inference session. Workers report through `emit` callbacks; two thin consumers turn
those into an async iterator (the HTTP API) or a blocking one (the terminal chat). Every wait is bounded by
`token_timeout`, and closing a consumer early cancels its jobs at the next token.

With `draft_tokens`, a greedy job of one choice decodes speculatively: each round trip feeds the chosen token with
a prompt-lookup draft (client/drafting.py) and keeps the draft tokens that greedy decoding picks itself, then the
session rolls back over the rest; the text is the same as without drafts.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from corolla.api.detokenize import ChoiceText, FinishReason
from corolla.api.errors import GenerationTimeout
from corolla.api.sampling import SamplingParams, next_tokens
from corolla.client.drafting import NgramDrafter
from corolla.client.model import DistributedModelForCausalLM

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationJob:
    prompt_ids: tuple[int, ...]  # the tokenized prompt (chat template already applied)
    max_new_tokens: int  # most tokens per choice
    n: int  # choices sampled from this prompt
    sampling: SamplingParams
    stops: tuple[str, ...] = ()  # stop sequences (not included in the text)


@dataclass(frozen=True)
class TextDelta:
    index: int  # choice index over all jobs of a request
    text: str


@dataclass(frozen=True)
class ChoiceEnd:
    index: int
    finish_reason: FinishReason
    completion_tokens: int  # tokens generated for this choice (EOS included)


Event = TextDelta | ChoiceEnd


@dataclass(frozen=True)
class _JobFailed:
    error: BaseException


@dataclass(frozen=True)
class _JobDone:
    pass


class Engine:
    """A model served by the swarm + its tokenizer, running generation jobs in worker threads."""

    def __init__(self, model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase,
                 max_concurrent: int = 8, token_timeout: float = 120.0, draft_tokens: int = 0):
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be 0 (off) or more, got {draft_tokens}")
        self.model, self.tokenizer, self.token_timeout = model, tokenizer, token_timeout
        self.draft_tokens = draft_tokens
        self.steps = 0  # round trips through the swarm, of all jobs (prefills included)
        self.drafted_steps = 0  # those that fed a draft
        self.eos_ids = _eos_ids(model, tokenizer)
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="corolla-generate")

    def close(self) -> None:
        """Stop taking jobs (running ones end at their next token once their consumer is closed)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- consumers --------------------------------------------------------------------------------------------

    async def stream(self, jobs: list[GenerationJob]) -> AsyncIterator[Event]:
        """Events of all jobs as they come; raises the first job's error. Closing it early cancels the jobs."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the loop is gone: nobody is listening any more
                pass

        cancelled = self._start(jobs, emit)
        try:
            for _ in range(len(jobs)):
                while True:
                    try:
                        event = await asyncio.wait_for(events.get(), self.token_timeout)
                    except TimeoutError:
                        raise self._timeout() from None
                    if isinstance(event, _JobDone):
                        break
                    if isinstance(event, _JobFailed):
                        raise event.error
                    yield event
        finally:
            cancelled.set()

    def stream_sync(self, jobs: list[GenerationJob]) -> Iterator[Event]:
        """Like `stream`, for synchronous callers (a KeyboardInterrupt while waiting cancels the jobs)."""
        events: queue.Queue = queue.Queue()
        cancelled = self._start(jobs, events.put)
        try:
            for _ in range(len(jobs)):
                while True:
                    try:
                        event = events.get(timeout=self.token_timeout)
                    except queue.Empty:
                        raise self._timeout() from None
                    if isinstance(event, _JobDone):
                        break
                    if isinstance(event, _JobFailed):
                        raise event.error
                    yield event
        finally:
            cancelled.set()

    def _timeout(self) -> GenerationTimeout:
        return GenerationTimeout(f"no token within {self.token_timeout:.0f} s (the API's token_timeout): the swarm "
                                 f"is overloaded or a server hangs")

    # ---- workers ----------------------------------------------------------------------------------------------

    def _start(self, jobs: list[GenerationJob], emit: Callable[[object], None]) -> threading.Event:
        cancelled = threading.Event()
        offset = 0
        for job in jobs:
            self._pool.submit(self._run_guarded, job, offset, emit, cancelled)
            offset += job.n
        return cancelled

    def _run_guarded(self, job: GenerationJob, offset: int, emit, cancelled: threading.Event) -> None:
        try:
            if not cancelled.is_set():
                self._run(job, offset, emit, cancelled)
        except BaseException as error:  # reported to the consumer, which raises it in its own context
            emit(_JobFailed(error))
        finally:
            emit(_JobDone())

    def _run(self, job: GenerationJob, offset: int, emit, cancelled: threading.Event) -> None:
        if self.draft_tokens and job.n == 1 and job.sampling.temperature == 0:
            return self._run_drafted(job, offset, emit, cancelled)
        choices = [ChoiceText(self.tokenizer, job.stops, self.eos_ids) for _ in range(job.n)]
        generator = job.sampling.generator()
        max_length = len(job.prompt_ids) + job.max_new_tokens
        with torch.no_grad(), self.model.inference_session(max_length=max_length, batch_size=job.n):
            ids = torch.tensor([list(job.prompt_ids)] * job.n, dtype=torch.long)
            logits = self.model(ids, logits_to_keep=1).logits[:, -1, :]
            self.steps += 1
            for step in range(job.max_new_tokens):
                if cancelled.is_set():
                    _log_cancelled(step, job.max_new_tokens)
                    return
                tokens = next_tokens(logits, job.sampling, generator)
                for row, (choice, token) in enumerate(zip(choices, tokens.tolist())):
                    if choice.finish_reason is None:
                        _push(choice, token, offset + row, job.max_new_tokens, emit)
                if all(choice.finish_reason is not None for choice in choices):
                    return
                logits = self.model(tokens.unsqueeze(1)).logits[:, -1, :]
                self.steps += 1

    def _run_drafted(self, job: GenerationJob, offset: int, emit, cancelled: threading.Event) -> None:
        """A greedy job of one choice, speculatively: each step feeds the chosen token and a draft of what may
        follow it, and keeps the draft's tokens up to the first one that greedy decoding would not choose."""
        choice = ChoiceText(self.tokenizer, job.stops, self.eos_ids)
        max_length = len(job.prompt_ids) + job.max_new_tokens
        drafter = NgramDrafter(self.draft_tokens, max_length, torch.tensor(sorted(self.eos_ids)))
        text = list(job.prompt_ids)
        with torch.no_grad(), self.model.inference_session(max_length=max_length) as session:
            logits = self.model(torch.tensor([text]), logits_to_keep=1).logits[0, -1]
            self.steps += 1
            chosen = [int(logits.argmax())]
            while True:
                for token in chosen:  # every chosen token is the greedy one after the tokens before it
                    if _push(choice, token, offset, job.max_new_tokens, emit):
                        return
                if cancelled.is_set():
                    _log_cancelled(choice.num_tokens, job.max_new_tokens)
                    return
                text += chosen
                # The last chosen token is not in the servers' caches yet: it goes first, the draft after it.
                room = job.max_new_tokens - choice.num_tokens - 1
                draft = drafter.draft(text, min(self.draft_tokens, room)) if room > 0 else []
                fed = [text[-1], *draft]
                logits = self.model(torch.tensor([fed])).logits[0]
                picks = logits.argmax(dim=-1).tolist()  # picks[i]: the greedy token after fed[:i + 1]
                accepted = 0
                while accepted < len(draft) and picks[accepted] == draft[accepted]:
                    accepted += 1
                session.rollback_to(session.position - (len(draft) - accepted))  # drop the rejected draft tokens
                self.steps += 1
                self.drafted_steps += bool(draft)
                chosen = draft[:accepted] + [picks[accepted]]


def _push(choice: ChoiceText, token: int, index: int, max_new_tokens: int, emit) -> bool:
    """Add a chosen token to an unfinished choice and emit the text it completes (and the choice's end, when it
    ends here: on EOS, on a stop sequence, or at `max_new_tokens`); True when the choice has ended."""
    text = choice.push(token)
    if choice.finish_reason is None and choice.num_tokens == max_new_tokens:
        text += choice.finish("length")
    if text:
        emit(TextDelta(index, text))
    if choice.finish_reason is None:
        return False
    emit(ChoiceEnd(index, choice.finish_reason, choice.num_tokens))
    return True


def _log_cancelled(tokens: int, max_new_tokens: int) -> None:
    logger.info("generation cancelled after %d of at most %d tokens (the client went away or stopped it); its "
                "inference session is closed", tokens, max_new_tokens)


def _eos_ids(model: DistributedModelForCausalLM, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Tokens that end a choice: the generation config's EOS (one or several) and the tokenizer's."""
    ids: set[int] = set()
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
