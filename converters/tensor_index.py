"""Lazy access to the tensors of one or more safetensors files, one tensor at a time."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import ConvertError


class TensorIndex:
    """Names, shapes and files of every tensor, read from the headers only.

    `load` opens the file afresh for each tensor: a handle kept open keeps every page it
    has touched mapped into the process, so reading a whole model through one handle
    makes the resident set grow to the model's size.
    """

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        for path in files:
            try:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        self._where[name] = path
                        self._shape[name] = tuple(f.get_slice(name).get_shape())
            except (SafetensorError, OSError) as e:
                raise ConvertError(f"{path}: unreadable safetensors file (truncated or corrupt?): {e}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def load(self, name: str) -> torch.Tensor:
        path = self._where[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{path}: cannot read tensor {name}: {e}") from None

    def load_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, copied out of a handle closed again straight away."""
        path = self._where[name]
        try:
            with safe_open(path, framework="pt") as f:
                return f.get_slice(name)[start:stop]
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{path}: cannot read tensor {name}: {e}") from None


def model_weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model folder (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ConvertError(f"{index}: not a valid safetensors index: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{index}: listed shard missing: {missing[0]}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"{model_dir}: no *.safetensors weights (pytorch .bin checkpoints are not supported)")
    return files
