"""allocator.py: the training commands restart once with glibc's small-chunk cache off."""
import os
import subprocess
import sys

import pytest

from edgelora import allocator


def test_training_env_turns_the_tcache_off_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(allocator, "glibc_version", lambda: (2, 36))
    assert allocator.training_env({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}
    got = allocator.training_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})  # the user's own tunables kept
    assert got == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.tcache_count=0"}
    assert allocator.training_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) is None  # glibc's default, asked for
    assert allocator.training_env({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}) is None
    for old_or_none in [(2, 17), ()]:  # no tcache before 2.26; () = not glibc (macOS, Windows, musl)
        monkeypatch.setattr(allocator, "glibc_version", lambda v=old_or_none: v)
        assert allocator.training_env({"PATH": "/bin"}) is None


def _restarted(*args: str) -> list[str]:
    """What a process prints that restarts for `args` and then prints its GLIBC_TUNABLES."""
    code = ("import os, sys; from edgelora.allocator import restart_for_training; print('started', flush=True); "
            f"restart_for_training({list(args)!r}); print(os.environ.get('GLIBC_TUNABLES'))")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(allocator.glibc_version() < (2, 26), reason="glibc >= 2.26 only")
def test_a_training_command_restarts_once_with_the_tunable():
    assert _restarted("-v", "train", "--data", "x.jsonl") == ["started", "started", "glibc.malloc.tcache_count=0"]
    assert _restarted("demo") == ["started", "started", "glibc.malloc.tcache_count=0"]
    assert _restarted("export", "run", "--quant", "q8_0") == ["started", "None"]  # not training: no restart
    assert _restarted("--help") == ["started", "None"]


@pytest.mark.skipif(allocator.glibc_version() < (2, 26), reason="glibc >= 2.26 only")
def test_the_program_restarts_for_train_and_then_runs_it():
    """cli.program (the `edgelora` script and `python -m edgelora.cli`): restarted once, then the command."""
    code = ("import os, sys; from edgelora.cli import program; print('tunables', os.environ.get('GLIBC_TUNABLES'), "
            "flush=True); sys.argv = ['edgelora', 'train', '--help']; program()")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["tunables None", "tunables glibc.malloc.tcache_count=0"]
    assert "Train a LoRA adapter" in out.stdout
