"""The client's trainable parameters: prompts (ptune, deep_ptune) and LoRA weights for the remote blocks.

They live on the client only; servers get them with each request and return gradients. Saved as standard PEFT
directories where PEFT has the same method (LoRA; prompt tuning), so plain `peft` loads them:
- lora:       adapter_config.json (peft_type LORA) + adapter_model.safetensors (PEFT's tensor names)
- ptune:      adapter_config.json (peft_type PROMPT_TUNING) + adapter_model.safetensors ("prompt_embeddings")
- deep_ptune: PEFT has no such method: corolla_prompts.json + corolla_prompts.safetensors
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PretrainedConfig

from corolla.client.extras import ClientLora, Extras
from corolla.errors import CorollaError
from corolla.models.lora import LoraSettings, init_delta, lora_targets, peft_key
from corolla.models.spec import FamilySpec

TUNING_MODES = ("ptune", "deep_ptune", "lora")
DEEP_PROMPTS_CONFIG, DEEP_PROMPTS_WEIGHTS = "corolla_prompts.json", "corolla_prompts.safetensors"


@dataclass(frozen=True)
class TuningConfig:
    mode: str  # one of TUNING_MODES
    pre_seq_len: int = 0  # prompt positions (ptune, deep_ptune)
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        if self.mode not in TUNING_MODES:
            raise CorollaError(f"tuning_mode must be one of {', '.join(TUNING_MODES)}, got {self.mode!r}")
        if self.mode in ("ptune", "deep_ptune") and self.pre_seq_len < 1:
            raise CorollaError(f"tuning_mode={self.mode!r} needs pre_seq_len >= 1, got {self.pre_seq_len}")


class Tuning(nn.Module):
    """Trainable parameters of one tuning mode, for a model with `num_blocks` remote blocks."""

    def __init__(self, tuning: TuningConfig, config: PretrainedConfig, spec: FamilySpec, block: nn.Module,
                 embedding_std: float, base_model: str = "", seed: int | None = None):
        super().__init__()
        self.tuning, self.spec, self.base_model = tuning, spec, base_model
        self.num_blocks, hidden = config.num_hidden_layers, config.hidden_size
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.prompt_embeddings = self.deep_prompts = None
        if tuning.mode in ("ptune", "deep_ptune"):
            # Prompts start like token embeddings (same scale), so the first steps do not swamp the real tokens.
            self.prompt_embeddings = nn.Parameter(torch.randn(tuning.pre_seq_len, hidden, generator=generator)
                                                  * embedding_std)
        if tuning.mode == "deep_ptune":
            self.deep_prompts = nn.Parameter(torch.zeros(self.num_blocks, tuning.pre_seq_len, hidden))
        self.targets: tuple[str, ...] = ()
        self.lora_weights = nn.ParameterList()
        if tuning.mode == "lora":
            shapes = lora_targets(block, tuning.lora.target_modules)  # block: a meta-device block, for the shapes
            self.targets = tuple(sorted(shapes))
            for _ in range(self.num_blocks):
                for path in self.targets:
                    a, b = init_delta(*shapes[path], tuning.lora, generator)
                    self.lora_weights.extend([nn.Parameter(a), nn.Parameter(b)])

    @property
    def pre_seq_len(self) -> int:
        return 0 if self.prompt_embeddings is None else self.prompt_embeddings.shape[0]

    def prefix(self, batch: int) -> torch.Tensor | None:
        """[batch, pre_seq_len, hidden] prompt embeddings put before every sequence (ptune, deep_ptune)."""
        return None if self.prompt_embeddings is None else self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1)

    def prompts(self, batch: int) -> torch.Tensor | None:
        """[num_blocks, batch, pre_seq_len, hidden] deep prompts (deep_ptune)."""
        return None if self.deep_prompts is None else self.deep_prompts.unsqueeze(1).expand(-1, batch, -1, -1)

    def lora_layout(self) -> tuple[float, tuple[str, ...]] | None:
        return (self.tuning.lora.scale, self.targets) if self.tuning.mode == "lora" else None

    def extras(self, batch: int, adapter: str | None = None) -> Extras:
        """The current values (detached), for requests that need no gradients (generation, evaluation)."""
        prompts = self.prompts(batch)
        lora = None
        if self.tuning.mode == "lora":
            lora = ClientLora.from_flat(self.tuning.lora.scale, self.targets, [p.detach() for p in self.lora_weights])
        return Extras(prompts=None if prompts is None else prompts.detach(), lora=lora, adapter=adapter)

    # -- saving and loading -------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        common = {"base_model_name_or_path": self.base_model, "task_type": "CAUSAL_LM", "inference_mode": True,
                  "revision": None}
        if self.tuning.mode == "lora":
            settings = self.tuning.lora
            tensors = {}
            for index, weight in enumerate(self.lora_weights):
                block, rest = divmod(index, 2 * len(self.targets))
                path, which = self.targets[rest // 2], "AB"[rest % 2]
                tensors[peft_key(self.spec.block_prefix, block, path, which)] = weight.detach().contiguous()
            config = {**common, "peft_type": "LORA", "r": settings.r, "lora_alpha": settings.alpha,
                      "target_modules": sorted({t.rsplit(".", 1)[-1] for t in self.targets}), "lora_dropout": 0.0,
                      "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None,
                      "init_lora_weights": True}
            _write(directory, "adapter_config.json", "adapter_model.safetensors", config, tensors)
        elif self.tuning.mode == "ptune":
            config = {**common, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": self.pre_seq_len,
                      "token_dim": self.prompt_embeddings.shape[1], "num_transformer_submodules": 1,
                      "num_layers": self.num_blocks, "prompt_tuning_init": "RANDOM"}
            _write(directory, "adapter_config.json", "adapter_model.safetensors", config,
                   {"prompt_embeddings": self.prompt_embeddings.detach().contiguous()})
        else:
            config = {**common, "tuning_mode": "deep_ptune", "pre_seq_len": self.pre_seq_len}
            _write(directory, DEEP_PROMPTS_CONFIG, DEEP_PROMPTS_WEIGHTS, config,
                   {"prompt_embeddings": self.prompt_embeddings.detach().contiguous(),
                    "deep_prompts": self.deep_prompts.detach().contiguous()})
        return directory

    def push_to_hub(self, repo_id: str, hub_dir: str | Path | None = None) -> Path:
        """Save into the offline hub (corolla/hub.py) as `repo_id`; returns the snapshot directory."""
        from corolla.hub import push

        with tempfile.TemporaryDirectory() as temporary:
            self.save_pretrained(temporary)
            return push(Path(temporary), repo_id, Path(hub_dir) if hub_dir else None)


def _write(directory: Path, config_name: str, weights_name: str, config: dict, tensors: dict) -> None:
    (directory / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / weights_name), metadata={"format": "pt"})


def read_tuning(directory: Path) -> tuple[TuningConfig, dict[str, torch.Tensor]]:
    """The tuning mode and tensors saved in `directory` by Tuning.save_pretrained (or by plain peft)."""
    if (directory / DEEP_PROMPTS_CONFIG).is_file():
        config = json.loads((directory / DEEP_PROMPTS_CONFIG).read_text())
        return (TuningConfig("deep_ptune", int(config["pre_seq_len"])),
                load_file(str(directory / DEEP_PROMPTS_WEIGHTS)))
    config_file, weights_file = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise CorollaError(f"{directory} holds no saved prompts or adapter (adapter_config.json + "
                           f"adapter_model.safetensors, or {DEEP_PROMPTS_CONFIG})")
    config = json.loads(config_file.read_text())
    tensors = load_file(str(weights_file))
    if config.get("peft_type") == "PROMPT_TUNING":
        return TuningConfig("ptune", int(config["num_virtual_tokens"])), tensors
    if config.get("peft_type") == "LORA":
        if config.get("use_rslora"):
            raise CorollaError(f"{directory}: rsLoRA adapters are not supported for client-side use")
        settings = LoraSettings(r=int(config["r"]), alpha=float(config.get("lora_alpha", config["r"])),
                                target_modules=tuple(config["target_modules"]))
        return TuningConfig("lora", lora=settings), tensors
    raise CorollaError(f"{directory}: peft_type {config.get('peft_type')!r} is not supported (LORA, PROMPT_TUNING)")


def load_tensors(tuning: Tuning, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Copy saved tensors into a Tuning of the same mode and shape."""
    with torch.no_grad():
        if tuning.prompt_embeddings is not None:
            tuning.prompt_embeddings.copy_(tensors["prompt_embeddings"])
        if tuning.deep_prompts is not None:
            tuning.deep_prompts.copy_(tensors["deep_prompts"])
        for index, weight in enumerate(tuning.lora_weights):
            block, rest = divmod(index, 2 * len(tuning.targets))
            name = peft_key(tuning.spec.block_prefix, block, tuning.targets[rest // 2], "AB"[rest % 2])
            if name not in tensors:
                raise CorollaError(f"{source}: missing tensor {name}")
            weight.copy_(tensors[name])
