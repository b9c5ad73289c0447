"""An offline model hub: directories laid out exactly like the Hugging Face hub cache.

`push` files an adapter, prompt or model directory under `<hub_dir>/models--<owner>--<name>/`:

    blobs/<sha256 of the file>                      one copy of each distinct file content
    snapshots/<commit>/<relative path>              symlinks to ../../blobs/<sha256> (deeper files: more ../)
    refs/<revision>                                 the commit the revision points to (no newline)

so plain `huggingface_hub`, `transformers` and `peft` load `owner/name` from it with `HF_HUB_CACHE=<hub_dir>` and
`HF_HUB_OFFLINE=1`. The commit is a hash of the files' relative paths and contents (40 hex digits, like a git
commit id), so pushing the same files twice gives the same snapshot. `resolve` turns a local directory or a repo
id into a directory to load from. Nothing here touches the network.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

from corolla.errors import CorollaError

#: One part of a repo id ("owner" or "name"): Hugging Face's rule, letters, digits, "-", "_" and "." that neither
#: start nor end the part, and no "--" or ".." inside (the cache folder joins the parts with "--").
_REPO_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_MAX_REPO_ID_LENGTH = 96  # Hugging Face's limit
#: A revision (branch) name: parts of letters, digits, "-", "_" and "." joined by "/", none of them "." or "..".
_REVISION_PART = re.compile(r"[A-Za-z0-9_.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SKIPPED_NAMES = frozenset({".git"})  # a checkout's version control data is not part of the model
_CHUNK = 1 << 20


class HubError(CorollaError):
    """A repo id, revision or hub directory is invalid, or a repo is not in the hub."""


def default_hub_dir() -> Path:
    """The hub directory huggingface_hub uses: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache_home).expanduser() / "huggingface" / "hub"


def validate_repo_id(repo_id: str) -> tuple[str, str]:
    """(owner, name) of an "owner/name" repo id; raises HubError saying what is wrong with any other string."""
    if not isinstance(repo_id, str):
        raise HubError(f"repo id must be a string like 'owner/name', got {type(repo_id).__name__} {repo_id!r}")
    parts = repo_id.split("/")
    if len(parts) != 2:
        raise HubError(f"repo id {repo_id!r} must be 'owner/name' (exactly one '/')")
    if len(repo_id) > _MAX_REPO_ID_LENGTH:
        raise HubError(f"repo id {repo_id!r} is longer than {_MAX_REPO_ID_LENGTH} characters")
    for label, part in zip(("owner", "name"), parts):
        if not _REPO_PART.fullmatch(part) or "--" in part or ".." in part:
            raise HubError(f"repo id {repo_id!r}: {label} {part!r} must be letters, digits, '-', '_' or '.', "
                           f"not start or end with '-' or '.', and not contain '--' or '..'")
    return parts[0], parts[1]


def _validate_revision(revision: str) -> None:
    if not isinstance(revision, str) or not revision:
        raise HubError(f"revision must be a non-empty branch name like 'main', got {revision!r}")
    if any(part in ("", ".", "..") or not _REVISION_PART.fullmatch(part) for part in revision.split("/")):
        raise HubError(f"revision {revision!r} must be a branch name: letters, digits, '-', '_' and '.' in parts "
                       f"joined by '/', no part empty, '.' or '..'")


def repo_dir(repo_id: str, hub_dir: Path | None = None) -> Path:
    """The folder of a repo in the hub: `<hub_dir>/models--<owner>--<name>`."""
    owner, name = validate_repo_id(repo_id)
    return Path(hub_dir if hub_dir is not None else default_hub_dir()) / f"models--{owner}--{name}"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _list_files(local_dir: Path) -> list[tuple[str, Path]]:
    """(relative POSIX path, file) for every file under local_dir, sorted, following symlinks, skipping `.git`."""
    files = []
    for root, dirs, names in os.walk(local_dir, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_NAMES)
        for name in names:
            if name in _SKIPPED_NAMES:
                continue
            path = Path(root) / name
            if not path.is_file():
                raise HubError(f"cannot push {path}: not a regular file (a broken symlink, socket or device?)")
            files.append((path.relative_to(local_dir).as_posix(), path))
    return sorted(files)


def _commit_hash(manifest: list[tuple[str, str]]) -> str:
    """40 hex digits from the sorted (relative path, sha256) pairs: same files, same commit."""
    digest = hashlib.sha256(b"corolla-hub-commit-v1\n")
    for relative, sha in manifest:
        digest.update(relative.encode("utf-8") + b"\0" + sha.encode("ascii") + b"\n")
    return digest.hexdigest()[:40]


def _write_atomically(target: Path, data: bytes) -> None:
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _store_blob(source: Path, blobs: Path, sha: str) -> None:
    target = blobs / sha
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return  # content-addressed: already there
    fd, temp = tempfile.mkstemp(dir=blobs, prefix=f".{sha}.", suffix=".incomplete")
    try:
        with os.fdopen(fd, "wb") as out, open(source, "rb") as f:
            shutil.copyfileobj(f, out, _CHUNK)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _link_snapshot(snapshot: Path, manifest: list[tuple[str, str]], blobs: Path) -> None:
    """Make each file of snapshot a relative symlink to its blob (existing correct links are kept)."""
    for relative, sha in manifest:
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        pointer = os.path.relpath(blobs / sha, link.parent)
        if link.is_symlink() and os.readlink(link) == pointer:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(pointer)


def push(local_dir: Path, repo_id: str, hub_dir: Path | None = None, revision: str = "main") -> Path:
    """Copy every file under local_dir (an adapter, prompt or model directory; `.git` is skipped) into the hub as
    repo_id ("owner/name") and point refs/<revision> at the new snapshot. Returns the snapshot directory.

    hub_dir defaults to `default_hub_dir()`. Blobs are stored once per content, and the commit is a hash of the
    files, so pushing unchanged files again changes nothing; pushing changed files makes a new snapshot and moves
    the revision to it (older snapshots stay, as in the Hugging Face cache).
    """
    validate_repo_id(repo_id)
    _validate_revision(revision)
    if _COMMIT.fullmatch(revision):
        raise HubError(f"revision {revision!r} looks like a commit hash; push to a branch name such as 'main'")
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise HubError(f"cannot push {local_dir} as {repo_id}: not a directory")
    files = _list_files(local_dir)
    if not files:
        raise HubError(f"cannot push {local_dir} as {repo_id}: the directory holds no files")

    repo = repo_dir(repo_id, hub_dir)
    blobs, snapshots, refs = repo / "blobs", repo / "snapshots", repo / "refs"
    for folder in (blobs, snapshots, refs):
        folder.mkdir(parents=True, exist_ok=True)

    manifest = []
    for relative, path in files:
        sha = _sha256_file(path)
        _store_blob(path, blobs, sha)
        manifest.append((relative, sha))
    commit = _commit_hash(manifest)

    snapshot = snapshots / commit
    if snapshot.is_dir():
        _link_snapshot(snapshot, manifest, blobs)  # same files pushed before; repairs an interrupted push
    else:
        # Build beside the final place (same depth, so relative links stay right), then rename: a reader never
        # sees half a snapshot.
        staging = Path(tempfile.mkdtemp(dir=snapshots, prefix=f".{commit}."))
        try:
            _link_snapshot(staging, manifest, blobs)
            try:
                staging.rename(snapshot)
            except OSError:
                if not snapshot.is_dir():  # anything but "another push made it first"
                    raise
                _link_snapshot(snapshot, manifest, blobs)
        finally:
            if staging.exists():
                shutil.rmtree(staging)

    ref = refs / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(ref, commit.encode("ascii"))  # the cache's refs hold the bare commit, no newline
    return snapshot


def resolve(name_or_path: str, hub_dir: Path | None = None, revision: str = "main") -> Path:
    """The directory to load name_or_path from.

    An existing local directory is returned as is. Otherwise name_or_path must be a repo id ("owner/name") in
    hub_dir (default: `default_hub_dir()`), and the result is the snapshot of `revision`: a branch name whose
    ref the hub holds, or a commit hash. Raises HubError naming the repo id and the hub directory when it is not
    there.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HubError(f"{name_or_path} is a file, not a directory or an 'owner/name' repo id")
    hub = Path(hub_dir if hub_dir is not None else default_hub_dir())
    try:
        repo = repo_dir(name_or_path, hub)
    except HubError as e:
        raise HubError(f"{name_or_path!r} is neither a local directory nor a valid repo id ({e})") from None
    _validate_revision(revision)
    if not repo.is_dir():
        raise HubError(f"repo {name_or_path} is not in the hub {hub} (no folder {repo.name}); "
                       f"push it with `corolla push DIR {name_or_path} --hub-dir {hub}`, or set HF_HUB_CACHE")
    if _COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if not ref.is_file():
            known = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*")
                           if p.is_file()) if (repo / "refs").is_dir() else []
            raise HubError(f"repo {name_or_path} in the hub {hub} has no revision {revision!r} "
                           f"(revisions: {', '.join(known) or 'none'})")
        commit = ref.read_text().strip()
        if not _COMMIT.fullmatch(commit):
            raise HubError(f"repo {name_or_path} in the hub {hub}: refs/{revision} holds {commit!r}, "
                           f"not a 40-hex-digit commit")
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise HubError(f"repo {name_or_path} in the hub {hub}: revision {revision!r} points to commit {commit}, "
                       f"which has no snapshot folder")
    return snapshot
