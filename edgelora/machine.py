"""The machine and the process: device names, peak memory, the package versions that made a file.

One device vocabulary for every command: auto, cpu, cuda, metal (Apple's GPU, which torch calls
"mps" and llama.cpp "Metal"). The torch side maps it with `torch_device`.
"""
from __future__ import annotations

import sys
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda", "metal")
_TORCH_NAMES = {"metal": "mps"}  # our name -> torch's, where they differ
TOOLS = ("edgelora", "torch", "transformers", "peft", "bitsandbytes", "gguf", "llama_cpp_python")


def torch_device(device: str) -> str:
    """torch's name for one of DEVICES ('metal' -> 'mps'); torch's own 'mps' is taken as it is."""
    return _TORCH_NAMES.get(device, device)


def device_name(torch_name: str) -> str:
    """Our name for a torch device ('mps' -> 'metal'), for summaries and messages."""
    return {v: k for k, v in _TORCH_NAMES.items()}.get(torch_name, torch_name)


def package_versions(names: tuple[str, ...] = TOOLS) -> dict[str, str]:
    """{package: installed version} for those of `names` that are installed."""
    import importlib.metadata as md  # not at import: the run side's start needs none of it

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB. On Linux VmHWM, not ru_maxrss: a spawned process
    inherits its parent's ru_maxrss through fork and exec, and the parent may hold a trained model.
    Elsewhere ru_maxrss, which macOS gives in bytes and the BSDs in KiB; Windows' peak working set."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return psutil.Process().memory_info().peak_wset / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def release_memory() -> None:
    """Give the memory this process has freed back to the system: garbage collected, then glibc's
    malloc_trim. torch's freed tensors stay in malloc's arenas, counted as resident, until trimmed
    (at 1B, 490 of the 770 MB the torch comparison left behind); elsewhere the garbage collection alone."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass
