"""Where a long job's time and memory go: named stages, timed.

    clock = StageClock()
    with clock.running():              # code anywhere below may say `with stage("trials"):`
        with stage("convert"): ...
        with stage("quantise"):
            with stage("trials"): ...  # nested: these seconds are the trials', not quantise's
    clock.seconds  # {"convert": 3.1, "quantise": 4.0, "trials": 51.2}
    clock.summary()  # "58 s in all; where the time went: trials 51 s (88%), quantise 4.0 s (7%), convert 3.1 s (5%)"

A stage may run many times; its seconds add up. Each stage's time excludes the stages nested in it,
so the stages add up to the time spent in any of them. Memory likewise: `peak_rise_mb` is how far
the process's peak RSS rose while each stage ran (its own part, summed over its runs), so the
stage that set the final peak is the one with a rise where stages take turns (measure, answers,
trials, for each quant); `peak_mb` is the peak so far when each stage last ended. `stage` with no
clock running does nothing, so library code can mark its stages whoever calls it.
"""
from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Iterator, Optional

from .machine import peak_rss_mb

_running: contextvars.ContextVar[Optional["StageClock"]] = contextvars.ContextVar("edgelora_stage_clock", default=None)


class StageClock:
    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.peak_rise_mb: dict[str, float] = {}
        self._open: list[list] = []  # [name, start, seconds and peak rise of the stages nested in it, peak at start]

    @contextlib.contextmanager
    def running(self) -> Iterator["StageClock"]:
        """Within the block, `stage(...)` anywhere in this thread times into this clock."""
        token = _running.set(self)
        try:
            yield self
        finally:
            _running.reset(token)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        entry = [name, time.perf_counter(), 0.0, 0.0, peak_rss_mb()]
        self._open.append(entry)
        try:
            yield
        finally:
            self._open.pop()
            elapsed, peak = time.perf_counter() - entry[1], peak_rss_mb()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - entry[2]
            self.peak_rise_mb[name] = self.peak_rise_mb.get(name, 0.0) + peak - entry[4] - entry[3]
            if self._open:
                self._open[-1][2] += elapsed
                self._open[-1][3] += peak - entry[4]
            self.peak_mb[name] = peak

    def total(self) -> float:
        return time.perf_counter() - self.started

    def as_dict(self) -> dict[str, float]:
        """{stage: seconds, ..., "total": seconds since the clock started} (what a manifest records)."""
        return {**{k: round(v, 3) for k, v in self.seconds.items()}, "total": round(self.total(), 3)}

    def summary(self) -> str:
        return summary(self.as_dict())


def summary(seconds: dict[str, float]) -> str:
    """One line from a record as_dict makes: the total, then each stage's seconds and share, the longest first."""
    total = seconds["total"] or 1e-9
    parts = [f"{name} {_seconds(s)} s ({s / total:.0%})" for name, s in
             sorted(seconds.items(), key=lambda kv: -kv[1]) if name != "total"]
    return f"{_seconds(seconds['total'])} s in all; where the time went: " + (", ".join(parts) or "no stage")


def _seconds(s: float) -> str:
    return f"{s:.0f}" if s >= 10 else f"{s:.1f}"


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage `name` of the clock running in this context, if one is."""
    clock = _running.get()
    if clock is None:
        yield
        return
    with clock.stage(name):
        yield


@contextlib.contextmanager
def progress_bar(label: str, unit: str = "B"):
    """A byte progress bar for one file, fed by `update(done, total)`; closed however the write ends,
    so an error message never lands on the bar's line."""
    from tqdm.auto import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=label, unit=unit, unit_scale=True, dynamic_ncols=True, leave=False)
        bar.update(done - bar.n)

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()
