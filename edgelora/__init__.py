"""edgelora: from a small dataset of your own to a fine-tuned model that runs offline on a laptop.

The Python API mirrors the CLI. Importing edgelora is light: torch and transformers are
imported only by the stages that need them (training and export), never by the runtime.

    import edgelora
    result = edgelora.train(data="my.jsonl", out="runs/my", base="smollm2-135m", max_steps=100)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import EdgeloraError

__all__ = ["EdgeloraError", "train", "__version__"]


def train(config: str | None = None, *, force: bool = False, resume: bool = False, **options):
    """Train a LoRA/QLoRA adapter; keyword options are the `edgelora train` flags (rank=8, lr=2e-4, ...).

    `config` is an optional YAML file; options override it. Returns a TrainResult with the
    run directory, its summary and the metrics rows.
    """
    from .config import load_config
    from .trainer import train as run

    return run(load_config(config, options), force=force, resume=resume)
