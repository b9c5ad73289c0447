"""The OpenAI-compatible API against a live local swarm of SmolLM2 (3 server processes + `corolla api` as a
process), with the official `openai` package as the client. Expected texts come from plain transformers'
greedy decoding of the same model, never from constants."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import OUTPUT_DIR, start_swarm
from corolla.launch import LocalSwarm, split_blocks
from corolla.models.checkpoint import load_config

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


# ---- fixtures: one swarm, one API process, one reference model for the whole module ---------------------------

@pytest.fixture(scope="module")
def api_swarm(smollm2):
    with LocalSwarm(OUTPUT_DIR / "api-swarm") as swarm:
        start_swarm(swarm, smollm2, split_blocks(load_config(smollm2).num_hidden_layers, 3))
        yield swarm


class ApiProcess:
    """`corolla api` as a child process (its own process group), stopped by PID with SIGTERM."""

    def __init__(self, args: list[str], log_path: Path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.popen = subprocess.Popen([sys.executable, "-m", "corolla.cli", *args], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_for_url(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("API ready: "):
                    return line.split()[2].removesuffix("/v1")
            if self.popen.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"`corolla api` did not start; its log:\n{self.log_path.read_text(errors='replace')}")

    def stop(self, timeout: float = 20) -> int | None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # whatever is left of its group (its p2p daemon)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None


@pytest.fixture(scope="module")
def api_url(api_swarm, smollm2):
    # Speculative decoding on: every greedy request of one choice below goes through drafted steps.
    process = ApiProcess(["api", str(smollm2), "--initial-peers", *api_swarm.initial_peers, "--port", "0",
                          "--draft-tokens", "6"], api_swarm.workdir / "api.log")
    try:
        yield process.wait_for_url(timeout=120)
    finally:
        code = process.stop()
    assert code == 0, f"`corolla api` exited with {code} on SIGTERM; log in {process.log_path}"


@pytest.fixture(scope="module")
def client(api_url):
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_name(smollm2):
    return smollm2.resolve().name


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def reference(smollm2, tokenizer):
    """Greedy decoding with plain transformers: prompt ids -> (new token ids, text)."""
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()

    def greedy(prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], str]:
        with torch.no_grad():
            output = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
        new = output[0, len(prompt_ids):].tolist()
        return new, tokenizer.decode(new, skip_special_tokens=True)

    return greedy


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"])


# ---- the API ----------------------------------------------------------------------------------------------

def test_models_lists_the_served_model(client, model_name, api_url):
    assert [model.id for model in client.models.list()] == [model_name]
    assert client.models.retrieve(model_name).owned_by == "corolla"
    paths = httpx.get(f"{api_url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions", "/api/v1/state"} <= set(paths)


def test_chat_completion_equals_transformers_greedy(client, model_name, tokenizer, reference):
    prompt_ids = chat_ids(tokenizer, QUESTION)
    want_ids, want_text = reference(prompt_ids, 24)
    response = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0, max_tokens=24)
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want_text
    assert "Paris" in choice.message.content
    assert choice.finish_reason == ("stop" if want_ids[-1] == tokenizer.eos_token_id else "length")
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.completion_tokens == len(want_ids)
    assert response.usage.total_tokens == len(prompt_ids) + len(want_ids)
    assert response.model == model_name and response.id.startswith("chatcmpl-")


def test_streaming_chat_completion_streams_the_same_answer(client, model_name):
    whole = client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0, max_tokens=24)
    chunks = list(client.chat.completions.create(model=model_name, messages=QUESTION, temperature=0, max_tokens=24,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer came in one piece: not streamed"
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completion_max_tokens_and_stop(client, model_name, tokenizer, reference):
    prompt = "The capital of France is"
    want_ids, want_text = reference(tokenizer(prompt)["input_ids"], 12)
    response = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=12)
    assert response.choices[0].text == want_text
    assert response.usage.completion_tokens == len(want_ids)
    if len(want_ids) == 12 and want_ids[-1] != tokenizer.eos_token_id:
        assert response.choices[0].finish_reason == "length"

    streamed = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want_text

    words = want_text.split()
    stop = words[len(words) // 2]  # a word from the middle of the answer: generation must end just before it
    stopped = client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=12, stop=[stop])
    assert stopped.choices[0].text == want_text[:want_text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_drafted_greedy_jobs_equal_transformers_in_fewer_round_trips(api_swarm, smollm2, tokenizer, reference):
    from corolla import AutoDistributedModelForCausalLM
    from corolla.api.engine import Engine, GenerationJob, TextDelta
    from corolla.api.sampling import SamplingParams

    model = AutoDistributedModelForCausalLM.from_pretrained(smollm2, initial_peers=api_swarm.initial_peers)
    engine = Engine(model, tokenizer, draft_tokens=6)
    try:
        prompt_ids = tokenizer("Monday: 9:00 standup, 10:00 review\nTuesday: 9:00 standup, 10:00 review\n"
                               "Wednesday:")["input_ids"]
        want_ids, want_text = reference(prompt_ids, 40)
        job = GenerationJob(prompt_ids=tuple(prompt_ids), max_new_tokens=40, n=1,
                            sampling=SamplingParams(temperature=0))
        events = list(engine.stream_sync([job]))
        assert "".join(event.text for event in events if isinstance(event, TextDelta)) == want_text
        assert events[-1].completion_tokens == len(want_ids)
        assert 0 < engine.drafted_steps and engine.steps < len(want_ids)  # several tokens per round trip
    finally:
        engine.close()
        model.close()


def test_seed_makes_n_samples_repeatable(client, model_name):
    def sample(seed: int):
        return client.chat.completions.create(model=model_name, messages=QUESTION, temperature=1.0, top_p=0.9,
                                              max_tokens=10, n=3, seed=seed)

    first, again = sample(1234), sample(1234)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert all(c.message.content for c in first.choices)
    assert first.usage.prompt_tokens == again.usage.prompt_tokens  # the prompt counts once, not n times
    assert first.usage.completion_tokens <= 3 * 10


def test_concurrent_requests_are_served_concurrently(client, model_name):
    def token_times(prompt: str) -> list[float]:
        times = []
        for chunk in client.completions.create(model=model_name, prompt=prompt, temperature=0, max_tokens=24,
                                               stream=True):
            if chunk.choices and chunk.choices[0].text:
                times.append(time.monotonic())
        return times

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(token_times, ["1, 2, 3, 4, 5,", "10, 11, 12, 13, 14,"])
    assert len(a) >= 10 and len(b) >= 10
    # One at a time, one stream's first token would come after the other's last token.
    assert a[0] < b[-1] and b[0] < a[-1], "the two streams did not overlap"


def test_closing_a_stream_cancels_its_generation(client, model_name, api_swarm):
    log = api_swarm.workdir / "api.log"
    before = log.read_text().count("generation cancelled")
    story = [{"role": "user", "content": "Tell a long story."}]
    stream = client.chat.completions.create(model=model_name, messages=story, temperature=0, max_tokens=400,
                                            stream=True)
    received = [chunk for _, chunk in zip(range(3), stream)]
    stream.close()  # what a browser's stop button does: the connection goes away
    assert len(received) == 3
    wait_until(lambda: log.read_text().count("generation cancelled") > before, 30, "the API to cancel the job")


def test_errors_have_the_openai_shape_and_status(client, api_url, model_name):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert error.value.code == "model_not_found" and "no-such-model" in error.value.message

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=10_000_000)
    assert error.value.code == "context_length_exceeded" and error.value.param == "max_tokens"
    assert "10000000" in error.value.message

    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_name, prompt="hi", temperature=7)
    assert error.value.param == "temperature" and "7" in error.value.message

    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model_name, messages=QUESTION, extra_body={"logprobs": True})
    assert "unsupported parameter 'logprobs'" in error.value.message

    with pytest.raises(openai.BadRequestError) as error:  # a streamed request fails before the stream starts
        client.chat.completions.create(model=model_name, messages=[], stream=True)
    assert error.value.param == "messages"

    bad = httpx.post(f"{api_url}/v1/chat/completions", content=b'{"model": ', timeout=30,
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error" and bad.json()["error"]["code"] == "invalid_json"
    assert "not valid JSON" in bad.json()["error"]["message"]


def test_swarm_that_cannot_serve_answers_503(api_swarm, smollm2):
    """An API for a model no server announces (same files, another DHT name): the swarm cannot serve it."""
    from corolla.api.app import ApiServer, create_app
    from corolla.api.config import ApiConfig
    from corolla.api.served import ServedModel, load_model
    from corolla.client.config import ClientConfig
    from corolla.net.node import NetworkConfig

    num_blocks = load_config(smollm2).num_hidden_layers
    config = ApiConfig(model=str(smollm2), model_name="not-served-anywhere", port=0)
    model, tokenizer, name = load_model(config, NetworkConfig(initial_peers=tuple(api_swarm.initial_peers)),
                                        ClientConfig(missing_blocks_wait=1.0))
    served = ServedModel.create(model, tokenizer, name, config)
    try:
        with ApiServer(create_app(served), port=0) as server:
            unserved = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as error:
                    unserved.chat.completions.create(model=name, messages=QUESTION, max_tokens=4, stream=stream)
                assert error.value.status_code == 503 and error.value.code == "blocks_unavailable"
                assert f"blocks 0..{num_blocks - 1}" in error.value.message
            state = httpx.get(f"{server.url}/api/v1/state", timeout=30).json()
            assert state["covered_blocks"] == 0 and state["missing"] == [[0, num_blocks]]
    finally:
        served.close()
        model.close()


# ---- the swarm map, `corolla health` and `corolla chat` -----------------------------------------------------

def test_state_endpoint_and_health_command_show_the_same_swarm(api_url, api_swarm, smollm2):
    num_blocks = load_config(smollm2).num_hidden_layers
    state = httpx.get(f"{api_url}/api/v1/state", timeout=30).json()
    assert state["num_blocks"] == num_blocks and state["covered_blocks"] == num_blocks and state["missing"] == []
    spans = sorted((s["start_block"], s["end_block"]) for s in state["servers"])
    assert spans == split_blocks(num_blocks, 3)
    for server in state["servers"]:
        assert server["state"] == "online" and server["rtt_ms"] is not None and server["rtt_ms"] > 0
        assert server["throughput"] > 0 and server["cache_tokens_left"] > 0 and server["version"]
    assert all(len(block["servers"]) == 1 for block in state["blocks"])

    peers = ["--initial-peers", *api_swarm.initial_peers]
    result = subprocess.run([sys.executable, "-m", "corolla.cli", "health", str(smollm2), *peers, "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    health = json.loads(result.stdout)
    assert {k: health[k] for k in ("model", "model_id", "num_blocks", "covered_blocks", "missing")} == \
           {k: state[k] for k in ("model", "model_id", "num_blocks", "covered_blocks", "missing")}
    assert sorted(s["peer_id"] for s in health["servers"]) == sorted(s["peer_id"] for s in state["servers"])

    # Drawn for a terminal, for a model no server announces: every block is reported missing, exit code 1.
    drawn = subprocess.run([sys.executable, "-m", "corolla.cli", "health", str(smollm2), *peers,
                            "--model-name", "not-served-anywhere"], capture_output=True, text=True, timeout=120)
    assert drawn.returncode == 1, drawn.stderr
    assert f"0/{num_blocks} blocks served; NOT served: 0..{num_blocks - 1}" in drawn.stdout


def test_terminal_chat_streams_an_answer(api_swarm, smollm2, tokenizer, reference):
    _, want_text = reference(chat_ids(tokenizer, QUESTION), 24)
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "chat", str(smollm2), "--initial-peers", *api_swarm.initial_peers,
         "--temperature", "0", "--max-tokens", "24"],
        input=QUESTION[0]["content"] + "\n/exit\n", capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Assistant: {want_text}" in result.stdout
    assert "tokens/s" in result.stdout
