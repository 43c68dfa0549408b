"""The importance matrix two ways, side by side: torch (float32, the HF model with the adapter merged,
two passes with decision weighting) and llama.cpp (its own forward over the merged f16 GGUF, one
pass: what `edgelora export` uses). Same calibration sequences (a run's own training examples, as
export takes them), same decision weight; prints seconds, tokens/s and how far the two matrices are
apart (the median relative difference per weight: the f16 rounding of the weights).

    python benchmarks/imatrix_engines.py RUN F16.gguf                # RUN: a training run; F16: its merged f16
    python benchmarks/imatrix_engines.py RUN F16.gguf --tokens 8192  # export's default is 32768
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def main() -> int:
    from edgelora import imatrix as IM
    from edgelora.exporter import _calibration, plan_export

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished edgelora training run")
    p.add_argument("f16", help="its merged f16 GGUF (edgelora export RUN --quant f16)")
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens (whole sequences up to this)")
    p.add_argument("--decision-weight", type=float, default=IM.DECISION_WEIGHT)
    args = p.parse_args()
    plan = plan_export(args.run, None, ["q4_k_m"], False, "unused")
    chosen = IM.calibration_sample(_calibration(plan, None, 0).sequences, args.tokens)
    ids, labels = [i for i, _ in chosen], [lab for _, lab in chosen]
    n = sum(map(len, ids))
    t = time.perf_counter()
    in_torch = IM.compute(plan.hf_dir, plan.adapter_dir, ids, datasets=["bench"], chunk_size=1, labels=labels,
                          decision_weight=args.decision_weight)
    torch_s = time.perf_counter() - t
    t = time.perf_counter()
    in_llama = IM.compute_gguf(args.f16, ids, datasets=["bench"], chunk_size=1, labels=labels,
                               decision_weight=args.decision_weight)
    llama_s = time.perf_counter() - t
    apart = [float(np.median(np.abs(in_llama.sums[k] - in_torch.sums[k]) / np.abs(in_torch.sums[k])))
             for k in in_torch.sums]
    print(f"{n} tokens in {len(ids)} sequences, decision weight {args.decision_weight:g}")
    print(f"torch (float32, two passes):   {torch_s:6.1f} s  {n / torch_s:6.0f} tokens/s")
    print(f"llama.cpp (f16 GGUF, one pass): {llama_s:6.1f} s  {n / llama_s:6.0f} tokens/s  ({torch_s / llama_s:.2f}x)")
    print(f"median relative difference per weight: mean {np.mean(apart):.2e}, worst {max(apart):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
