"""Who an exported GGUF is: the model-card keys llama.cpp's converter writes (general.name,
basename, finetune, size_label, license, base_model.*, dataset.*), which LM Studio and Ollama
list and `edgelora inspect` shows.

    fine-tune of a GGUF base:  name = the run's name (or --name), basename / size_label / license /
                               organization / languages carried over from the base's own card, finetune = the
                               name, base_model.0.* = the base's name and organization, and
                               edgelora.base_model.sha256 = the base file's sha256 (as in manifest.json),
                               dataset.0.name = the training data file.
    plain conversion:          the base's own card, with its sha256 and no dataset.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import gguf

from .config import slug

K = gguf.Keys.General
BASE_SHA256 = "edgelora.base_model.sha256"  # GGUF has no key for it; llama.cpp ignores unknown keys
REFIT_QUANT = "edgelora.refit.quant"  # a LoRA refitted against the quantised base file whose sha256 it records
CARRIED = (K.BASENAME, K.SIZE_LABEL, K.ORGANIZATION, K.LICENSE, K.LANGUAGES)  # from the base to its fine-tune


def base_model_key(field: str) -> str:
    """general.base_model.0.name etc. for the one base a fine-tune has."""
    return getattr(K, f"BASE_MODEL_{field.upper()}").format(id=0)


def base_card(base_kind: str, base_path: Path, hf_dir: Path) -> dict:
    """The base's own card: read from its GGUF, or made from an HF folder's config.json and size."""
    from .gguf_info import inspect_gguf

    if base_kind == "gguf":
        return inspect_gguf(base_path)["card"]
    import json

    from .converters.tensor_index import TensorIndex, model_weight_files

    config = json.loads((hf_dir / "config.json").read_text())
    index = TensorIndex(model_weight_files(hf_dir))
    n_params = sum(math.prod(index.shape(n)) for n in index.names())
    name = str(config.get("_name_or_path") or hf_dir.name).rstrip("/").rsplit("/", 1)[-1]
    return {K.NAME: name, K.BASENAME: slug(name), K.SIZE_LABEL: gguf.utility.size_label(n_params, 0, 0, 0)}


def model_card(base: dict, base_sha256: str, name: Optional[str] = None, dataset: Optional[str] = None) -> dict:
    """The card of a fine-tune named `name` of `base` (a base_card) trained on `dataset`; without a
    name, the base's own card (a plain conversion)."""
    if name is None:
        return {**base, BASE_SHA256: base_sha256}
    card = {K.NAME: name, **{k: base[k] for k in CARRIED if k in base}, K.FINETUNE: slug(name),
            K.BASE_MODEL_COUNT: 1, base_model_key("name"): base.get(K.NAME) or "unknown"}
    if base.get(K.ORGANIZATION):
        card[base_model_key("organization")] = base[K.ORGANIZATION]
    card[BASE_SHA256] = base_sha256
    if dataset:
        card.update({K.DATASET_COUNT: 1, K.DATASET_NAME.format(id=0): dataset})
    return card
