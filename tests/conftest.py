"""Fixtures: tiny random models made locally, and real local swarms (processes on 127.0.0.1, stopped by PID)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from corolla.launch import LocalSwarm  # noqa: E402
from tiny_models import make_tiny_llama  # noqa: E402

LONG = os.environ.get("COROLLA_LONG") == "1"
OUTPUT_DIR = Path(__file__).resolve().parent.parent / "test-output"

# Tests press Ctrl-C (SIGINT) on the demo and servers they start. A shell without job control starts background
# jobs (`make test &` in a script) with SIGINT ignored, and an ignored signal stays ignored in every process
# started from then on, so those Ctrl-Cs would do nothing. A handled signal is reset to the default at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_llama(models_dir) -> Path:
    return make_tiny_llama(models_dir / "tiny-llama", num_layers=5)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    from corolla.models.embedded import ensure_embedded_model

    return ensure_embedded_model(progress=False)


@pytest.fixture
def local_swarm(tmp_path, request):
    """A LocalSwarm whose processes are all stopped at the end of the test."""
    workdir = OUTPUT_DIR / request.node.name.replace("/", "_").replace("[", "_").replace("]", "")
    with LocalSwarm(workdir) as swarm:
        yield swarm


def start_swarm(swarm: LocalSwarm, model: Path, spans: list[tuple[int, int]], extra_args=()) -> list:
    swarm.start_dht()
    return swarm.start_servers(model, spans, ["--num-threads", "1", *extra_args])


def peer_of(process) -> str:
    """A server's peer id, from its "ready: ... as <peer id>" line."""
    return process.log().split("ready: ")[1].split(" as ")[1].split()[0]


@pytest.fixture(scope="module")
def tiny_swarm(tiny_llama, request):
    """Bootstrap peer + 3 servers splitting the tiny Llama's 5 blocks unevenly: 0:2, 2:4, 4:5. The first and last
    keep their linear weights column-major (transposed strides), the middle one multiplies them by rows
    (`rowdot`), so every exactness test also covers those ways, which `auto` picks for some shapes on some CPUs
    (models/layout.py)."""
    with LocalSwarm(OUTPUT_DIR / f"{request.module.__name__}-tiny-swarm") as swarm:
        swarm.start_dht()
        servers = [swarm.start_server(tiny_llama, span, f"server{i}", ["--num-threads", "1", "--weight-layout", way],
                                      wait=False)
                   for i, (span, way) in enumerate([((0, 2), "column"), ((2, 4), "rowdot"), ((4, 5), "column")])]
        for server in servers:
            swarm.wait_for_line(server, "ready:", 180)
        yield swarm


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """The tiny Llama in plain transformers (what swarm results are compared with)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture(scope="module")
def client(tiny_swarm, tiny_llama):
    """A Corolla client of `tiny_swarm`."""
    from corolla import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama, initial_peers=tiny_swarm.initial_peers)
    yield model
    model.close()


def randomize_lora(tuning) -> None:
    """Give a fresh LoRA (B starts at zero) weights whose every gradient and output difference is non-trivial."""
    import torch

    with torch.no_grad():
        for weight in tuning.lora_weights:
            weight.normal_(0, 0.3)


def peft_twin(reference, tuning, settings):
    """Plain peft over a copy of `reference` holding the client's LoRA weights (`tuning`, made with `settings`);
    returns the peft model and its LoRA parameters in the order of `tuning.lora_weights`."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, target_modules=list(settings.target_modules),
                        lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(reference), config).eval()
    named = {name: param for name, param in model.named_parameters() if "lora_" in name}
    params = []
    for index in range(len(tuning.lora_weights)):
        block, rest = divmod(index, 2 * len(tuning.targets))
        path, which = tuning.targets[rest // 2], "AB"[rest % 2]
        params.append(named[f"base_model.model.model.layers.{block}.{path}.lora_{which}.default.weight"])
    with torch.no_grad():
        for theirs, ours in zip(params, tuning.lora_weights):
            theirs.copy_(ours)
    return model, params
