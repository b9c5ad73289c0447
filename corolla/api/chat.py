"""`corolla chat`: a streaming chat in the terminal, through the same engine and chat template as the API.

Ctrl-C while an answer streams stops that answer (the conversation goes on); Ctrl-C or Ctrl-D at the prompt,
or /exit, ends the chat; /reset forgets the conversation.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from corolla.api.config import ChatOptions  # defined there so that the CLI's parser needs no FastAPI
from corolla.api.engine import ChoiceEnd, TextDelta
from corolla.api.errors import ApiError
from corolla.api.jobs import chat_job
from corolla.api.schemas import ChatCompletionRequest, ChatMessage
from corolla.api.served import ServedModel
from corolla.errors import CorollaError


def run_chat(served: ServedModel, options: ChatOptions, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout) -> None:
    history: list[ChatMessage] = [ChatMessage(role="system", content=options.system)] if options.system else []
    print(f"Chatting with {served.name} through the swarm. /reset forgets the conversation, /exit ends it; "
          f"Ctrl-C stops an answer.", file=out, flush=True)
    while True:
        try:
            line = read("\nYou: ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if options.system else []
            print("(conversation forgotten)", file=out, flush=True)
            continue
        if not line:
            continue
        history.append(ChatMessage(role="user", content=line))
        answer = _answer(served, options, history, out)
        if answer:
            history.append(ChatMessage(role="assistant", content=answer))
        else:
            history.pop()


def _answer(served: ServedModel, options: ChatOptions, history: list[ChatMessage], out: TextIO) -> str:
    request = ChatCompletionRequest(model=served.name, messages=history, max_tokens=options.max_tokens,
                                    temperature=options.temperature, top_p=options.top_p, seed=options.seed)
    print("Assistant: ", end="", file=out, flush=True)
    text, tokens, began, note = "", 0, time.perf_counter(), ""
    try:
        job = chat_job(request, served.tokenizer, served.limits)
        for event in served.engine.stream_sync([job]):
            if isinstance(event, TextDelta):
                text += event.text
                print(event.text, end="", file=out, flush=True)
            elif isinstance(event, ChoiceEnd):
                tokens = event.completion_tokens
                note = " (cut at max_tokens)" if event.finish_reason == "length" else ""
    except KeyboardInterrupt:
        note = " [stopped]"
    except ApiError as e:
        print(f"\nerror: {e.body.message}", file=out, flush=True)
        return ""
    except CorollaError as e:
        print(f"\nerror: {e}", file=out, flush=True)
        return ""
    elapsed = time.perf_counter() - began
    speed = f"; {tokens / elapsed:.1f} tokens/s" if tokens else ""
    print(f"{note}\n  [{tokens} tokens in {elapsed:.1f} s{speed}]", file=out, flush=True)
    return text
