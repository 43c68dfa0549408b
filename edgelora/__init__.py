"""edgelora: from a small dataset of your own to a fine-tuned model that runs offline on a laptop.

The Python API mirrors the CLI. Importing edgelora is light: torch and transformers are
imported only by the stages that need them (training and export), never by the runtime.

    import edgelora
    run = edgelora.train(data="my.jsonl", out="runs/my", base="smollm2-135m", max_steps=100)
    files = edgelora.export("runs/my", quants=["q4_k_m"], lora_gguf=True)
    model = edgelora.load("runs/my/export/my-q4_k_m.gguf")      # llama.cpp, no torch
    print(model.chat([{"role": "user", "content": "Hello"}]))
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import EdgeloraError

__all__ = ["EdgeloraError", "train", "export", "load", "__version__"]


def train(config: str | None = None, *, force: bool = False, resume: bool = False, **options):
    """Train a LoRA/QLoRA adapter; keyword options are the `edgelora train` flags (rank=8, lr=2e-4, ...).

    `config` is an optional YAML file; options override it. Returns a TrainResult with the
    run directory, its summary and the metrics rows.
    """
    from .config import load_config
    from .trainer import train as run

    return run(load_config(config, options), force=force, resume=resume)


def export(run_dir: str | None = None, **options):
    """Write GGUF files from a run directory (or `base=` alone); options as `edgelora export`:
    quants=["q4_k_m"], lora_gguf=False, out=None, force=False. Returns an ExportResult."""
    from .exporter import export as run

    return run(run_dir, **options)


def load(model: str, **options):
    """Open a GGUF for chat/completion through llama.cpp (loras=[(path, scale)], device="auto", ...)."""
    from .runtime import load as run

    return run(model, **options)
