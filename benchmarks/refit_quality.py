"""Refitted LoRA rungs against the plain ones, side by side in one run (issue #31).

For each bundled task -- extract (the demo task) and records (contact cards: longer JSON answers)
-- on SmolLM2-135M:

  1. a QLoRA run with quant_quality.py's settings (60 steps of 8 examples), reused from --work;
  2. one export of it: the merged f16, q4_k_m, q2_k and auto (--target-size), the LoRA GGUF with
     the bare base at each (--lora-gguf; the base's auto takes the merged auto file's per-tensor
     types), and the adapter refitted against the q4_k_m, q2_k and auto base files (--refit;
     --refit-steps, default the export's: a third of the run's; --refit-merged);
  3. one bench over every rung on the task's held-out eval set, the f16 the reference: merged
     files, base + LoRA GGUF ("+lora"), base + refitted LoRA GGUF ("+refit"), and the refit merged
     into its base and quantised again to the base file's types ("+refit-merged").

It prints per task and rung the size (with the LoRA file), bits/weight, KL vs f16, top-1, task
score and its share of f16's, prompt and generation speed, and each refit's steps, seconds and
training loss before / after; then the targets (issue #31):
  - on records, the smallest file keeping >= 97% of f16's task score is <= 75 MiB;
  - every refitted rung keeps >= 95% of f16's task score, on both tasks;
  - each refitted pair in llama.cpp within KL 1e-3 of the refit model in torch (export's check);
  - each refit takes at most half the run's training time.
The exit status is 1 if a target is missed. Reused from --work unless removed (--rebench: bench again).

    python benchmarks/refit_quality.py                     # both tasks
    python benchmarks/refit_quality.py --tasks records --limit 30
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from quant_quality import DATA, ROOT, TRAIN, report

BASES = ["q4_k_m", "q2_k", "auto"]  # the bare base quants each route runs on (auto: the merged auto's types)


def run_task(task: str, work: Path, limit: int | None, steps: int | None, effort: str, target_size: str,
             threads: int | None, rebench: bool) -> dict:
    from edgelora.bench import bench
    from edgelora.config import load_config
    from edgelora.exporter import export
    from edgelora.handoff import BenchReport, ExportManifest, RunSummary
    from edgelora.trainer import train

    run, out = work / task / "run", work / task / f"export-{effort}"
    if not (run / "summary.json").is_file():
        train(load_config(None, {**TRAIN, "data": str(DATA / f"{task}_train.jsonl"), "out": str(run)}), force=True)
    t0 = time.time()
    if not (out / "manifest.json").is_file():
        export(str(run), quants=["f16", *BASES], target_size=target_size, lora_gguf=True, refit=BASES,
               refit_steps=steps, refit_merged=True, effort=effort, out=str(out), force=True)
    export_s = time.time() - t0
    manifest = ExportManifest.read(out)
    report_path = out / "bench" / "report.json"
    if rebench or not report_path.is_file():
        bench([str(out)], str(DATA / f"{task}_eval.jsonl"), out=str(report_path.parent), limit=limit, hf=False,
              threads=threads, force=True, progress=sys.stderr.isatty())
    report = BenchReport.read(report_path.parent)
    refits = {o.role.quant: o.refit for o in manifest.outputs if o.role.kind == "refit"}
    return {"rows": {r.label: dataclasses.asdict(r) for r in report.rows}, "refits": refits,
            "train_s": RunSummary.read(run).wall_time_s, "export_s": round(export_s, 1),
            "export_seconds": manifest.seconds, "examples": report.examples, "effort": effort}


def table(task: str, res: dict) -> list[str]:
    rows, f16 = res["rows"], res["rows"]["f16"]
    lines = [f"## {task} ({res['examples']} held-out examples; f16 task score {f16['task_score']:.3f})", "",
             "| rung | size MiB | bits/weight | KL vs f16 | top-1 | task score | of f16 | prompt tok/s | gen tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in sorted(rows.items(), key=lambda kv: -kv[1]["size_bytes"]):
        lines.append(f"| {label} | {r['size_bytes'] / 2**20:.1f} | {r['bpw']:.2f} | {r['kl']:.4g} | {r['top1']:.3f} | "
                     f"{r['task_score']:.3f} | {r['task_score'] / f16['task_score']:.1%} | {r['prompt_tok_s']:.0f} | "
                     f"{r['gen_tok_s']:.0f} |")
    lines.append("")
    for quant, info in res["refits"].items():
        lines.append(f"refit against {quant}: {info['steps']} steps, {info['seconds']:.0f} s (training {res['train_s']:.0f}"
                     f" s), training loss {info['loss_first']:.4f} -> {info['loss_last']:.4f}; "
                     f"{info.get('verified', {}).get('figure', 'not verified')}; merged and quantised again: KL "
                     f"{info.get('merged', {}).get('kl_vs_refit', float('nan')):.2g} from the refit model")
    lines.append(f"export ({res['effort']}): {res['export_s']:.0f} s: " + ", ".join(
        f"{k} {v:.0f}" for k, v in res["export_seconds"].items() if k != "total"))
    return lines + [""]


def targets(results: dict) -> list[tuple[str, bool, str]]:
    out = []
    for task, res in results.items():
        rows, f16 = res["rows"], res["rows"]["f16"]["task_score"]
        if task == "records":
            keep = [r for r in rows.values() if r["task_score"] >= 0.97 * f16]
            best = min(keep, key=lambda r: r["size_bytes"])
            out.append(("records: smallest file keeping >= 97% of f16's task score is <= 75 MiB",
                        best["size_bytes"] <= 75 * 2**20,
                        f"{best['label']} {best['size_bytes'] / 2**20:.1f} MiB (task score {best['task_score']:.3f})"))
        for quant, info in res["refits"].items():
            r = rows[f"{quant}+refit"]
            out.append((f"{task}: {quant}+refit keeps >= 95% of f16's task score", r["task_score"] >= 0.95 * f16,
                        f"{r['task_score']:.3f} vs {f16:.3f} (plain {quant}+lora {rows[quant + '+lora']['task_score']:.3f})"))
            kl = float(info["verified"]["figure"].split()[1].rstrip(","))
            out.append((f"{task}: {quant}+refit in llama.cpp within KL 1e-3 of the refit model in torch", kl <= 1e-3,
                        f"KL {kl:.2g}"))
            out.append((f"{task}: the {quant} refit takes at most half the training time",
                        info["seconds"] <= 0.5 * res["train_s"], f"{info['seconds']:.0f} s vs {res['train_s']:.0f} s"))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench-work", help="runs, exports and reports (reused)")
    p.add_argument("--tasks", default="extract,records", help="comma-separated: extract, records")
    p.add_argument("--limit", type=int, help="only the first N eval examples of each task")
    p.add_argument("--refit-steps", type=int, help="steps of each refit (default: the export's)")
    p.add_argument("--effort", default="fast", help="the export's --effort (the merged rungs are context here)")
    p.add_argument("--target-size", default="69MiB", help="the budget of the auto files (the merged one; the "
                   "base's takes its types, and the LoRA comes on top)")
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    p.add_argument("--rebench", action="store_true", help="bench again even where a report exists")
    a = p.parse_args()
    results = {task: run_task(task, a.work, a.limit, a.refit_steps, a.effort, a.target_size, a.threads, a.rebench)
               for task in a.tasks.split(",")}
    (a.work / f"refit_quality-{a.effort}.json").write_text(json.dumps(results, indent=1, default=str))
    return report(results, table, targets)


if __name__ == "__main__":
    sys.exit(main())
