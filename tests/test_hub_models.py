"""Models by Hugging Face Hub repo id (corolla/models/hub_source.py): a Hugging Face cache made here holds a tiny
8-block Llama saved in 5 shards as `org/tiny`; servers and clients fetch only the shards of their blocks or parts.
No network: HF_HUB_OFFLINE=1 and every cache is a folder of this test, except one test whose "Hub" is a fake of its
file API on 127.0.0.1 serving such a cache."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import OUTPUT_DIR
from tiny_models import make_tiny_llama
from corolla.hub import HubError, push
from corolla.launch import LocalSwarm
from corolla.models import hub_source
from corolla.models.checkpoint import load_blocks, load_client_parts, load_config, model_id
from corolla.models.hub_source import INDEX_FILE, open_model

REPO = "org/tiny"
NUM_BLOCKS = 8


def _make_model(path: Path, seed: int) -> Path:
    """8 blocks, saved in 5 shards of ~300 KB: embeddings + blocks 0-1 | 1-3 | 3-5 | 5-7 | 7 + norm + head (blocks
    straddle shards, as in real checkpoints)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=NUM_BLOCKS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).eval().save_pretrained(path, max_shard_size="300KB")
    _save_tokenizer(path)
    return path


def _save_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the model's 320 tokens ("w3" is token 3), as tokenizer.json and its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 320)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)


def _shards_of(model_dir: Path, prefixes: tuple[str, ...]) -> set[str]:
    """The shards that hold tensors starting with `prefixes`, straight from the index (independent of Corolla)."""
    weight_map = json.loads((model_dir / INDEX_FILE).read_text())["weight_map"]
    return {file for name, file in weight_map.items() if name.startswith(prefixes)}


def _block_prefixes(start: int, end: int) -> tuple[str, ...]:
    return tuple(f"model.layers.{i}." for i in range(start, end))


CLIENT_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")


def _cache_with_only(source_cache: Path, target: Path, keep_shards: set[str]) -> Path:
    """A copy of a cache of `org/tiny` whose snapshots lack every shard but `keep_shards` (links and blobs), as
    a cache looks after downloading only some files."""
    shutil.copytree(source_cache, target, symlinks=True)
    repo = target / "models--org--tiny"
    for link in (repo / "snapshots").glob("*/model-*.safetensors"):
        if link.name not in keep_shards:
            (link.parent / link.readlink()).resolve().unlink(missing_ok=True)
            link.unlink()
    return target


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub-models")
    return {"main": _make_model(root / "tiny", seed=0), "v2": _make_model(root / "v2" / "tiny", seed=1)}


@pytest.fixture(scope="module")
def cache(models, tmp_path_factory) -> Path:
    """A Hugging Face cache holding `org/tiny` at `main` and, with other weights, at branch `v2`."""
    cache = tmp_path_factory.mktemp("hf-cache")
    push(models["main"], REPO, hub_dir=cache)
    push(models["v2"], REPO, hub_dir=cache, revision="v2")
    return cache


def _go_offline(patch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 for this process (huggingface_hub read it at import, so its constant too: transformers
    then never tries the network) and for the processes it starts."""
    import huggingface_hub

    patch.setenv("HF_HUB_OFFLINE", "1")
    patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def offline_cache(cache, monkeypatch) -> Path:
    _go_offline(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def downloads(monkeypatch) -> list[str]:
    """Every file Corolla asks huggingface_hub for, in order."""
    asked = []
    original = hub_source.hf_hub_download

    def spy(repo_id, filename, **kwargs):
        asked.append(filename)
        return original(repo_id, filename, **kwargs)

    monkeypatch.setattr(hub_source, "hf_hub_download", spy)
    return asked


def test_the_test_cache_is_a_hugging_face_cache(cache, models):
    """huggingface_hub itself reads the cache made here: one repo, two revisions, every file of both models."""
    info = scan_cache_dir(cache)
    assert [repo.repo_id for repo in info.repos] == [REPO] and not info.warnings
    (repo,) = info.repos
    assert sorted(ref for revision in repo.revisions for ref in revision.refs) == ["main", "v2"]
    for revision in repo.revisions:
        name = "main" if "main" in revision.refs else "v2"
        assert {f.file_name for f in revision.files} == {p.name for p in models[name].iterdir()}


def test_a_server_of_blocks_0_to_3_fetches_only_their_shards(offline_cache, models, downloads, tmp_path):
    model_dir = models["main"]
    wanted = _shards_of(model_dir, _block_prefixes(0, 4))
    all_shards = {p.name for p in model_dir.glob("model-*.safetensors")}
    assert len(all_shards) == 5 and wanted < all_shards  # the test means something: some shards are not needed

    source = open_model(REPO)
    config = load_config(source.directory)
    assert set(source.block_files(config, 0, 4)) == wanted
    directory = source.fetch_blocks(config, 0, 4)
    assert downloads[:2] == ["config.json", INDEX_FILE] and set(downloads[2:]) == wanted

    # A cache holding only those shards serves the blocks, equal to transformers' own layers.
    partial = _cache_with_only(offline_cache, tmp_path / "partial", wanted)
    source = open_model(REPO, cache_dir=partial)
    blocks = load_blocks(source.fetch_blocks(config, 0, 4), config, 0, 4, "cpu", torch.float32)
    assert {p.name for p in source.directory.glob("model-*.safetensors")} == wanted
    reference = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for index, block in enumerate(blocks):
        theirs = reference.model.layers[index].state_dict()
        assert all(torch.equal(tensor, theirs[name]) for name, tensor in block.state_dict().items())
    assert directory.name == source.directory.name  # one commit, whatever the cache


def test_the_client_fetches_only_its_parts_and_the_tokenizer(offline_cache, models, downloads, tmp_path):
    wanted = _shards_of(models["main"], CLIENT_PREFIXES)
    assert len(wanted) == 2  # embeddings in the first shard, the norm and the head in the last
    source = open_model(REPO)
    config = load_config(source.directory)
    directory = source.fetch_client_parts(config)
    weights = {f for f in downloads if f.endswith(".safetensors")}
    assert weights == wanted
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(downloads)

    partial = _cache_with_only(offline_cache, tmp_path / "partial", wanted)
    source = open_model(REPO, cache_dir=partial)
    parts = load_client_parts(source.fetch_client_parts(config), config, torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(models["main"]).eval()
    assert torch.equal(parts["lm_head"].weight, reference.lm_head.weight)
    assert torch.equal(parts["model.embed_tokens"].weight, reference.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(directory)("w5 w7")["input_ids"] == [5, 7]


def test_revisions_by_branch_and_commit(offline_cache, models):
    main, v2 = open_model(REPO), open_model(REPO, revision="v2")
    assert main.directory != v2.directory
    by_commit = open_model(REPO, revision=v2.commit)
    assert by_commit.directory == v2.directory
    config = load_config(v2.directory)
    (block,) = load_blocks(v2.fetch_blocks(config, 5, 6), config, 5, 6, "cpu", torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(models["v2"]).model.layers[5].state_dict()
    ours = AutoModelForCausalLM.from_pretrained(models["main"]).model.layers[5].state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in block.state_dict().items())
    assert not all(torch.equal(t, ours[n]) for n, t in block.state_dict().items())
    with pytest.raises(HubError, match="revision=.*applies to Hub repo ids"):
        open_model(models["main"], revision="v2")


def test_a_directory_and_a_repo_id_of_the_same_files_announce_one_model_id(offline_cache, models):
    by_repo, by_dir = open_model(REPO), open_model(models["main"])
    assert by_dir.repo_id is None and by_dir.directory == models["main"]  # local directories as before
    by_snapshot = open_model(by_repo.directory)  # the cache's snapshot folder given as a directory
    ids = {model_id(load_config(s.directory), s.name) for s in (by_repo, by_dir, by_snapshot)}
    assert len(ids) == 1 and ids.pop().startswith("tiny-")


def test_an_unsharded_repo_is_fetched_whole(offline_cache, tmp_path):
    """A repo with one model.safetensors (no index): servers and clients fetch that file and load as usual."""
    folder = make_tiny_llama(tmp_path / "single", num_layers=2)
    assert not (folder / INDEX_FILE).exists()
    push(folder, "org/single", hub_dir=tmp_path / "cache")
    source = open_model("org/single", cache_dir=tmp_path / "cache")
    config = load_config(source.directory)
    assert source.block_files(config, 1, 2) == source.client_files(config) == ["model.safetensors"]
    (block,) = load_blocks(source.fetch_blocks(config, 1, 2), config, 1, 2, "cpu", torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder).model.layers[1].state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in block.state_dict().items())


def test_offline_errors_name_the_repo_revision_and_missing_files(offline_cache, models, tmp_path):
    with pytest.raises(HubError, match=r"repo org/absent \(revision 'main'\) is not in the Hugging Face cache.*"
                                       r"missing config\.json.*no folder models--org--absent.*hf download org/absent"):
        open_model("org/absent")
    with pytest.raises(HubError, match=r"revision 'v9'.*revisions it has: main, v2"):
        open_model(REPO, revision="v9")

    first_half = _shards_of(models["main"], _block_prefixes(0, 4))
    partial = _cache_with_only(offline_cache, tmp_path / "partial", first_half)
    source = open_model(REPO, cache_dir=partial)
    config = load_config(source.directory)
    missing = sorted(_shards_of(models["main"], _block_prefixes(4, 8)) - first_half)
    with pytest.raises(HubError) as error:
        source.fetch_blocks(config, 4, 8)
    message = str(error.value)
    assert f"missing {', '.join(missing)}" in message and f"commit {source.commit}" in message
    assert f"hf download {REPO} {' '.join(missing)} --revision main" in message

    with pytest.raises(Exception, match="is not a model directory nor a Hugging Face Hub repo id"):
        open_model(str(tmp_path / "no" / "such" / "dir"))


def _push_bin_only(models: dict[str, Path], hub_dir: Path) -> Path:
    """`org/bin-only`: the tiny model's config.json with PyTorch weights (pytorch_model.bin) only."""
    folder = hub_dir.parent / f"{hub_dir.name}-bin-only"
    folder.mkdir()
    shutil.copy(models["main"] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    return push(folder, "org/bin-only", hub_dir=hub_dir)


def test_a_repo_without_safetensors_says_so(offline_cache, models, tmp_path):
    snapshot = _push_bin_only(models, tmp_path / "cache")
    with pytest.raises(HubError, match=r"missing model\.safetensors\.index\.json or model\.safetensors.*"
                                       r"the cache has pytorch_model\.bin, which Corolla does not read"):
        open_model("org/bin-only", cache_dir=tmp_path / "cache")
    # Where huggingface_hub has recorded that the Hub lacks both files (its .no_exist markers), it is certain.
    no_exist = tmp_path / "cache" / "models--org--bin-only" / ".no_exist" / snapshot.name
    no_exist.mkdir(parents=True)
    for name in (INDEX_FILE, "model.safetensors"):
        (no_exist / name).touch()
    with pytest.raises(HubError, match="has no safetensors weights .*Corolla reads only \\*.safetensors"):
        open_model("org/bin-only", cache_dir=tmp_path / "cache")


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """The Hub's file API (`/<owner>/<name>/resolve/<revision>/<file>`, HEAD and GET, its headers and error codes)
    over a Hugging Face cache folder, on 127.0.0.1; every request is logged."""

    hub_dir: Path
    requests: list[tuple[str, str]]

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def log_message(self, *args):
        pass

    def _answer(self, body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        self.requests.append((self.command, path))
        parts = path.split("/")
        repo = self.hub_dir / f"models--{parts[1]}--{parts[2]}" if len(parts) > 5 else self.hub_dir / "none"
        if not repo.is_dir() or parts[3] != "resolve":
            return self._error("RepoNotFound")
        revision = parts[4]
        ref = repo / "refs" / revision
        commit = ref.read_text() if ref.is_file() else revision
        if not (repo / "snapshots" / commit).is_dir():
            return self._error("RevisionNotFound")
        file = repo / "snapshots" / commit / "/".join(parts[5:])
        if not file.is_file():
            return self._error("EntryNotFound", commit)
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, code: str, commit: str | None = None) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Length", "0")
        self.end_headers()


_ONLINE_SCRIPT = """
import json, sys
import torch
from corolla.hub import HubError
from corolla.models.checkpoint import load_blocks, load_client_parts, load_config
from corolla.models.hub_source import open_model

server_cache, client_cache, other_cache = sys.argv[1:]
server = open_model("org/tiny", cache_dir=server_cache)
config = load_config(server.directory)
load_blocks(server.fetch_blocks(config, 0, 4), config, 0, 4, "cpu", torch.float32)
client = open_model("org/tiny", cache_dir=client_cache)
load_client_parts(client.fetch_client_parts(config), config, torch.float32)
v2 = open_model("org/tiny", revision="v2", cache_dir=other_cache)
single = open_model("org/single", cache_dir=other_cache)
single.fetch_blocks(load_config(single.directory), 0, 1)
errors = []
for repo in ("org/bin-only", "org/absent"):
    try:
        open_model(repo, cache_dir=other_cache)
    except HubError as e:
        errors.append(str(e))
print(json.dumps({"server": sorted(p.name for p in server.directory.iterdir()),
                  "client": sorted(p.name for p in client.directory.iterdir()), "v2": v2.commit, "errors": errors,
                  "single": sorted(p.name for p in single.directory.iterdir())}))
"""


def test_downloads_from_the_hub_fetch_only_what_is_needed(cache, models, tmp_path):
    """Online, against a fake of the Hub's file API on 127.0.0.1 (HF_ENDPOINT) serving a copy of the test cache:
    a server of blocks 0..3 downloads only their shards, a client only its parts' shards and the tokenizer."""
    hub_dir = tmp_path / "hub"
    shutil.copytree(cache, hub_dir, symlinks=True)
    _push_bin_only(models, hub_dir)
    push(make_tiny_llama(tmp_path / "single", num_layers=2), "org/single", hub_dir=hub_dir)  # no index
    handler = type("Hub", (_FakeHub,), {"hub_dir": hub_dir, "requests": []})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as fake:
        threading.Thread(target=fake.serve_forever, daemon=True).start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        env.update(HF_ENDPOINT=f"http://127.0.0.1:{fake.server_address[1]}", HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_XET="1")
        caches = [str(tmp_path / name) for name in ("server-cache", "client-cache", "other-cache")]
        try:
            result = subprocess.run([sys.executable, "-c", _ONLINE_SCRIPT, *caches], capture_output=True, text=True,
                                    timeout=120, env=env)
        finally:
            fake.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    model_dir = models["main"]
    server_shards = _shards_of(model_dir, _block_prefixes(0, 4))
    client_shards = _shards_of(model_dir, CLIENT_PREFIXES)
    assert set(got["server"]) == {"config.json", INDEX_FILE} | server_shards
    extras = {p.name for p in model_dir.iterdir()} & set(hub_source.CLIENT_EXTRA_FILES)
    assert {"tokenizer.json", "generation_config.json"} <= extras
    assert set(got["client"]) == {"config.json", INDEX_FILE} | client_shards | extras
    downloaded = {path.rsplit("/", 1)[1] for method, path in handler.requests
                  if method == "GET" and path.startswith("/org/tiny/")}
    assert downloaded == {"config.json", INDEX_FILE} | server_shards | client_shards | extras  # nothing else, ever
    assert got["single"] == ["config.json", "model.safetensors"]
    assert got["v2"] == (cache / "models--org--tiny" / "refs" / "v2").read_text()
    no_safetensors, absent = got["errors"]
    assert "repo org/bin-only (revision main) has no safetensors weights" in no_safetensors
    assert "org/absent is neither a local directory nor a repo on the Hugging Face Hub" in absent


@pytest.fixture(scope="module")
def hub_swarm(cache, models, tmp_path_factory):
    """Two `corolla server org/tiny` processes (blocks 0:4 and 4:8), offline, each with a cache holding only the
    shards of its own blocks (--hub-dir)."""
    root = tmp_path_factory.mktemp("server-caches")
    with pytest.MonkeyPatch.context() as patch, LocalSwarm(OUTPUT_DIR / "test_hub_models-swarm") as swarm:
        _go_offline(patch)
        patch.setenv("HF_HUB_CACHE", str(root / "empty"))  # a server that ignored --hub-dir would fail
        swarm.start_dht()
        servers = []
        for start, end in ((0, 4), (4, 8)):
            shards = _shards_of(models["main"], _block_prefixes(start, end))
            server_cache = _cache_with_only(cache, root / f"blocks-{start}-{end}", shards)
            servers.append(swarm.start_server(REPO, (start, end), f"server{start}",
                                              ["--num-threads", "1", "--hub-dir", str(server_cache)], wait=False))
        for server in servers:
            swarm.wait_for_line(server, "ready:", 180)
        yield swarm


def test_a_swarm_of_a_repo_id_generates_as_transformers(hub_swarm, cache, models, monkeypatch, tmp_path):
    from corolla import AutoDistributedModelForCausalLM

    _go_offline(monkeypatch)
    client_cache = _cache_with_only(cache, tmp_path / "client-cache", _shards_of(models["main"], CLIENT_PREFIXES))
    reference = AutoModelForCausalLM.from_pretrained(REPO, cache_dir=cache, local_files_only=True).eval()
    ids = torch.tensor([[1, 17, 250, 3, 99, 42, 7]])
    want = reference.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    # By repo id (through transformers' cache_dir), and by a directory of the same files: one model id.
    for name_or_path, options in ((REPO, dict(cache_dir=client_cache)), (models["main"], {})):
        model = AutoDistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers=hub_swarm.initial_peers,
                                                                **options)
        try:
            assert model.generate(ids, max_new_tokens=8, do_sample=False).tolist() == want
        finally:
            model.close()


def test_the_command_line_names_what_is_missing(cache, tmp_path):
    """`corolla server OWNER/NAME` offline without the repo in the cache: exit 2 and the error, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    result = subprocess.run([sys.executable, "-m", "corolla.cli", "server", "org/absent", "--blocks", "0:1"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.startswith("error: repo org/absent (revision 'main') is not in the Hugging Face cache")
    assert "Traceback" not in result.stderr


def test_a_moving_server_stays_when_the_new_shards_cannot_be_fetched(offline_cache, models, tmp_path, caplog):
    """A server of a repo id fetches its next span's shards before leaving its current one; offline without them,
    it stays (rather than announcing itself offline and failing to load)."""
    import asyncio

    from corolla.net.node import NetworkConfig
    from corolla.server.config import ServerConfig
    from corolla.server.server import Server

    shards = _shards_of(models["main"], _block_prefixes(0, 4))
    partial = _cache_with_only(offline_cache, tmp_path / "partial", shards)
    server = Server(ServerConfig(model=REPO, hub_dir=str(partial)), NetworkConfig())
    server.start, server.end = 0, 4
    assert asyncio.run(server._fetch_while_serving(None, (1, 3)))  # in the cache: the fetch ends within a period
    assert not asyncio.run(server._fetch_while_serving(None, (4, 8)))
    missing = sorted(_shards_of(models["main"], _block_prefixes(4, 8)) - shards)
    assert f"staying on blocks 0:4: cannot fetch blocks 4:8: repo {REPO}" in caplog.text
    assert f"missing {', '.join(missing)}" in caplog.text


def test_a_snapshot_folder_is_named_by_all_of_its_repo_name(tmp_path):
    """models--OWNER--NAME/snapshots/<commit>: the name is everything after OWNER, even with '--' in it (the Hub
    refuses such names today; a folder made by hand may still have one), as the repo id form would give."""
    snapshot = tmp_path / "models--org--my--model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert hub_source.ModelSource(str(snapshot), snapshot).name == "my--model"
    assert hub_source.ModelSource("org/my--model", snapshot, repo_id="org/my--model").name == "my--model"
