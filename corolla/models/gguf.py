"""GGUF checkpoints, converted once into a Hugging Face-format safetensors directory that servers and clients load.

transformers reads the GGUF (dequantizing every tensor, undoing llama.cpp's tensor layout) and writes the model and
its tokenizer with `save_pretrained`. The output is written to a staging folder and renamed into place, so a
half-written directory never counts as a model.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from corolla.errors import NotAModelError
from corolla.models.checkpoint import no_progress_bars

logger = logging.getLogger(__name__)


def convert_gguf(gguf_file: str | Path, target: str | Path, dtype: torch.dtype | None = None,
                 progress: bool = False) -> Path:
    """Convert `gguf_file` into the model directory `target` (replaced if it exists); return `target`.

    dtype: the dtype of the saved weights (default float32, the dtype transformers dequantizes to).
    Fails before the slow part if the file is not a GGUF, or its architecture is not a family Corolla serves.
    """
    from transformers import AutoConfig

    from corolla.models.spec import family_for

    gguf_file, target = Path(gguf_file).resolve(), Path(target).resolve()
    if not gguf_file.is_file():
        raise NotAModelError(f"{str(gguf_file)!r} is not a file")
    with open(gguf_file, "rb") as f:
        if f.read(4) != b"GGUF":
            raise NotAModelError(f"{str(gguf_file)!r} is not a GGUF file (it does not start with the GGUF magic)")
    folder, name = gguf_file.parent, gguf_file.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except ValueError as e:  # transformers: "GGUF model with architecture ... is not supported yet."
        raise NotAModelError(f"transformers cannot read {name}: {e}") from e
    family_for(config)  # an architecture Corolla cannot serve fails now, listing what it can

    with contextlib.nullcontext() if progress else no_progress_bars():
        return _convert(folder, name, target, dtype, progress)


def _convert(folder: Path, name: str, target: Path, dtype: torch.dtype | None, progress: bool) -> Path:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"Converting {name} to safetensors", disable=not progress, unit="step")
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:  # the weights are still worth converting; say what is missing
        logger.warning("the tokenizer of %s could not be converted (%s); the directory will have no tokenizer",
                       name, e)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype or torch.float32)
    steps.update()
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers refuses to save a model it still marks as gguf-quantized; the tensors are plain floats now.
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.converting-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _make_readable(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    steps.update()
    steps.close()
    return target


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private folder; a model directory is as readable as any other file the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)
