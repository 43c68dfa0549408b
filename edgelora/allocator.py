"""glibc's malloc set for training: the training commands restart themselves with its small-chunk
cache off.

On Linux torch's CPU tensors come from glibc's malloc. A training step allocates and frees
hundreds of activation-sized blocks while small long-lived objects (autograd nodes, tensor
headers) are placed between them. glibc keeps recently freed small chunks in a per-thread cache
(tcache) that is never merged back into the free space around them, so the freed blocks cannot
coalesce and the heap grows to well over twice the bytes in use (SmolLM2-135M QLoRA, measured
with mallinfo2: ~700 MB in use at the peak, a 1.7 GB heap). With the cache off the same training
peaks ~500 MB lower at the same speed (`benchmarks/train_speed.py --repeats 2`: 1342 vs 1848 MB
peak RSS, 263 vs 250 tokens/s); the plain PEFT loop gains too (1492 vs ~1780 MB). An allocator
the user preloads (jemalloc: 1110 MB) is left alone.

glibc reads its tunables once, when a process starts, so `edgelora train` and `edgelora demo`
start again in place (os.execve: the same process id, so torchrun and accelerate launch still see
their worker) with GLIBC_TUNABLES set. A GLIBC_TUNABLES that already sets the tcache is kept:
`GLIBC_TUNABLES=glibc.malloc.tcache_count=7` gives glibc's default back.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TRAINING_COMMANDS = ("train", "demo")
TUNABLE = "glibc.malloc.tcache_count=0"


def training_env(env: Mapping[str, str]) -> Optional[dict[str, str]]:
    """`env` with the tunable added, or None where it does not apply or is set already: not glibc
    (macOS, Windows, musl) or glibc before 2.26 (no tcache), a tcache setting of the user's own, or
    another allocator preloaded."""
    if glibc_version() < (2, 26):
        return None
    tunables = env.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" in tunables or "malloc" in env.get("LD_PRELOAD", ""):
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, TUNABLE)))}


def glibc_version() -> tuple[int, ...]:
    """The C library's version where it is glibc, else ()."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), no such name (macOS, musl)
        return ()
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" else ()


def restart_for_training(args: list[str]) -> None:
    """Start this program again with training_env when `args` (the command line after the program)
    run a training command; otherwise, or where training_env does not apply, return."""
    command = next((a for a in args if not a.startswith("-")), None)
    if command not in TRAINING_COMMANDS:
        return
    env = training_env(os.environ)
    if env is not None:
        sys.stdout.flush(), sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, env)
