"""How many calibration tokens the importance matrix needs: the matrix from the first 1/2, 1/4, ...
of a run's training examples (in export's calibration order) against the one from all of them,
with export's decision weighting and without it. Per weight, the quantiser reads the matrix as
relative column weights (a weight's scale does not change its rounding), so each is compared
scaled to mean 1: the relative L2 distance to the full matrix's, median / 90th percentile / worst
over the weights. If a fraction of the tokens gave the full matrix to a few percent, export could
stop reading there (issue #29: "imatrix tokens by convergence").

    python benchmarks/imatrix_convergence.py RUN F16.gguf    # RUN: a training run; F16: its merged f16
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
    p.add_argument("--tokens", type=int, default=IM.DEFAULT_TOKENS, help="the full matrix's tokens (export's default)")
    p.add_argument("--fractions", default="32,16,8,4,2", help="1/N of the full matrix's sequences, for each N")
    args = p.parse_args()
    plan = plan_export(args.run, None, ["q4_k_m"], False, "unused")
    chosen = IM.calibration_sample(_calibration(plan, None, 0).sequences, args.tokens)

    def matrix(n: int, weight: float) -> tuple[IM.IMatrix, int, float]:
        ids, labels = [i for i, _ in chosen[:n]], [lab for _, lab in chosen[:n]]
        t = time.perf_counter()
        m = IM.compute_gguf(args.f16, ids, datasets=["bench"], chunk_size=1, labels=labels, decision_weight=weight)
        return m, sum(map(len, ids)), time.perf_counter() - t

    def scaled(m: IM.IMatrix, name: str) -> np.ndarray:
        v = m.sums[name][0] / m.counts[name][0]
        return v / v.mean()

    for weight in (IM.DECISION_WEIGHT, 0.0):
        full, n_full, seconds = matrix(len(chosen), weight)
        print(f"decision weight {weight:g}: the full matrix {n_full} tokens, {len(chosen)} sequences, {seconds:.1f} s")
        for part in map(int, args.fractions.split(",")):
            m, n, seconds = matrix(max(1, len(chosen) // part), weight)
            apart = np.array([np.linalg.norm(scaled(m, k) - scaled(full, k)) / np.linalg.norm(scaled(full, k))
                              for k in full.sums])
            print(f"  1/{part:<3} {n:6d} tokens ({seconds:5.1f} s): distance to the full matrix per weight "
                  f"median {np.median(apart):.3f}, p90 {np.quantile(apart, 0.9):.3f}, worst {apart.max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
