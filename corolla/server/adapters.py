"""Loading the PEFT LoRA adapters a server hosts (`corolla server ... --adapters DIR_OR_NAME ...`).

An adapter is a standard PEFT directory (adapter_config.json + adapter_model.safetensors), given as a local path
or as a repo id in the offline hub (corolla/hub.py). Only the tensors of the server's own blocks are kept."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from corolla.errors import CorollaError
from corolla.models.lora import PEFT_PREFIX, BlockLora, LoraDelta, linear_layers
from corolla.models.spec import FamilySpec
from corolla.server.extras import HostedAdapters


def adapter_name(name_or_path: str) -> str:
    """The name clients ask for: a hub repo id as given, a local directory by its name."""
    path = Path(name_or_path)
    return path.resolve().name if path.is_dir() else name_or_path


def load_adapter(directory: Path, spec: FamilySpec, blocks: list[nn.Module], start: int, device: torch.device,
                 dtype: torch.dtype) -> dict[int, BlockLora]:
    """The deltas of blocks [start, start + len(blocks)) in a PEFT LoRA directory."""
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise CorollaError(f"{directory} is not a PEFT adapter directory in safetensors format (needs "
                           f"adapter_config.json and adapter_model.safetensors)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise CorollaError(f"{directory}: only LoRA adapters can be served, this one is {config.get('peft_type')!r}")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    deltas: dict[int, BlockLora] = {}
    with safe_open(weights_file, framework="pt") as tensors:
        names = set(tensors.keys())
        for offset, block in enumerate(blocks):
            index = start + offset
            prefix = PEFT_PREFIX + spec.block_prefix.format(index=index)
            shapes = linear_layers(block)
            deltas[index] = {}
            for name in sorted(n for n in names if n.startswith(prefix) and n.endswith(".lora_A.weight")):
                path = name[len(prefix):-len(".lora_A.weight")]
                b_name = name.replace(".lora_A.weight", ".lora_B.weight")
                if path not in shapes or b_name not in names:
                    raise CorollaError(f"{directory}: {name} does not belong to a linear layer of block {index} "
                                       f"(or its lora_B is missing)")
                a, b = tensors.get_tensor(name), tensors.get_tensor(b_name)
                in_features, out_features = shapes[path]
                if a.shape != (rank, in_features) or b.shape != (out_features, rank):
                    raise CorollaError(f"{directory}: {path} of block {index} has A {list(a.shape)} and B "
                                       f"{list(b.shape)}, expected [{rank}, {in_features}] and [{out_features}, {rank}]")
                deltas[index][path] = LoraDelta(a=a.to(device, dtype), b=b.to(device, dtype), scale=scale)
    return deltas


def load_adapters(names_or_paths: tuple[str, ...], spec: FamilySpec, blocks: list[nn.Module], start: int,
                  device: torch.device, dtype: torch.dtype, hub_dir: str | None = None) -> HostedAdapters:
    from corolla.hub import resolve

    hosted = HostedAdapters()
    for name_or_path in names_or_paths:
        directory = resolve(name_or_path, Path(hub_dir) if hub_dir else None)
        hosted.adapters[adapter_name(name_or_path)] = load_adapter(Path(directory), spec, blocks, start, device, dtype)
    return hosted
