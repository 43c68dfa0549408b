"""`edgelora bench`: what each quantisation level costs on your own eval set.

For every file of an export (or any GGUF files) and, where torch is installed, the unquantised
HF base + adapter, on the same held-out examples:
  quality  perplexity of the reference answers; mean KL divergence and top-1 agreement of the
           next-token distributions against the f16 GGUF at every answer position; the task
           score of greedy answers generated through the chat template (exact / contains / regex);
  cost     file size, bits per weight, load time, prompt and generation tokens/s, peak RSS.
Each model is measured in its own process (spawned, one after the other), so peak RSS is its
own and one model's memory never counts against the next. The reference (f16) runs first and
leaves its log-probabilities in a memory-mapped scratch file, which the others are compared
with position by position. Reports: report.json, report.md and ladder.png, written by
edgelora.bench.report, with the recommendation: the smallest file whose task score stays within
the threshold of the reference's.

The GGUF side needs llama-cpp-python only; the HF reference row (edgelora.bench.torch_row) needs the
`train` extra.
"""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from ..errors import EdgeloraError
from ..files import output_folder, refuse_overwrite
from ..handoff import REPORT_FILE, BenchReport
from .candidates import Candidate, Settings, discover, honest_notes  # noqa: F401 - the package's API
from .isolation import run_isolated
from .scoring import (SCORES, final_answer, json_fields, make_scorer, pick_score,  # noqa: F401
                      read_eval, task_result)


THRESHOLD = 0.97  # the recommendation: the smallest file keeping this share of the reference's task score


@dataclass
class BenchResult:
    out_dir: Path
    report: BenchReport
    files: dict[str, Path]


def bench(inputs: list[str], eval_data: str, *, out: Optional[str] = None, quants: Optional[list[str]] = None,
          limit: Optional[int] = None, score: str = "auto", pattern: Optional[str] = None, threshold: float = THRESHOLD,
          max_tokens: Optional[int] = None, device: str = "auto", threads: Optional[int] = None,
          hf: Optional[bool] = None, force: bool = False, progress: bool = True,
          json_schema: Optional[str] = None) -> BenchResult:
    """Measure every candidate (see discover) on eval_data; write report.json/.md and ladder.png.
    score "auto": json when every reference answer is JSON, else exact. json_schema ("auto": the
    schema.json beside the files, or a schema file): each GGUF is also measured with its answers
    held to the schema by a grammar, as a row of its own ("q2_k+grammar")."""
    from ..schema import resolve
    from . import report as rep

    if score not in SCORES:
        raise EdgeloraError(f"unknown score '{score}' (choose from {', '.join(SCORES)})")
    if not 0 < threshold <= 1:
        raise EdgeloraError(f"--threshold {threshold}: must be in (0, 1]")
    if limit is not None and limit < 1:
        raise EdgeloraError(f"--limit {limit}: must be at least 1")
    rows = read_eval(eval_data, limit)
    score = pick_score(score, rows)
    make_scorer(score, pattern)  # bad options fail before any model loads
    cands = discover(inputs, quants, hf)
    schema = resolve(json_schema, *(c.model for c in cands if c.route != "hf"))
    if schema is not None:
        cands = [v for c in cands for v in (c, *([] if c.route == "hf" else [
            replace(c, label=f"{c.label}+grammar", reference=False, json_schema=schema, notes=[])]))]  # notes: the row above's
    out_dir = Path(out) if out else (Path(inputs[0]) / "bench" if Path(inputs[0]).is_dir() else Path("bench"))
    files = {"json": out_dir / REPORT_FILE, "md": out_dir / "report.md", "png": out_dir / "ladder.png"}
    output_folder(out_dir, "report folder")
    refuse_overwrite(files.values(), force)
    longest = max(len((r["reasoning"] + r["answer"]).encode()) + (32 if r["reasoning"] else 0)
                  for r in rows) + 16  # room for any reference answer (and its <think> block): a token >= 1 byte
    settings = Settings(score, pattern, max_tokens or longest, device, threads)
    results = _measure_all(cands, rows, settings, out_dir, progress)
    report = rep.build_report(cands, results, rows, eval_data=eval_data, threshold=threshold, settings=asdict(settings))
    rep.write_report(report, files)
    return BenchResult(out_dir, report, files)


def _measure_all(cands: list[Candidate], rows: list[dict], s: Settings, out_dir: Path, progress: bool) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    scratch = out_dir / ".scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    results: list[dict] = []
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            for c in cands:
                task = bar.add_task(c.label, total=2 * len(rows))
                result = run_isolated(c, rows, s, scratch, lambda: bar.advance(task))
                if c.json_schema is not None:  # the same weights as the row before it: the same logits
                    result = {**{k: results[-1][k] for k in ("perplexity", "kl", "top1")}, **result}
                results.append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results
