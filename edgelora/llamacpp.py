"""Loading GGUF files with llama-cpp-python, with one safety policy in one place. No torch.

AMX: llama.cpp's CPU backend puts quantised weights in "extra" buffer types (AMX tiles,
repacked layouts) when the CPU advertises them. Some virtual machines advertise Intel AMX
(`amx_int8` in /proc/cpuinfo) without enabling it, and the first AMX matmul then kills the
process (SIGSEGV on `ldtilecfg`); this project's CI machine is one. Laptops have no AMX, so
on CPUs that advertise it edgelora loads without the extra buffer types unless
EDGELORA_LLAMA_EXTRA_BUFTS=1 says the machine runs AMX fine.
"""
from __future__ import annotations

import contextlib
import os
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_advertises_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def use_extra_bufts() -> bool:
    if os.environ.get("EDGELORA_LLAMA_EXTRA_BUFTS") in ("0", "1"):
        return os.environ["EDGELORA_LLAMA_EXTRA_BUFTS"] == "1"
    return not cpu_advertises_amx()


@contextlib.contextmanager
def model_params_policy():
    """Within the block, llama.cpp models load with edgelora's buffer-type policy."""
    import llama_cpp.llama_cpp as C

    if use_extra_bufts():
        yield
        return
    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


def load_llama(path: str | Path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` under the policy above."""
    from llama_cpp import Llama

    with model_params_policy():
        return Llama(model_path=str(path), **kwargs)
