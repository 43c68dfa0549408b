"""Quantisation presets as data: one YAML file per preset (installed as edgelora.quant_presets)."""
from __future__ import annotations

from importlib import resources

import yaml


def names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml"))


def load(name: str) -> dict:
    """The preset called `name` (e.g. 'q4_k_m'); KeyError listing the known ones otherwise."""
    path = resources.files(__name__) / f"{name.lower()}.yaml"
    if not path.is_file():
        raise KeyError(f"unknown quant '{name}' (known: {', '.join(names())})")
    return yaml.safe_load(path.read_text())
