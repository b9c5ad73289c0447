"""Where a model's files come from: a local directory, or a Hugging Face Hub repo id fetched file by file.

`open_model("owner/name")` fetches `config.json` and the weight index (`model.safetensors.index.json`, or the
single `model.safetensors`) into the huggingface_hub cache and returns a `ModelSource` whose `directory` is that
revision's snapshot folder. A server then asks for the shards of its blocks (`fetch_blocks`), a client for those
of its parts and the tokenizer files (`fetch_client_parts`): which shard holds which tensor comes from the index's
weight_map and the family's module paths (the same names checkpoint.py reads), so a server of a few blocks of a
large model downloads a few shards, not the whole repo. Files land in the snapshot folder, where checkpoint.py
reads them as from any local directory.

Everything goes through huggingface_hub: its cache (`cache_dir`, else $HF_HUB_CACHE / $HF_HOME), its offline
switch (HF_HUB_OFFLINE, read when called; or `local_files_only`) and revisions (branch, tag or commit). A local
directory is used as it is, with nothing fetched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from huggingface_hub import _CACHED_NO_EXIST, HfApi, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                    RepositoryNotFoundError, RevisionNotFoundError)
from transformers import PretrainedConfig

from corolla.errors import NotAModelError
from corolla.hub import HubError, default_hub_dir, validate_repo_id
from corolla.models.checkpoint import Checkpoint, checkpoint_names, load_config, model_id
from corolla.models.spec import family_for

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Files a client reads besides weights, when the repo has them: the tokenizer (every format transformers reads)
#: and the generation defaults.
CLIENT_EXTRA_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt",
                      "chat_template.jinja", "chat_template.json")
#: transformers' from_pretrained keyword arguments that say where Hub files come from (taken by `open_model`).
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spellings of a true environment variable


def offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import; tests and launchers set it later)."""
    return huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


@dataclass(frozen=True)
class ModelSource:
    """A model's files: a local directory (`repo_id` None), or a Hub repo's snapshot folder of one commit into
    which files are fetched as they are needed."""

    given: str  # what the person gave: a directory or "owner/name"
    directory: Path  # the local directory, or the cache's snapshots/<commit> folder
    repo_id: str | None = None
    revision: str | None = None  # as asked (None: the repo's default branch, "main")
    cache_dir: Path | None = None
    token: str | bool | None = field(default=None, repr=False)  # a secret: never in logs
    local_files_only: bool = False  # downloads off: asked for, or HF_HUB_OFFLINE when opened

    @property
    def name(self) -> str:
        """The model's default name in the swarm (hashed with its config into the model id): the directory's
        name, or the repo's name, so `owner/name` and a checkout of it in a folder `name` announce the same id.
        A snapshot folder of the Hugging Face cache given as a directory counts as its repo's name too."""
        if self.repo_id is not None:
            return self.repo_id.split("/")[1]
        path = self.directory.resolve()
        if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
            return path.parent.parent.name.split("--", 2)[2]  # models--OWNER--NAME: all of NAME
        return path.name

    @property
    def commit(self) -> str | None:
        return self.directory.name if self.repo_id is not None else None

    def block_files(self, config: PretrainedConfig, start: int, end: int) -> list[str]:
        """The weight files (relative to `directory`) holding blocks [start, end)."""
        spec = family_for(config)
        return self._files_of(config, [spec.block_path(i) for i in range(start, end)])

    def client_files(self, config: PretrainedConfig) -> list[str]:
        """The weight files (relative to `directory`) holding the client's parts (embeddings, final norm, head)."""
        return self._files_of(config, list(family_for(config).client_paths))

    def fetch_blocks(self, config: PretrainedConfig, start: int, end: int) -> Path:
        """The directory to load blocks [start, end) from, after fetching the shards that hold them."""
        if self.repo_id is not None:
            self._fetch(self.block_files(config, start, end))
        return self.directory

    def fetch_client_parts(self, config: PretrainedConfig) -> Path:
        """The directory to load the client's parts from, after fetching their shards, the tokenizer files and
        the generation defaults (those the repo has)."""
        if self.repo_id is not None:
            self._fetch(self.client_files(config))
            self._fetch(CLIENT_EXTRA_FILES, optional=True)
        return self.directory

    def _files_of(self, config: PretrainedConfig, paths: list[str]) -> list[str]:
        if not (self.directory / INDEX_FILE).is_file():
            return [SINGLE_FILE]  # open_model found the index or this file
        checkpoint = Checkpoint(self.directory)  # reads only the index's weight_map
        names = checkpoint_names(checkpoint, family_for(config).causal_lm_class, paths)
        return sorted({checkpoint.file_of[name].relative_to(self.directory).as_posix() for name in names})

    def _fetch(self, files: Iterable[str], optional: bool = False) -> None:
        """Bring `files` into the snapshot folder. Required files missing from the cache while offline are named
        all together in one HubError; optional ones the repo lacks are skipped."""
        missing = []
        for file in files:
            try:
                _download(self.repo_id, file, self.commit, self.cache_dir, self.token, self.local_files_only)
            except LocalEntryNotFoundError:
                missing.append(file)
            except EntryNotFoundError:
                if not optional:
                    raise HubError(f"repo {self.repo_id} (revision {self.revision or 'main'}, commit {self.commit}) "
                                   f"has no file {file}, which its {INDEX_FILE} names") from None
        if missing and not optional:
            raise _not_in_cache(self.repo_id, self.revision, self.cache_dir, missing, self.local_files_only,
                                commit=self.commit)


@dataclass(frozen=True)
class SwarmIdentity:
    """How the swarm knows a model. Servers, clients, health, the API, the demo and credits all take it from
    `swarm_identity`, so one set of files names one swarm however it was given (a directory, `owner/name`, or a
    snapshot folder of the Hugging Face cache)."""

    config: PretrainedConfig  # the model's config.json
    name: str  # the name it announces: --model-name, else `ModelSource.name`
    model_id: str  # name + a hash of the config: the DHT key prefix of its blocks, the swarm named in receipts


def swarm_identity(source: ModelSource, model_name: str | None = None) -> SwarmIdentity:
    """The config, name and model id of `source` (`model_name`, when given, replaces its default name)."""
    config = load_config(source.directory)
    name = model_name or source.name
    return SwarmIdentity(config, name, model_id(config, name))


def open_model(name_or_path: str | Path, revision: str | None = None, cache_dir: str | Path | None = None,
               token: str | bool | None = None, local_files_only: bool = False) -> ModelSource:
    """A local model directory as it is, or a Hub repo id ("owner/name") at `revision` with its config.json and
    weight index fetched. Raises NotAModelError for anything else, and HubError (naming the repo, revision and
    files) when the repo's files cannot be had: not in the cache while offline, no such repo or revision, or no
    safetensors weights."""
    given = str(name_or_path)
    path = Path(given).expanduser()
    if path.is_dir():
        if revision is not None:
            raise HubError(f"revision={revision!r} applies to Hub repo ids, but {given} is a local directory "
                           f"(check out the revision there instead)")
        return ModelSource(given, path)
    try:
        validate_repo_id(given)
    except HubError as e:
        raise NotAModelError(f"{given!r} is not a model directory nor a Hugging Face Hub repo id 'owner/name' "
                             f"({e}); expected a folder with config.json and *.safetensors files") from None
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_hub_dir()
    local_only = local_files_only or offline()
    try:
        config_file = Path(_download(given, "config.json", revision, cache, token, local_only))
    except LocalEntryNotFoundError:
        raise _not_in_cache(given, revision, cache, ["config.json", f"{INDEX_FILE} (or {SINGLE_FILE})",
                                                     "the shards"], local_only) from None
    except EntryNotFoundError:
        raise NotAModelError(f"repo {given} (revision {revision or 'main'}) has no config.json: it is not a "
                             f"Hugging Face-format model") from None
    source = ModelSource(given, config_file.parent, given, revision, cache, token, local_only)
    _fetch_weight_index(source)
    return source


def _fetch_weight_index(source: ModelSource) -> None:
    """Fetch model.safetensors.index.json (sharded), or learn that the repo has the single model.safetensors
    (fetched whole with the first blocks or client parts); raise HubError saying which when the repo has no
    safetensors weights or the cache lacks them while offline."""
    no_safetensors = HubError(f"repo {source.repo_id} (revision {source.revision or 'main'}) has no safetensors "
                              f"weights (neither {INDEX_FILE} nor {SINGLE_FILE}); Corolla reads only *.safetensors "
                              f"checkpoints")
    try:
        _download(source.repo_id, INDEX_FILE, source.commit, source.cache_dir, source.token, source.local_files_only)
        return
    except LocalEntryNotFoundError:  # not in the cache, and downloads are off or the Hub unreachable
        if (source.directory / SINGLE_FILE).exists():
            return
        known_absent = [try_to_load_from_cache(source.repo_id, file, source.cache_dir, source.commit)
                        is _CACHED_NO_EXIST for file in (INDEX_FILE, SINGLE_FILE)]
        if all(known_absent):  # huggingface_hub recorded both as missing on the Hub when it was last online
            raise no_safetensors from None
        other = sorted(p.name for p in source.directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        note = f"; the cache has {', '.join(other)}, which Corolla does not read (only *.safetensors)" if other else ""
        raise _not_in_cache(source.repo_id, source.revision, source.cache_dir, [f"{INDEX_FILE} or {SINGLE_FILE}"],
                            source.local_files_only, commit=source.commit, note=note) from None
    except EntryNotFoundError:  # the repo has no index: a single file, or no safetensors at all
        if HfApi(token=source.token).file_exists(source.repo_id, SINGLE_FILE, revision=source.commit):
            return
        raise no_safetensors from None


def _download(repo_id: str, file: str, revision: str | None, cache_dir: Path, token, local_files_only: bool) -> str:
    """hf_hub_download, with the Hub's refusals (no such repo or revision, gated) as HubErrors that say so."""
    try:
        return hf_hub_download(repo_id, file, revision=revision, cache_dir=cache_dir, token=token,
                               local_files_only=local_files_only)
    except RevisionNotFoundError:
        raise HubError(f"repo {repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except GatedRepoError:
        raise HubError(f"repo {repo_id} is gated: accept its terms on huggingface.co and log in "
                       f"(`hf auth login`) or pass token=") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} is neither a local directory nor a repo on the Hugging Face Hub (or it is "
                       f"private: log in with `hf auth login`)") from None


def _not_in_cache(repo_id: str, revision: str | None, cache_dir: Path, missing: list[str], offline: bool,
                  commit: str | None = None, note: str = "") -> HubError:
    """The error for files that are neither in the cache nor downloadable now: which repo, revision and files,
    what the cache does hold, why nothing was downloaded, and the command that would fetch them."""
    branch = revision or "main"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    if commit is not None:
        where = f"commit {commit} of revision {branch!r} is in the cache {cache_dir}, but without those files"
    elif not repo.is_dir():
        where = f"the cache {cache_dir} has no copy of it (no folder {repo.name})"
    else:
        refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file()) \
            if (repo / "refs").is_dir() else []
        where = (f"the cache {cache_dir} has no snapshot of revision {branch!r} with config.json "
                 f"(revisions it has: {', '.join(refs) or 'none'})")
    why = "downloads are off (HF_HUB_OFFLINE=1 or local_files_only)" if offline else "the Hub could not be reached"
    exact = all(" " not in file for file in missing)  # file names, not a description such as "the shards"
    command = f"hf download {repo_id} {' '.join(missing) + ' ' if exact else ''}--revision {branch}"
    return HubError(f"repo {repo_id} (revision {branch!r}) is not in the Hugging Face cache and {why}: missing "
                    f"{', '.join(missing)}; {where}{note}. Fetch them where the Hub is reachable, e.g. `{command}` "
                    f"(with --cache-dir {cache_dir} if that is not your default cache)"
                    + (", or allow downloads." if offline else "."))
