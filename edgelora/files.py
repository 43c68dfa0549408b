"""Files in and out, safely: atomic outputs, leftovers of killed runs swept, damaged inputs named.

Every output goes through `atomic_path`: written under a temporary name in the same folder
(`.NAME.PID.RANDOM.tmp`), fsynced, then renamed, so nothing partial ever appears under a final
name. A process killed mid-write leaves its temporary behind; the next write into that folder
removes the temporaries whose process is gone. An OS error while writing (a full disk, a
read-only folder) becomes a one-line EdgeloraError naming the final path and the cause.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import EdgeloraError

_TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def temp_name(final: Path) -> str:
    """The prefix of a temporary for `final`; `_TEMP_NAME` matches what mkdtemp makes of it."""
    return f".{final.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporaries that killed processes left in `folder`; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def os_error(e: OSError, path: Path | str | None = None) -> EdgeloraError:
    """One line for an OS error: the path it concerns and the system's reason."""
    where = path if path is not None else (e.filename or "")
    reason = e.strerror or str(e) or type(e).__name__
    return EdgeloraError(f"{where}: {reason}" if where else reason)


def output_folder(path: Path | str, what: str = "output folder") -> Path:
    """`path` as a folder to write into, created if missing; one line if it is a file or cannot be made."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise EdgeloraError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, path) from None
    return path


def refuse_overwrite(paths, force: bool, hint: str = "use --force to overwrite") -> None:
    """Every command's guard for its outputs: the first of `paths` that exists stops it, unless `force`."""
    taken = next((Path(p) for p in paths if Path(p).exists()), None)
    if taken is not None and not force:
        raise EdgeloraError(f"{taken} already exists; {hint}")


def remove_own_folder(folder: Path, marker: str, what: str) -> None:
    """--force's delete: `folder` goes only if it is empty or one of ours (it holds the file `marker`)."""
    if folder.exists():
        if not (folder / marker).is_file() and any(folder.iterdir()):
            raise EdgeloraError(f"{folder} exists and is not an edgelora {what}; refusing to delete it")
        shutil.rmtree(folder)


@contextlib.contextmanager
def atomic_path(final: Path | str, suffix: str = ""):
    """Yield a temporary path next to `final`; on success rename it onto `final`.

    Works for files and for directories (a directory is renamed whole). On error the
    temporary is removed and nothing appears under the final name; an OS error on the way
    becomes an EdgeloraError naming `final`.
    """
    final = Path(final)
    output_folder(final.parent)
    sweep_stale_temps(final.parent)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=temp_name(final), suffix=".tmp", dir=final.parent))
    except OSError as e:
        raise os_error(e, final) from None
    tmp = tmp_dir / ("x" + suffix)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        raise os_error(e, final) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: Path | str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def check_free_space(path: Path | str, needed: int) -> None:
    """Refuse up front to write about `needed` bytes at `path` where the disk has less room."""
    path = Path(path)
    free = shutil.disk_usage(output_folder(path.parent)).free
    if free < needed:
        raise EdgeloraError(f"{path}: not enough disk space ({free >> 20} MiB free, about {needed >> 20} MiB needed)")


def disk_full(path: Path | str, margin: int = 1 << 20) -> bool:
    """Whether the disk holding `path` has (almost) no room left: what a failed write in C code
    that reports no errno (llama.cpp's quantiser) most likely ran into."""
    try:
        return shutil.disk_usage(Path(path)).free < margin
    except OSError:
        return False


def read_json(path: Path | str, what: str = "file", required: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`; a one-line EdgeloraError naming the file when it is missing,
    unreadable, not valid JSON, not an object, or lacks one of the `required` keys."""
    path = Path(path)
    if not path.is_file():
        raise EdgeloraError(f"{path}: {what} not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise os_error(e, path) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise EdgeloraError(f"{path}: damaged {what}, not valid JSON ({_short(e)})") from None
    if not isinstance(data, dict):
        raise EdgeloraError(f"{path}: damaged {what}, not a JSON object")
    missing = [k for k in required if k not in data]
    if missing:
        raise EdgeloraError(f"{path}: damaged {what}, no '{missing[0]}'")
    return data


def _short(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if isinstance(e, UnicodeDecodeError):
        return f"invalid UTF-8 at byte {e.start}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__
