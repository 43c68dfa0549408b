"""What verification adds to an export (issue #13: at most 20% on the demo).

Exports the demo's run exactly as `edgelora demo` does (f16, q8_0, q4_k_m, q2_k, the auto file to
74 MiB, the LoRA GGUF, the task importance matrix) and reads the export's own clock from its
manifest (`seconds`: total, torch = the f16 against the model in torch, verify = the token, stop and
LoRA-route checks of the smallest merged file and the LoRA route), all measured in the same run.
The run is trained with the full demo's settings into --work unless it is there already (or give
--run: an existing demo run, e.g. edgelora-demo/run).

    python benchmarks/export_verify_cost.py                  # ~10 min on 2 cores, +8 min to train
    python benchmarks/export_verify_cost.py --run edgelora-demo/run
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SHARE = 0.20


def main() -> int:
    from edgelora import demo as D
    from edgelora.config import load_config
    from edgelora.exporter import export
    from edgelora.handoff import ExportManifest
    from edgelora.trainer import train

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "bench-work" / "verify-cost", help="the run and export")
    p.add_argument("--run", type=Path, help="an existing demo run to export (default: trained into --work)")
    args = p.parse_args()
    full = D.MODES["full"]
    run = args.run or args.work / "run"
    if not (run / "summary.json").is_file():
        train_file, eval_file = D.demo_data()
        train(load_config(None, {**D.TRAIN, "data": str(train_file), "eval_data": str(eval_file), "out": str(run),
                                 "max_steps": full["max_steps"], "lr": full["lr"], "save_every": full["save_every"],
                                 "eval_every": full["eval_every"]}), force=True)
    result = export(str(run), quants=D.QUANTS, lora_gguf=True, force=True, imatrix=full["imatrix"],
                    target_size=full["target_size"], out=str(args.work / "export"))
    manifest = ExportManifest.read(result.out_dir)
    seconds, checks = manifest.seconds, manifest.checks
    verifying = seconds.get("torch", 0) + seconds.get("verify", 0)  # the f16 against torch, then the checks
    share = verifying / seconds["total"]
    print(f"export {seconds['total']:.0f} s, of which verification {verifying:.0f} s ({share:.1%}); "
          f"{sum(c['passed'] for c in checks)} of {len(checks)} checks passed")
    for c in checks:
        print(f"  {'ok  ' if c['passed'] else 'FAIL'}  {c['file']:<32} {c['name']:<12} {c['figure']}")
    hit = share <= TARGET_SHARE
    print(f"target: verification at most {TARGET_SHARE:.0%} of the export: {'PASS' if hit else 'MISS'} ({share:.1%})")
    return 0 if hit else 1


if __name__ == "__main__":
    sys.exit(main())
