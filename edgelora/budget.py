"""Per-tensor quantisation types chosen to a size budget, by measured loss (`export --target-size`).

A fixed preset gives every weight of a kind the same type, and on models whose rows are not a
multiple of 256 (SmolLM2's 576, Gemma-3-270M's 640) llama.cpp's K-quant presets fall back tensor
by tensor. Here each weight gets its own type from those that fit its rows without fallback:

1. error: for every weight and candidate type, llama.cpp's own quantiser and dequantiser
   (edgelora.ggml_quant) give the bytes and the importance-weighted squared error
   sum_ij imatrix_j * (w_ij - w_hat_ij)^2 -- the expected squared error of that layer's output.
2. scale: those errors are in each layer's own units, so for each class of weight (attn_q,
   ffn_down, token_embd, ...) one measurement says what they cost at the model's output: the
   class alone quantised to its cheapest type, everything else f16, and the mean KL divergence
   from the f16 model's next-token distributions on held-out training examples (llama.cpp runs
   both). KL per unit error is the class's sensitivity.
3. choose: every weight starts at its cheapest type; the upgrade with the most predicted KL saved
   per byte is taken, then the next, while the file stays within the budget (the greedy
   solution of the Lagrangian relaxation, on each weight's lower convex hull of options).
The result is measured again (its real KL) and reported beside the prediction.
"""
from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import EdgeloraError
from .gguf_header import gguf_layout
from .gguf_info import quantisable, tensor_class

# Types a weight may get, when its row length fits their block. IQ types below 4 bits need an
# imatrix and are slow to quantise; the legacy Q4_1/Q5_1 are dominated by IQ4_NL/Q5_0 here.
CANDIDATES = ("Q2_K", "Q3_K", "IQ4_NL", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
# The llama.cpp file type recorded for a file whose weights are mostly of a type.
FILE_TYPE = {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "IQ4_NL": "MOSTLY_IQ4_NL", "Q4_0": "MOSTLY_Q4_0",
             "Q4_K": "MOSTLY_Q4_K_M", "Q5_0": "MOSTLY_Q5_0", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
             "Q8_0": "MOSTLY_Q8_0"}
SIZE_MARGIN = 64 << 10  # tensor alignment and metadata that differ from the f16 file's


@dataclass
class Option:
    qtype: str
    nbytes: int
    error: float


@dataclass
class Choice:
    types: dict[str, str]  # tensor name -> ggml type name
    predicted_bytes: int
    predicted_kl: float
    sensitivity: dict[str, float]  # tensor class -> KL per unit of weighted error

    @property
    def file_type(self) -> str:
        """The llama.cpp file type of the type most weights (by count) got."""
        counts: dict[str, int] = {}
        for t in self.types.values():
            counts[t] = counts.get(t, 0) + 1
        return FILE_TYPE[max(counts, key=counts.get)]

    def overrides(self) -> dict[str, str]:
        """{whole-name pattern: type}, as quant presets give them to llama.cpp."""
        return {re.escape(name): qtype for name, qtype in self.types.items()}


def weight_options(f16: Path, importance: Callable[[str], Optional[np.ndarray]],
                   progress: Optional[Callable[[int, int], None]] = None,
                   threads: Optional[int] = None) -> dict[str, list[Option]]:
    """For each quantisable weight of the float GGUF `f16`: its options on the lower convex hull of
    (bytes, weighted error), cheapest first. Weights are measured on `threads` threads (default: a
    thread per core): llama.cpp's quantiser runs without the GIL."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from . import ggml_quant

    tensors = [t for t in gguf_layout(f16).tensors if quantisable(t.name, t.shape)]

    def measure(t) -> list[Option]:
        w = np.asarray(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))
        imp = importance(t.name)
        return _lower_hull([Option(q, *ggml_quant.quantization_error(w, q, imp)) for q in CANDIDATES
                            if ggml_quant.fits(q, w.shape[1])])

    total, done, out = sum(int(t.n_elements) for t in tensors), 0, {}
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        for t, options in zip(tensors, pool.map(measure, tensors)):
            out[t.name] = options
            done += int(t.n_elements)
            if progress:
                progress(done, total)
    return out


def _lower_hull(options: list[Option]) -> list[Option]:
    """The options worth taking: no other is both smaller and better, and each step up buys less
    error per byte than the one before (so greedy upgrades take them in order)."""
    hull: list[Option] = []
    for o in sorted(options, key=lambda o: (o.nbytes, o.error)):
        if hull and o.error >= hull[-1].error:
            continue  # bigger and no better
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) <= _slope(hull[-1], o):
            hull.pop()  # the middle one saves less per byte than going straight past it
        hull.append(o)
    return hull


def _slope(a: Option, b: Option) -> float:
    return (a.error - b.error) / max(b.nbytes - a.nbytes, 1)


def choose(options: dict[str, list[Option]], budget: int, overhead: int,
           class_kl: Callable[[dict[str, str]], float]) -> Choice:
    """Types for every weight within `budget` bytes for the whole file (`overhead`: what is not a
    quantised weight), minimising predicted KL; `class_kl(types)` measures the KL of a file with
    those weights quantised as given and the rest f16."""
    cheapest = {name: opts[0] for name, opts in options.items()}
    floor = overhead + SIZE_MARGIN + sum(o.nbytes for o in cheapest.values())
    if budget < floor:
        raise EdgeloraError(f"a target of {budget / 2**20:.1f} MiB is below the smallest file these types allow "
                            f"({floor / 2**20:.1f} MiB: every weight at its cheapest type)")
    sensitivity = {}
    for cls in sorted({tensor_class(n) for n in options}):
        members = {n: o for n, o in cheapest.items() if tensor_class(n) == cls}
        error = sum(o.error for o in members.values())
        kl = class_kl({n: o.qtype for n, o in members.items()})
        sensitivity[cls] = max(kl, 0.0) / error if error > 0 else 0.0

    def cost(name: str, o: Option) -> float:
        return sensitivity[tensor_class(name)] * o.error

    level = {name: 0 for name in options}
    size = floor
    heap = []

    def push(name: str) -> None:
        opts, i = options[name], level[name]
        if i + 1 < len(opts):
            gain = (cost(name, opts[i]) - cost(name, opts[i + 1])) / max(opts[i + 1].nbytes - opts[i].nbytes, 1)
            heapq.heappush(heap, (-gain, name))

    for name in options:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        opts, i = options[name], level[name]
        step = opts[i + 1].nbytes - opts[i].nbytes
        if size + step > budget:
            continue  # this upgrade does not fit; a cheaper one elsewhere may
        level[name], size = i + 1, size + step
        push(name)
    chosen = {name: options[name][i] for name, i in level.items()}
    return Choice({n: o.qtype for n, o in chosen.items()}, size - SIZE_MARGIN,
                  sum(cost(n, o) for n, o in chosen.items()), sensitivity)
