"""Versions of the packages that made a file, for summaries and manifests."""
from __future__ import annotations

import importlib.metadata as md

TOOLS = ("edgelora", "torch", "transformers", "peft", "bitsandbytes", "gguf", "llama_cpp_python")


def package_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
