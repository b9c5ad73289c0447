"""The offline hub: a plain-peft LoRA adapter pushed to a Hugging Face-layout hub directory loads back, offline,
with plain peft in another process, and gives the same logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from corolla.hub import HubError, default_hub_dir, push, resolve
from tiny_models import make_tiny_llama

# peft's get_peft_model calls a transformers method that transformers deprecates (not ours to fix).
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

REPO_ID = "alice/tiny-lora"
INPUT_IDS = [[1, 17, 42, 99, 250, 7, 3]]

# Run in a fresh process with HF_HUB_CACHE and HF_HUB_OFFLINE set: plain transformers + peft, no corolla.
LOAD_FROM_HUB = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    logits = model(torch.tensor({ids})).logits
torch.save(logits, sys.argv[3])
""".format(ids=INPUT_IDS)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(base model dir, adapter dir, logits of the peft model on INPUT_IDS)."""
    root = tmp_path_factory.mktemp("hub-models")
    base_dir = make_tiny_llama(root / "base", num_layers=2)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # zero at init: randomize so the adapter changes the output
                param.normal_(0, 0.5)
    model.eval()
    adapter_dir = root / "adapter"
    model.save_pretrained(adapter_dir)
    with torch.no_grad():
        logits = model(torch.tensor(INPUT_IDS)).logits
    return base_dir, adapter_dir, logits


def test_push_resolve_and_load_offline_with_plain_peft(lora, tmp_path):
    base_dir, adapter_dir, expected = lora
    hub = tmp_path / "hub"
    snapshot = push(adapter_dir, REPO_ID, hub_dir=hub)

    repo = hub / "models--alice--tiny-lora"
    assert snapshot.parent == repo / "snapshots" and len(snapshot.name) == 40
    assert (repo / "refs" / "main").read_text() == snapshot.name
    assert resolve(REPO_ID, hub_dir=hub) == snapshot
    assert _files(snapshot) == _files(adapter_dir)
    assert all(p.is_symlink() and p.resolve().parent == (repo / "blobs").resolve()
               for p in snapshot.rglob("*") if not p.is_dir())
    assert resolve(str(adapter_dir), hub_dir=hub) == adapter_dir  # a local directory is returned as is
    assert push(adapter_dir, REPO_ID, hub_dir=hub) == snapshot  # same files, same commit

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_CACHE=str(hub), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = tmp_path / "logits.pt"
    result = subprocess.run([sys.executable, "-c", LOAD_FROM_HUB, str(base_dir), REPO_ID, str(out)],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    logits = torch.load(out)
    base_logits = LlamaForCausalLM.from_pretrained(base_dir).eval()(torch.tensor(INPUT_IDS)).logits
    assert not torch.allclose(expected, base_logits, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_push_again_moves_the_ref(tmp_path):
    hub, local = tmp_path / "hub", tmp_path / "adapter"
    (local / "sub").mkdir(parents=True)
    (local / "adapter_config.json").write_text('{"r": 4}')
    (local / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    first = push(local, REPO_ID, hub_dir=hub)
    (local / "adapter_config.json").write_text('{"r": 8}')
    second = push(local, REPO_ID, hub_dir=hub)

    repo = hub / "models--alice--tiny-lora"
    assert first != second and first.is_dir() and second.is_dir()
    assert (repo / "refs" / "main").read_text() == second.name
    assert resolve(REPO_ID, hub_dir=hub) == second
    assert (second / "adapter_config.json").read_text() == '{"r": 8}'
    assert (first / "adapter_config.json").read_text() == '{"r": 4}'  # older snapshots stay
    assert (second / "sub" / "weights.bin").read_bytes() == b"\x00" * 10
    assert len(list((repo / "blobs").iterdir())) == 3  # the unchanged file is stored once
    assert resolve(REPO_ID, hub_dir=hub, revision=first.name) == first  # a commit hash as the revision

    third = push(local, REPO_ID, hub_dir=hub, revision="dev")
    assert third == second and (repo / "refs" / "dev").read_text() == second.name


@pytest.mark.parametrize("bad", ["tiny-lora", "a/b/c", "/name", "owner/", "alice/tiny--lora", "alice/-x",
                                 "al ice/x", "alice/x.", "../x"])
def test_bad_repo_ids(bad, tmp_path):
    local = tmp_path / "adapter"
    local.mkdir()
    (local / "f.txt").write_text("x")
    with pytest.raises(HubError, match=f"repo id '{bad}'".replace(".", r"\.").replace("-", r"\-")):
        push(local, bad, hub_dir=tmp_path / "hub")
    with pytest.raises(HubError, match="neither a local directory nor a valid repo id"):
        resolve(bad, hub_dir=tmp_path / "hub")


def test_missing_things_are_named(tmp_path):
    hub = tmp_path / "hub"
    with pytest.raises(HubError, match=f"repo bob/nothing is not in the hub {hub}"):
        resolve("bob/nothing", hub_dir=hub)
    local = tmp_path / "adapter"
    local.mkdir()
    with pytest.raises(HubError, match="holds no files"):
        push(local, REPO_ID, hub_dir=hub)
    with pytest.raises(HubError, match="not a directory"):
        push(tmp_path / "absent", REPO_ID, hub_dir=hub)
    (local / "f.txt").write_text("x")
    push(local, REPO_ID, hub_dir=hub)
    with pytest.raises(HubError, match=r"no revision 'v2' \(revisions: main\)"):
        resolve(REPO_ID, hub_dir=hub, revision="v2")
    with pytest.raises(HubError, match="revision '../x'"):
        push(local, REPO_ID, hub_dir=hub, revision="../x")


def test_default_hub_dir(monkeypatch, tmp_path):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert default_hub_dir() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert default_hub_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert default_hub_dir() == tmp_path / "cache"


def test_cli_push(tmp_path, capsys):
    local, hub = tmp_path / "adapter", tmp_path / "hub"
    local.mkdir()
    (local / "adapter_config.json").write_text("{}")
    corolla = Path(sys.executable).parent / "corolla"
    command = [str(corolla)] if corolla.exists() else [sys.executable, "-m", "corolla.cli"]
    result = subprocess.run([*command, "push", str(local), "carol/prompt", "--hub-dir", str(hub)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = Path(result.stdout.strip().splitlines()[-1])
    assert snapshot == resolve("carol/prompt", hub_dir=hub)
    assert (snapshot / "adapter_config.json").read_text() == "{}"

    from corolla.cli import main  # in this process: each start of the CLI spends seconds importing

    with pytest.raises(SystemExit) as exit_info:
        main(["push", str(local), "not-a-repo-id", "--hub-dir", str(hub)])
    assert exit_info.value.code == 2 and "repo id 'not-a-repo-id'" in capsys.readouterr().err
