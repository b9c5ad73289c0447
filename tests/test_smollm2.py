"""The embedded model (SmolLM2-135M-Instruct) through a 3-server swarm equals plain transformers, and the demo
prints a sensible answer."""

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import OUTPUT_DIR, start_swarm
from corolla import AutoDistributedModelForCausalLM
from corolla.launch import LocalSwarm


@pytest.fixture(scope="module")
def smol_swarm(smollm2):
    with LocalSwarm(OUTPUT_DIR / "smollm2-swarm") as swarm:
        start_swarm(swarm, smollm2, [(0, 10), (10, 20), (20, 30)])
        yield swarm


def test_smollm2_swarm_matches_transformers(smol_swarm, smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(smollm2, initial_peers=smol_swarm.initial_peers)
    try:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            assert (model(ids).logits - reference(ids).logits).abs().max() < 1e-4
        got = model.generate(ids, max_new_tokens=20, do_sample=False)
        want = reference.generate(ids, max_new_tokens=20, do_sample=False)
        assert got.tolist() == want.tolist()
        assert "Paris" in tokenizer.decode(got[0, ids.shape[1]:])
    finally:
        model.close()


def test_prompt_lookup_keeps_greedy_output(smol_swarm, smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoDistributedModelForCausalLM.from_pretrained(smollm2, initial_peers=smol_swarm.initial_peers)
    try:
        text = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n"
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        plain = model.generate(ids, max_new_tokens=40, do_sample=False)
        with model.inference_session(max_length=ids.shape[1] + 40 + 11) as session:
            drafted = model.generate(ids, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=10)
            steps = session._step_ids
        assert drafted.tolist() == plain.tolist()
        assert steps < 40  # several tokens were accepted per round trip
    finally:
        model.close()


def test_compressed_wire_formats(smol_swarm, smollm2):
    from corolla.client.config import ClientConfig

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    want = reference.generate(ids, max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        want_logits = reference(ids).logits
    for wire_format, tolerance in (("float16", 0.1), ("int8", 5.0)):  # measured: 0.018 and 2.1 (wire_formats.py)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            smollm2, initial_peers=smol_swarm.initial_peers, client_config=ClientConfig(wire_format=wire_format))
        try:
            with torch.no_grad():
                assert (model(ids).logits - want_logits).abs().max() < tolerance
            if wire_format == "float16":
                assert model.generate(ids, max_new_tokens=20, do_sample=False).tolist() == want.tolist()
        finally:
            model.close()


def test_demo_prints_a_sensible_answer(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "corolla.cli", "demo", "--max-new-tokens", "24", "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.count("served by server") == 3
    assert "tokens/s" in result.stdout and "Done." in result.stdout


def test_finetuning_example_trains_through_the_swarm(smol_swarm, tmp_path):
    """examples/finetune_smollm2.py, shortened, on this swarm: the loss falls, the adapter is saved in PEFT format
    and plain peft gives the swarm's logits (the script checks that and exits non-zero otherwise)."""
    import re
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "examples" / "finetune_smollm2.py"
    result = subprocess.run([sys.executable, str(script), "--steps", "6", "--batch-size", "4", "--eval", "1",
                             "--output", str(tmp_path / "adapter"), "--initial-peers", *smol_swarm.initial_peers],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+);", result.stdout).groups())
    assert last < first - 0.5, result.stdout[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
