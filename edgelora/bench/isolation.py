"""Each row in a process of its own (spawned, one after the other), so its peak memory is its own
and one model never counts against the next; progress and the result come back on a queue."""
from __future__ import annotations

import logging
import multiprocessing as mp
import warnings
from pathlib import Path

from ..errors import EdgeloraError
from .candidates import Candidate, Settings


def _worker(c: Candidate, rows: list[dict], s: Settings, scratch: str, queue) -> None:
    """Process entry point: measure one candidate, report ticks and the result (or the error) on `queue`."""
    from ..llamacpp import captured_log

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # a fresh process: the CLI's filters are not here
    try:
        with captured_log():  # llama.cpp's own chatter stays out of the progress display
            if c.route == "hf":
                from .torch_row import measure_hf as measure
            else:
                from .gguf_row import measure_gguf as measure
            queue.put(("done", measure(c, rows, s, Path(scratch), lambda: queue.put(("tick", None)))))
    except EdgeloraError as e:
        queue.put(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - the parent reports it in one line, naming the model
        queue.put(("error", f"{type(e).__name__}: {e}"))


def run_isolated(c: Candidate, rows: list[dict], s: Settings, scratch: Path, on_tick) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(c, rows, s, str(scratch), queue), daemon=True)
    proc.start()
    try:
        while True:
            try:
                kind, payload = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: is the worker still alive?
                if not proc.is_alive():
                    raise EdgeloraError(f"{c.label}: the measuring process died (exit code {proc.exitcode})") from None
                continue
            if kind == "tick":
                on_tick()
            elif kind == "error":
                raise EdgeloraError(f"{c.label} ({c.model}): {payload}")
            else:
                return payload
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
