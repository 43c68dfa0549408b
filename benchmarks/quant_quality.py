"""Quantisation quality on the user's own task: the ladder with and without a task importance
matrix, and a file of per-tensor types fitted to a size budget, side by side in one run.

For each bundled task -- extract (the demo task: a person, a city and a year as one line of JSON)
and records (contact cards: 8 fields of mixed types, answers ~4x longer) -- on SmolLM2-135M:

  1. a QLoRA run with the demo's settings (60 steps of 8 examples, lr 1e-3), reused from --work;
  2. three exports of that run, each at q8_0, q4_k_m, q2_k and auto (--target-size), the f16 once:
     "yes", with the imatrix (measured on the run's own training examples, a token before an
     answer token weighted 1 + A x the model's entropy there, A = --decision-weight; of the files
     the export tries with it -- every weight, or only the groups of weights (a kind of weight in a
     third of the layers) where it lowered KL on their own -- the better); "no", --imatrix none;
     and "shipped", the default export, which also weighs the file made without the matrix and
     keeps whichever answers more held-out training prompts as the f16 does;
  3. one bench over all those files on the task's held-out eval set (a shipped file identical to
     a "yes" or "no" file takes that file's row): the f16 GGUF is the reference every other
     file's KL divergence and top-1 agreement are measured against.

It prints, per task and quant, size, bits/weight, KL, top-1, perplexity and task score (JSON field
accuracy: both tasks answer in JSON) without and with the imatrix, the KL ratio, and the targets
(issue #11):
  - KL at q4_k_m and at q2_k at least 30% lower with the imatrix;
  - every shipped quant keeps at least 90% of f16's task score;
  - on the demo task, the smallest file keeping at least 97% of f16's task score is at most 75 MiB.
The exit status is 1 if a target is missed. Everything is written under --work (bench reports per
task, quant_quality-aA.json with every number) and reused by the next run: delete a task's folder, or
pass --rebench, to measure again.

    python benchmarks/quant_quality.py                       # both tasks (about an hour on 2 cores)
    python benchmarks/quant_quality.py --tasks extract --limit 30 --target-size 72MiB
    python benchmarks/quant_quality.py --tasks records --decision-weight 100   # weight the decisions

Each --decision-weight has its own imatrix and shipped exports and bench under --work; the run and
the exports without the imatrix are shared.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from edgelora.imatrix import DECISION_WEIGHT

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
QUANTS = ["q8_0", "q4_k_m", "q2_k"]
TRAIN = dict(base="smollm2-135m", method="auto", rank=8, targets="all-linear", batch_size=8, seq_len=256, seed=0,
             max_steps=60, lr=1e-3, save_every=20, eval_every=1000)


VARIANTS = {  # label suffix -> (--imatrix, keep_better)
    "": ("none", True), "+imatrix": ("auto", False), "+shipped": ("auto", True)}


def ladder(task: str, work: Path, target_size: str, decision_weight: float) -> tuple[Path, dict, dict, dict]:
    """Train and export one task (each step reused from `work` unless removed): the folder of
    every distinct file under its row label (f16, q8_0, q8_0+imatrix, q8_0+shipped, ...), the
    label of each shipped file identical to one of those, the budgeted file's manifest entry, and
    the seconds each step took."""
    from edgelora.config import load_config
    from edgelora.exporter import export
    from edgelora.handoff import ExportManifest
    from edgelora.trainer import train

    run = work / task / "run"
    t0 = time.time()
    if not (run / "summary.json").is_file():
        train(load_config(None, {**TRAIN, "data": str(DATA / f"{task}_train.jsonl"), "out": str(run)}), force=True)
    timings = {"train_s": round(time.time() - t0, 1)}
    files, same, by_sha = {}, {}, {}
    for suffix, (imatrix, keep_better) in VARIANTS.items():
        variant = suffix[1:] or "plain"
        out = work / task / (f"{variant}-a{decision_weight:g}" if imatrix == "auto" else variant)
        t0 = time.time()
        if not (out / "manifest.json").is_file():
            export(str(run), quants=(["f16"] if suffix == "+imatrix" else []) + QUANTS, imatrix=imatrix,
                   imatrix_decision_weight=decision_weight, target_size=target_size, out=str(out), force=True,
                   keep_better=keep_better)
        timings[f"export_{variant}_s"] = round(time.time() - t0, 1)
        manifest = ExportManifest.read(out)
        for o in manifest.outputs:
            label = "f16" if o.quant == "f16" else o.quant + suffix
            if o.sha256 in by_sha:
                same[label] = by_sha[o.sha256]
            else:
                files[label] = by_sha[o.sha256] = out / o.file
        if suffix == "+shipped":
            budget = manifest.budget
    by_path = {path: label for label, path in files.items()}
    same = {label: by_path[path] for label, path in same.items()}
    folder = work / task / f"ladder-a{decision_weight:g}"  # the files under distinct names: the bench labels rows by them
    folder.mkdir(parents=True, exist_ok=True)
    for label, path in files.items():
        link = folder / f"{label}.gguf"
        link.unlink(missing_ok=True)
        link.symlink_to(path.resolve())
    return folder, same, budget, timings


def run_task(task: str, work: Path, limit: int | None, target_size: str, threads: int | None,
             decision_weight: float, rebench: bool = False) -> dict:
    """Train, export and bench one task; each step's results under `work` are reused unless removed
    (or, for the bench, --rebench)."""
    from edgelora.bench import bench
    from edgelora.handoff import BenchReport

    folder, same, budget, timings = ladder(task, work, target_size, decision_weight)
    order = ["f16"] + [q + s for q in QUANTS + ["auto"] for s in VARIANTS if q + s not in same]
    report_path = work / task / f"bench-a{decision_weight:g}" / "report.json"
    t0 = time.time()
    benched = BenchReport.read(report_path.parent) if report_path.is_file() else None
    if rebench or benched is None or [r.label for r in benched.rows] != order:
        bench([str(folder / f"{label}.gguf") for label in order], str(DATA / f"{task}_eval.jsonl"),
              out=str(report_path.parent), limit=limit, hf=False, threads=threads, force=True,
              progress=sys.stderr.isatty())
    timings["bench_s"] = round(time.time() - t0, 1)
    report = BenchReport.read(report_path.parent)
    rows = {r.label: dataclasses.asdict(r) for r in report.rows}
    rows.update({label: {**rows[twin], "label": label, "same_as": twin} for label, twin in same.items()})
    return {"rows": rows, "budget": budget, "timings": timings, "examples": report.examples,
            "decision_weight": decision_weight}


def table(task: str, res: dict) -> list[str]:
    rows, f16 = res["rows"], res["rows"]["f16"]
    lines = [f"## {task} ({res['examples']} held-out examples; f16 {f16['size_bytes'] / 2**20:.1f} MiB, "
             f"task score {f16['task_score']:.3f}, perplexity {f16['perplexity']:.4f}; imatrix decision weight "
             f"{res['decision_weight']:g})", "",
             "| quant | imatrix | size MiB | bits/weight | KL vs f16 | top-1 | perplexity | task score |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for quant in QUANTS + ["auto"]:
        for suffix, flag in zip(VARIANTS, ("no", "yes", "shipped")):
            r = rows[quant + suffix]
            twin = {"": "no", "+imatrix": "yes"}[r["same_as"][len(quant):]] if "same_as" in r else None
            lines.append(f"| {quant} | {flag + (f' (= {twin})' if twin else '')} | {r['size_bytes'] / 2**20:.1f} | "
                         f"{r['bpw']:.2f} | {r['kl']:.4g} | {r['top1']:.3f} | {r['perplexity']:.4f} | "
                         f"{r['task_score']:.3f} |")
    lines.append("")
    for quant in QUANTS + ["auto"]:
        plain, imat = rows[quant]["kl"], rows[quant + "+imatrix"]["kl"]
        lines.append(f"{quant}: KL with imatrix / without = {imat / plain:.3f}" if plain > 0 else f"{quant}: KL 0")
    b = res["budget"]
    lines.append(f"auto: target {b['target_bytes'] / 2**20:.1f} MiB, {b['size_bytes'] / 2**20:.2f} MiB written; "
                 f"KL predicted {b['predicted_kl']:.4g}, measured on {b['kl_sequences']} training sequences "
                 f"{b['measured_kl']:.4g}; types: "
                 + "; ".join(f"{c} {'+'.join(f'{t}x{n}' for t, n in ts.items())}" for c, ts in b["class_types"].items()))
    t = res["timings"]
    lines.append("seconds: " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items()))
    return lines + [""]


def targets(results: dict) -> list[tuple[str, bool, str]]:
    out = []
    for task, res in results.items():
        rows = res["rows"]
        f16 = rows["f16"]["task_score"]
        for quant in ("q4_k_m", "q2_k"):
            plain, imat = rows[quant]["kl"], rows[quant + "+imatrix"]["kl"]
            out.append((f"{task}: KL({quant}) at least 30% lower with the imatrix", imat <= 0.7 * plain,
                        f"{imat:.4g} vs {plain:.4g} (ratio {imat / plain:.3f})"))
        worst = min((r for label, r in rows.items() if label.endswith("+shipped")), key=lambda r: r["task_score"])
        out.append((f"{task}: every shipped quant (the default export) keeps >= 90% of f16's task score",
                    worst["task_score"] >= 0.9 * f16, f"lowest {worst['label']} {worst['task_score']:.3f} vs f16 {f16:.3f}"))
    if "extract" in results:
        rows = results["extract"]["rows"]
        keep = [r for r in rows.values() if r["task_score"] >= 0.97 * rows["f16"]["task_score"]]
        best = min(keep, key=lambda r: r["size_bytes"])
        out.append(("extract: smallest file keeping >= 97% of f16's task score is <= 75 MiB",
                    best["size_bytes"] <= 75 * 2**20, f"{best['label']} {best['size_bytes'] / 2**20:.1f} MiB "
                    f"(task score {best['task_score']:.3f})"))
    return out


def report(results: dict, table, targets) -> int:
    """Print each task's table, then each target as PASS / MISS; the exit status, 1 if one is missed."""
    for task, res in results.items():
        print("\n".join(table(task, res)))
    checks = targets(results)
    for name, ok, figure in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {figure}")
    return 0 if all(ok for _, ok, _ in checks) else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench-work", help="runs, exports and reports (reused)")
    p.add_argument("--tasks", default="extract,records", help="comma-separated: extract, records")
    p.add_argument("--limit", type=int, help="only the first N eval examples of each task")
    p.add_argument("--target-size", default="74MiB", help="the budget of the auto file")
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.add_argument("--decision-weight", type=float, default=DECISION_WEIGHT,
                   help="the imatrix's weight on tokens before uncertain answer tokens (0: every token alike)")
    p.add_argument("--rebench", action="store_true", help="bench again even where a report exists")
    a = p.parse_args()
    results = {task: run_task(task, a.work, a.limit, a.target_size, a.threads, a.decision_weight, a.rebench)
               for task in a.tasks.split(",")}
    (a.work / f"quant_quality-a{a.decision_weight:g}.json").write_text(json.dumps(results, indent=1, default=str))
    return report(results, table, targets)


if __name__ == "__main__":
    sys.exit(main())
