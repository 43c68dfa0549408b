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

from .data import answer_limit
from .errors import EdgeloraError
from .gguf_info import quantisable, read_gguf, tensor_class

# Types a weight may get, when its row length fits their block. IQ types below 4 bits need an
# imatrix and are slow to quantise; the legacy Q4_1/Q5_1 are dominated by IQ4_NL/Q5_0 here.
CANDIDATES = ("Q2_K", "Q3_K", "IQ4_NL", "Q4_0", "Q4_K", "Q5_0", "Q5_K", "Q6_K", "Q8_0")
# The llama.cpp file type recorded for a file whose weights are mostly of a type.
FILE_TYPE = {"Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "IQ4_NL": "MOSTLY_IQ4_NL", "Q4_0": "MOSTLY_Q4_0",
             "Q4_K": "MOSTLY_Q4_K_M", "Q5_0": "MOSTLY_Q5_0", "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K",
             "Q8_0": "MOSTLY_Q8_0"}
SIZE_MARGIN = 64 << 10  # tensor alignment and metadata that differ from the f16 file's
SETTLED_Z = 3.0  # KLProbe.compare stops reading once a difference is this many standard errors from zero


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


def parse_size(text: str, what: str = "--target-size") -> int:
    """'70MB', '70 MiB', '1.5GB', '123456' -> bytes (KB/MB/GB are powers of 1000, KiB/MiB/GiB of 1024)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B?|B)?\s*", text, re.I)
    if not m:
        raise EdgeloraError(f"{what} {text!r}: give a size such as 70MB or 64MiB")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "KI": 2**10, "MI": 2**20, "GI": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def weight_options(f16: Path, importance: Callable[[str], Optional[np.ndarray]],
                   progress: Optional[Callable[[int, int], None]] = None,
                   threads: Optional[int] = None) -> dict[str, list[Option]]:
    """For each quantisable weight of the float GGUF `f16`: its options on the lower convex hull of
    (bytes, weighted error), cheapest first. Weights are measured on `threads` threads (default: a
    thread per core): llama.cpp's quantiser runs without the GIL."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from . import ggml_quant

    tensors = [t for t in read_gguf(f16).tensors if quantisable(t.name, t.shape)]

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


class KLProbe:
    """Mean KL(f16 || variant) of the next-token distributions at the answer positions of a few
    held-out training sequences, llama.cpp on both sides: what a set of weight types costs."""

    def __init__(self, f16: Path, sequences: list[tuple[list[int], list[int]]], scratch: Path,
                 max_positions: int = 512, loras=()):
        """`sequences`: (token ids, labels) as training tokenised them (labels -100 = not an answer);
        `loras`: (LoRA GGUF, scale) pairs applied to the reference."""
        from .runtime import CTX_STEP, PACKED_CTX

        self.f16, self.scratch, self.rows = f16, scratch, []
        budget = max_positions
        for ids, labels in sequences:
            rows = [j for j in range(len(ids) - 1) if labels[j + 1] != -100][:budget]
            if rows:
                self.rows.append((ids, rows))
                budget -= len(rows)
            if budget <= 0:
                break
        if not self.rows:
            raise EdgeloraError("no answer tokens in the calibration examples to measure KL divergence on")
        self.prompts = [p for ids, labels in sequences if (p := _first_prompt(ids, labels))]
        longest = max([len(ids) for ids, _ in self.rows] + [len(p) + limit for p, limit in self.prompts])
        self.n_ctx = max(-(-longest // CTX_STEP) * CTX_STEP, PACKED_CTX)
        self.loras = loras
        self.reference = self.logprobs(f16, loras)
        self._answers: Optional[list[list[int]]] = None  # the reference's greedy answers to the prompts

    def __call__(self, types: dict[str, str]) -> float:
        """KL of the f16 model with the weights in `types` quantised as given (the rest kept f16)."""
        from .files import temp_name
        from .quantize import quantize

        path = self.scratch / f"{temp_name(Path('probe'))}gguf.tmp"
        preset = {"name": "probe", "llama_ftype": "MOSTLY_Q8_0",
                  "overrides": {**{re.escape(n): t for n, t in types.items()}, ".*": "F16"}}
        try:
            quantize(self.f16, path, preset)
            return self.measure(path)
        finally:
            path.unlink(missing_ok=True)

    def measure(self, path: Path) -> float:
        """Mean KL(f16 || the GGUF at `path`) over the probe's positions."""
        return float(np.concatenate(self.kl_rows(path)).mean())

    def kl_rows(self, path: Path) -> list[np.ndarray]:
        """KL(f16 || the GGUF at `path`) at each of the probe's positions, per sequence (each
        sequence's log-probabilities made, in float64, only while its KL is taken)."""
        from .bench import log_softmax

        return [self._kl(log_softmax(lg), i) for i, lg in enumerate(self._logits(path))]

    def compare(self, path: Path, base: list[np.ndarray], z: Optional[float] = None, parts: int = 4) -> tuple[float, int]:
        """(mean KL(f16 || the GGUF at `path`) minus that of the file whose kl_rows are `base`, positions read):
        the sequences read a part at a time (a quarter of them), stopping once the difference is `z`
        standard errors from zero (a sequence's positions taken together: they are not independent).
        Only the sign is settled early; z = inf reads every sequence and gives the exact difference
        (default: SETTLED_Z)."""
        from .bench import log_softmax
        from .llamacpp import logits_at

        z = SETTLED_Z if z is None else z
        step = -(-len(self.rows) // parts)
        sums, counts = [], []  # per sequence read: the sum of the differences at its positions, their number
        with self._load(path) as rt:
            for start in range(0, len(self.rows), step):
                chunk = self.rows[start:start + step]
                logits = logits_at(rt.llm, [ids for ids, _ in chunk], [rows for _, rows in chunk])
                for i, lg in enumerate(logits, start):
                    sums.append(float((self._kl(log_softmax(lg), i) - base[i]).sum()))
                    counts.append(len(lg))
                d, n = np.asarray(sums), np.asarray(counts, dtype=float)
                mean = d.sum() / n.sum()
                error = np.sqrt(((d - mean * n) ** 2).sum()) / n.sum()
                if start + step < len(self.rows) and abs(mean) > z * error:
                    break
        return float(mean), int(n.sum())

    def _kl(self, q: np.ndarray, i: int) -> np.ndarray:
        p = self.reference[i].astype(np.float64)
        return (np.exp(p) * (p - q)).sum(-1)

    def answers_kept(self, path: Path) -> Optional[int]:
        """How many of the probe's prompts (the sequences' first turns, up to their answer) the GGUF
        at `path` answers greedily exactly as the reference does, token for token and ending where it
        ends: what a task scored on greedy answers sees, where mean KL may not (a file can be closer
        on average and still flip the one uncertain token a field hangs on). None: no prompts (text
        data). Read in one pass per prompt over prompt + the reference's answer: a greedy answer is
        the same exactly when the file ranks the reference's token first at every position of it."""
        if not self.prompts:
            return None
        if self._answers is None:
            self._answers = self._reference_answers()
        with self._load(path) as rt:
            followed = _follows(rt, [p for p, _ in self.prompts], self._answers)
        return sum(n == len(answer) for n, answer in zip(followed, self._answers))

    def _reference_answers(self) -> list[list[int]]:
        """The reference's greedy answers, each cut where reading it whole ranks another token first
        (a near-tie that batched and one-token-at-a-time evaluation break differently), so that the
        reference keeps all of its own."""
        from .runtime import greedy_answers

        prompts, limits = [p for p, _ in self.prompts], [limit for _, limit in self.prompts]
        answers = greedy_answers(self.f16, prompts, limits, self.loras, self.n_ctx)
        with self._load(self.f16, self.loras) as rt:
            return [answer[:n] for answer, n in zip(answers, _follows(rt, prompts, answers))]

    def logprobs(self, path: Path, loras=()) -> list[np.ndarray]:
        """The GGUF at `path` (with `loras`: (file, scale) pairs)'s log-probabilities at the probe's
        positions, per sequence (computed in float64, kept in float32: half the memory)."""
        from .bench import log_softmax

        return [log_softmax(lg).astype(np.float32) for lg in self._logits(path, loras)]

    def _logits(self, path: Path, loras=()) -> list[np.ndarray]:
        from .llamacpp import logits_at

        with self._load(path, loras) as rt:
            return logits_at(rt.llm, [ids for ids, _ in self.rows], [rows for _, rows in self.rows])

    def _load(self, path: Path, loras=()):
        """The GGUF at `path`, to read the probe's sequences several to a batch."""
        from .runtime import load, reading_sequences

        return load(path, loras=loras, n_ctx=self.n_ctx, sequences=reading_sequences())

    def against(self, logprobs: list[np.ndarray]) -> tuple[float, float]:
        """kl_top1 of the f16 and `logprobs` at the probe's positions, from any model with the same vocabulary."""
        return kl_top1(self.reference, logprobs)


def kl_top1(reference: list[np.ndarray], logprobs: list[np.ndarray]) -> tuple[float, float]:
    """(mean KL(reference || them), the share of positions where both rank the same token first)
    for two lists of log-probability arrays (positions x vocabulary) at the same positions."""
    kl, agree, n = 0.0, 0, 0
    for q, ref in zip(logprobs, reference, strict=True):
        p = ref.astype(np.float64)
        kl += float((np.exp(p) * (p - q)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        n += len(p)
    return kl / n, agree / n


def _first_prompt(ids: list[int], labels: list[int]) -> Optional[tuple[list[int], int]]:
    """(the tokens before a sequence's first answer, the most tokens a greedy answer to them may
    take: data.answer_limit of that answer), None where the sequence has no prompt (text data)."""
    start = next((j for j in range(1, len(ids)) if labels[j] != -100), None)
    if start is None or labels[start - 1] != -100:
        return None
    end = next((j for j in range(start, len(ids)) if labels[j] == -100), len(ids))
    return list(ids[:start]), answer_limit(end - start)


def _follows(rt, prompts: list[list[int]], answers: list[list[int]]) -> list[int]:
    """For each prompt and answer: how many of the answer's first tokens the model in `rt` ranks
    first after the prompt (and the answer's tokens before each). One read of prompt + answer."""
    from .llamacpp import logits_at

    logits = logits_at(rt.llm, [p + a for p, a in zip(prompts, answers)],
                            [range(len(p) - 1, len(p) + len(a) - 1) for p, a in zip(prompts, answers)])
    out = []
    for answer, lg in zip(answers, logits):
        same = lg.argmax(-1) == np.asarray(answer, dtype=int)
        out.append(len(answer) if same.all() else int(same.argmin()))
    return out
