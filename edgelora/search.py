"""Which file of a quant an export keeps: llama.cpp's quantiser with the run's importance matrix,
without it, or with it for the groups of weights where it lowered the KL from the f16 on
held-out training examples; of those, the one that answers most held-out prompts as the f16 does
(edgelora.klprobe measures both)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np

from . import imatrix as IM
from .files import temp_name
from .klprobe import SETTLED_Z
from .stages import progress_bar, stage

log = logging.getLogger("edgelora")
# Tensor types llama.cpp makes without reading an importance matrix (quantize_q8_0 ignores it; float
# types are copied or converted): a file of these alone is the same with the matrix as without it.
MATRIX_UNUSED = frozenset({"Q8_0", "F16", "BF16", "F32"})


def quantize_searched(f16: Path, dst: Path, quant: str | dict, importance: Optional[IM.IMatrix], probe,
                      keep_better: bool = True, settle_z: float = SETTLED_Z) -> tuple[dict, Optional[dict]]:
    """`quant` with the importance matrix where it helps, measured: where the probe can measure, the
    file is also made without the matrix and, if the two differ, with it for one group of weights at
    a time (a class of weight in a third of the layers: attn_q in blk.0-9, ...), then with it for
    exactly the groups that lowered the KL from the f16 on held-out training examples on their own.
    Of those files the one that answers most of the held-out prompts greedily as the f16 does is
    kept, the lowest KL among equals; without `keep_better`, the best of those made with the
    matrix. All figures go in the manifest. llama.cpp quantises twice; the per-group files are
    those two files' tensors recombined. A group's file is read against the file without the
    matrix a quarter of the held-out sequences at a time, and only until the sign of the difference
    is `settle_z` standard errors from zero (KLProbe.compare; inf: every sequence): its kl_by_group
    is then the estimate that decided it, and positions_by_group says how many positions it was read at.
    A group's file is the one without the matrix up to the group's first layer, so (LAYER_INDEPENDENT
    architectures) only the layers from there on are read, from the inputs that file gave them.

    Why per group: llama.cpp's importance-weighted rounding lowers each weight's error on the
    calibration activations, but on SmolLM2 at Q5_0 it raises the model's KL for some weights
    (attn_output, ffn_up in most layers; attn_q and attn_v in the last third) while lowering it for
    others. Why answers first: a file can be closer to the f16 on average and still flip the few
    uncertain tokens a task's fields hang on (the extract task's q2_k: KL 0.027 with the matrix,
    0.040 without, yet a tenth of its fields lost; benchmarks/quant_quality.py)."""
    import filecmp

    from .llamacpp import LayerInputs
    from .quantize import TensorSwap, quantize

    if importance is None or probe is None:
        with stage("quantise"):
            return quantize(f16, dst, quant, imatrix=importance), None
    made: dict[str, tuple[float, Optional[int]]] = {}  # label -> (KL, answers kept)
    paths = {label: dst.parent / f"{temp_name(dst)}{label}.tmp" for label in ("all", "none", "trial", "chosen")}

    def measure(label: str, keep=None) -> list:
        with stage("answers"):  # the reference's own, made once (what each file's answers are checked against)
            probe.reference_answers
        with stage("measure"):
            rows, answers = probe.kl_rows_and_answers(paths[label], keep)
        made[label] = (float(np.concatenate(rows).mean()), answers)
        return rows

    groups = weight_groups(importance.sums)
    first_layer = {group: _first_layer(names) for group, names in groups.items()}
    try:
        with stage("quantise"):
            result = quantize(f16, paths["all"], quant, imatrix=importance)
            unused = set(result["tensor_types"]) <= MATRIX_UNUSED  # e.g. q8_0: not made again without it
            if not unused:
                quantize(f16, paths["none"], quant)
        by_group, read, helped = {}, {}, []
        if unused or filecmp.cmp(paths["all"], paths["none"], shallow=False):
            measure("all")
            made["none"] = made["all"]
        else:
            # a group's trial file is the one without the matrix up to the group's first layer: read
            # from there on, from that file's inputs to it (bit for bit the whole file's logits)
            later = sorted({k for k in first_layer.values() if k}) if _reads_from_a_layer(paths["none"]) else []
            keep = LayerInputs(later) if later else None
            without = measure("none", keep)
            measure("all")
            swap = TensorSwap(paths["none"], paths["all"])
            with stage("trials"), progress_bar(f"{dst.stem}: the matrix by group", unit="group") as progress:
                for done, (group, names) in enumerate(groups.items(), 1):
                    first = first_layer[group] if keep else 0
                    swap.write(names, paths["trial"], from_layer=first)
                    difference, read[group] = probe.compare(paths["trial"], without, z=settle_z,
                                                            inputs=keep.at(first) if first else None)
                    by_group[group] = made["none"][0] + difference
                    progress(done, len(groups))
            helped = [g for g in groups if by_group[g] < made["none"][0]]
            if helped and len(helped) < len(groups):
                with stage("trials"):
                    swap.write([n for g in helped for n in groups[g]], paths["chosen"])
                measure("chosen")
        candidates = [k for k in ("all", "chosen", "none") if k in made and (keep_better or k != "none")]
        kept = max(candidates, key=lambda k: (made[k][1] or 0, -made[k][0]))
        os.replace(paths[kept], dst)
        used = [] if unused else {"all": list(groups), "chosen": helped}.get(kept, [])
        log.info("%s: %s; keeping the file %s", dst.name, "; ".join(
            f"{label} KL {kl:.3g}" + ("" if answers is None else f", {answers} of {len(probe.prompts)} answers as f16")
            for label, (kl, answers) in made.items()), "with it for those" if kept == "chosen" else
            f"{'with' if used else 'without'} it")
        result = {**result, "path": str(dst)}
        figures = {f"{what}_{suffix}": made[label][i] if label in made else None
                   for label, suffix in (("all", "with_imatrix"), ("none", "without"), ("chosen", "chosen"))
                   for i, what in enumerate(("kl", "answers"))}
        return result, {**figures, "kl_by_group": by_group, "positions_by_group": read,
                        "positions": sum(len(rows) for _, rows in probe.rows),
                        "kl_kept": made[kept][0], "answers_kept": made[kept][1],
                        "answers_of": len(probe.prompts), "imatrix_kept": bool(used), "imatrix_groups": used,
                        "sequences": len(probe.rows)}
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)


# Architectures whose layers llama.cpp builds alike whatever their index (no sliding-window or
# no-RoPE pattern by layer number): a file of a model's later layers renumbered from 0 computes
# what those layers compute in the whole model.
LAYER_INDEPENDENT = frozenset({"llama", "qwen2", "qwen3"})


def _reads_from_a_layer(path: Path) -> bool:
    from .gguf_header import gguf_metadata

    return gguf_metadata(path).get("general.architecture") in LAYER_INDEPENDENT


def _first_layer(names) -> int:
    """The first block a group's weights are in; 0 if any is outside the blocks (the embedding)."""
    layers = [int(n.split(".")[1]) if n.startswith("blk.") else 0 for n in names]
    return min(layers, default=0)


def weight_groups(names, parts: int = 3) -> dict[str, list[str]]:
    """{"attn_q blk.0-9": [its weights], ...}: each class of weight split into `parts` runs of
    consecutive layers (fewer where there are fewer layers); a weight outside the blocks is its own class."""
    from .gguf_info import tensor_class

    def layer(name: str) -> Optional[int]:
        return int(name.split(".")[1]) if name.startswith("blk.") else None

    n_layers = 1 + max((layer(n) for n in names if layer(n) is not None), default=0)
    parts = min(parts, n_layers)
    runs: dict[tuple[str, int], list[str]] = {}
    for name in names:
        at = layer(name)
        runs.setdefault((tensor_class(name), -1 if at is None else at * parts // n_layers), []).append(name)
    groups = {}
    for (cls, part), members in runs.items():
        if part < 0:
            groups[cls] = members
            continue
        first, last = min(map(layer, members)), max(map(layer, members))
        groups[f"{cls} blk.{first}-{last}" if last > first else f"{cls} blk.{first}"] = members
    return groups
