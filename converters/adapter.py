"""A PEFT LoRA (or DoRA) adapter folder: its pairs, their scales, and merging them."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ConvertError, read_json
from .tensor_index import TensorIndex

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)$")


@dataclass
class LoraModule:
    """The adapter tensors (keys into the adapter's TensorIndex) of one linear layer."""

    a: str | None = None
    b: str | None = None
    magnitude: str | None = None


class Adapter:
    def __init__(self, adapter_dir: Path):
        self.dir = Path(adapter_dir)
        config_path = self.dir / "adapter_config.json"
        weights = self.dir / "adapter_model.safetensors"
        config = read_json(config_path, f"{self.dir}: no adapter_config.json (not a PEFT adapter folder)")
        if config.get("peft_type", "LORA") != "LORA":
            raise ConvertError(f"{config_path}: peft_type {config['peft_type']!r} is not supported, only LORA")
        if not weights.is_file():
            raise ConvertError(f"{self.dir}: no adapter_model.safetensors")
        self.rank = int(config["r"])
        self.alpha = float(config["lora_alpha"])
        self.alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
        self.rslora = bool(config.get("use_rslora"))
        self.dora = bool(config.get("use_dora"))
        self.index = TensorIndex([weights])
        self.modules = self._pair_up(weights)

    def _pair_up(self, weights: Path) -> dict[str, LoraModule]:
        """{base weight name, e.g. model.layers.0.self_attn.q_proj.weight: its adapter tensors}"""
        modules: dict[str, LoraModule] = {}
        fields = {"lora_A.weight": "a", "lora_B.weight": "b", "lora_magnitude_vector": "magnitude"}
        for key in self.index.names():
            m = _KEY.match(key)
            if m is None:
                raise ConvertError(f"{weights}: unsupported adapter tensor {key} (only LoRA/DoRA on linear layers)")
            module = modules.setdefault(m["module"] + ".weight", LoraModule())
            setattr(module, fields[m["part"]], key)
        for name, module in modules.items():
            if module.a is None or module.b is None or (self.dora and module.magnitude is None):
                raise ConvertError(f"{weights}: incomplete LoRA tensors for {name}")
        return modules

    def check_base(self, base: TensorIndex) -> None:
        """Every pair must target a weight of the base, with matching shapes."""
        for name, module in self.modules.items():
            if name not in base:
                raise ConvertError(f"adapter tensor {module.a} targets {name}, which the base model does not have")
            (rank, n_in), (n_out, rank_b) = self.index.shape(module.a), self.index.shape(module.b)
            magnitude_ok = module.magnitude is None or self.index.shape(module.magnitude) == (n_out,)
            if base.shape(name) != (n_out, n_in) or rank != rank_b or not magnitude_ok:
                raise ConvertError(
                    f"adapter tensors {module.a} {[rank, n_in]} / lora_B {[n_out, rank_b]} do not fit "
                    f"base {name} {list(base.shape(name))}: adapter trained on a different base model?")

    def module_alpha(self, name: str) -> float:
        """lora_alpha, or its per-module override (PEFT's alpha_pattern matching)."""
        module = name.removesuffix(".weight")
        for pattern, alpha in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return float(alpha)
        return self.alpha

    def scale(self, name: str, rank: int) -> float:
        return self.module_alpha(name) / (math.sqrt(rank) if self.rslora else rank)

    def merge(self, name: str, weight: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """W + s*B@A; for DoRA rescaled so each output row's norm is the learned magnitude.

        `rows`: `weight` holds only these rows of the base weight (every row is merged on its own).
        """
        module = self.modules[name]
        a, b = self.index.load(module.a).float(), self.index.load(module.b).float()
        if rows is not None:
            b = b[rows]
        # one full-size f32 result, updated in place (a fresh copy: `weight` may be the loaded tensor)
        merged = weight.to(torch.float32, copy=True)
        merged.addmm_(b, a, alpha=self.scale(name, a.shape[0]))
        if self.dora:
            magnitude = self.index.load(module.magnitude).float()
            if rows is not None:
                magnitude = magnitude[rows]
            merged.mul_((magnitude / torch.linalg.norm(merged, dim=1)).unsqueeze(1))
        return merged
