"""Structured answers on the demo task: each file's answers free and held to the JSON schema the
training answers imply, side by side in one bench run.

The extract task's files from benchmarks/quant_quality.py (reused from --work, made there if
missing): the f16, and q8_0 / q4_k_m / q2_k made without the importance matrix (the ladder whose
q2_k broke the JSON) and with it. The schema is what `edgelora train` writes for that data
(edgelora.schema). One bench over every file twice -- free, and as NAME+grammar with a llama.cpp
grammar made from the schema -- scored as JSON on the held-out eval set: valid JSON, exact
structure, field accuracy; generation tokens/s from llama.cpp's counters, the two rows of a file
measured one after the other.

Targets (issue #12): every file's constrained answers are 100% valid JSON; q2_k (without the
imatrix) keeps a field accuracy of at least 0.9 under the grammar; generation under the grammar
runs at at least 90% of free generation's tokens/s (the mean ratio over the files).
The exit status is 1 if a target is missed.

    python benchmarks/structured_answers.py                 # ~25 min on 2 cores once the files exist
    python benchmarks/structured_answers.py --limit 20
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_quality import DATA, ROOT, ladder  # noqa: E402

FILES = ["f16", "q8_0", "q4_k_m", "q2_k", "q8_0+imatrix", "q4_k_m+imatrix", "q2_k+imatrix"]


def main() -> int:
    from edgelora.bench import bench
    from edgelora.schema import SCHEMA_FILE, from_data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench-work", help="runs and exports (shared with quant_quality)")
    p.add_argument("--limit", type=int, help="only the first N eval examples")
    p.add_argument("--threads", type=int, help="llama.cpp threads")
    a = p.parse_args()

    folder, _, _ = ladder("extract", a.work, "74MiB")
    schema, found = from_data(DATA / "extract_train.jsonl")
    print(found, file=sys.stderr)
    schema_path = a.work / "extract" / "structured" / SCHEMA_FILE
    schema_path.parent.mkdir(parents=True, exist_ok=True)
    schema_path.write_text(json.dumps(schema, indent=2))
    result = bench([str(folder / f"{label}.gguf") for label in FILES], str(DATA / "extract_eval.jsonl"),
                   out=str(schema_path.parent / "bench"), limit=a.limit, hf=False, threads=a.threads, force=True,
                   progress=sys.stderr.isatty(), json_schema=str(schema_path))
    rows = {r.label: r for r in result.report.rows}
    print(f"## extract: {result.report.examples} held-out examples, answers free / held to the schema\n")
    print("| file | size MiB | valid JSON | exact | field accuracy | gen tok/s | valid JSON | exact | field accuracy "
          "| gen tok/s | speed ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for label in FILES:
        free, held = rows[label], rows[f"{label}+grammar"]
        ratios.append(held.gen_tok_s / free.gen_tok_s)
        print(f"| {label} | {free.size_bytes / 2**20:.1f} | "
              + " | ".join(f"{r.json_valid:.3f} | {r.json_exact:.3f} | {r.task_score:.3f} | {r.gen_tok_s:.1f}"
                           for r in (free, held)) + f" | {ratios[-1]:.3f} |")
    print()
    checks = [
        ("every file's answers under the grammar are 100% valid JSON",
         all(rows[f"{f}+grammar"].json_valid == 1.0 for f in FILES),
         ", ".join(f"{f} {rows[f + '+grammar'].json_valid:.3f}" for f in FILES)),
        ("q2_k (no imatrix) keeps field accuracy >= 0.9 under the grammar", rows["q2_k+grammar"].task_score >= 0.9,
         f"{rows['q2_k+grammar'].task_score:.3f} (free: {rows['q2_k'].task_score:.3f}, "
         f"valid JSON {rows['q2_k'].json_valid:.3f})"),
        ("generation under the grammar >= 90% of free tokens/s (mean over files)", sum(ratios) / len(ratios) >= 0.9,
         f"mean ratio {sum(ratios) / len(ratios):.3f} (lowest {min(ratios):.3f})"),
    ]
    for name, ok, figure in checks:
        print(f"{'PASS' if ok else 'MISS'}  {name}: {figure}")
    print(f"\nreport: {result.files['md']}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
