"""Next-token log-probabilities and how two models' are compared, in numpy: shared by bench, the
export's checks and search, and doctor (no torch, no llama.cpp here)."""
from __future__ import annotations

import numpy as np


def log_softmax(logits) -> np.ndarray:
    """Log-probabilities of `logits` (positions x vocabulary) along the last axis, in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


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
