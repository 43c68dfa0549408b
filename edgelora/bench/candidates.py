"""What to measure: the ladder's rows found in an export folder (its manifest) or given as GGUF
files, each with notes on what the file really is; and the settings every row is measured with."""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import gguf

from ..errors import EdgeloraError
from ..gguf_header import gguf_metadata
from ..handoff import BASE, LORA, MANIFEST_FILE, MERGED, REFIT, REFIT_MERGED, ExportManifest, Role

log = logging.getLogger("edgelora")


@dataclass
class Candidate:
    """One row of the ladder: a GGUF (plus LoRA GGUFs), or the HF base + adapter."""

    label: str
    route: str  # merged (quantised merged file), lora (base GGUF + LoRA GGUF), file (a GGUF given by name), hf
    model: str  # GGUF path; for hf, the base spec
    loras: list[str] = field(default_factory=list)  # LoRA GGUFs; for hf, the PEFT adapter dir
    size_bytes: int = 0
    bpw: Optional[float] = None
    reference: bool = False
    notes: list[str] = field(default_factory=list)  # what the file really is, where its name says otherwise
    json_schema: Optional[dict] = None  # answers generated under this schema's grammar


@dataclass
class Settings:
    score: str = "exact"  # never "auto": bench() resolves it
    pattern: Optional[str] = None
    max_tokens: int = 0  # bench() makes 0 the longest reference answer's bytes + 16
    device: str = "auto"
    threads: Optional[int] = None


def discover(inputs: list[str], quants: Optional[list[str]] = None, hf: Optional[bool] = None) -> list[Candidate]:
    """Candidates from an export folder (its manifest.json: merged quants, the LoRA route, the
    HF reference) or from GGUF files; the f16 merged file (else the most bits per weight) is
    the reference, first in the list."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise EdgeloraError("bench needs an export folder or GGUF files")
    if len(paths) == 1 and paths[0].is_dir():
        cands = _from_export(paths[0], quants, hf)
    else:
        cands = [_from_file(p) for p in paths]
    ggufs = [c for c in cands if c.route != "hf"]
    if not ggufs:
        raise EdgeloraError(f"{inputs[0]}: no GGUF model to bench")
    ref = next((c for c in ggufs if c.label == "f16"), None) or max(ggufs, key=lambda c: c.bpw or 0)
    ref.reference = True
    return [ref] + [c for c in cands if c is not ref]


def _from_file(path: Path) -> Candidate:
    from ..gguf_info import inspect_gguf

    if path.is_dir():
        raise EdgeloraError(f"{path}: give one export folder, or GGUF files")
    kind = gguf_metadata(path).get(gguf.Keys.General.TYPE)
    if kind == "adapter":
        raise EdgeloraError(f"{path} is a LoRA adapter: bench its export folder, which pairs it with its base")
    if kind not in (None, "model"):
        raise EdgeloraError(f"{path} is not a model (its general.type is {kind!r}: an importance matrix?)")
    info = inspect_gguf(path)
    return Candidate(path.stem, "file", str(path), size_bytes=info["size_bytes"], bpw=info["bpw"],
                     notes=honest_notes(info))


def honest_notes(info: dict, imatrix: Optional[bool] = None) -> list[str]:
    """What a quantised GGUF really is: the weights that could not take its file type's main type
    (rows not a multiple of its block: llama.cpp fell back), so that a name like q2_k is not taken
    at its word; and whether an importance matrix guided it, where the export says."""
    from ..gguf_info import quantisable
    from ..quantize import fallbacks, main_type

    notes = []
    ftype = (info.get("file_type") or "").upper()
    main = main_type(ftype) if ftype.startswith("MOSTLY_") else None
    if main:
        fell = fallbacks(info, main)
        n = sum(1 for t in info["tensors"] if quantisable(t["name"], t["shape"]))
        if fell["count"]:
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[main]][0]
            kinds = ", ".join(f"{t} x{k}" for t, k in fell["by_type"].items())
            notes.append(f"nominal: {fell['count']} of {n} weights could not take {main} (rows not a multiple of "
                         f"{block}) and fell back ({kinds}); real {info['bpw']:.2f} bits/weight")
    if imatrix is not None:
        notes.append("quantised with the task importance matrix" if imatrix else "no importance matrix")
    return notes


def _from_export(folder: Path, quants: Optional[list[str]], hf: Optional[bool]) -> list[Candidate]:
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        kinds = {p: gguf_metadata(p).get(gguf.Keys.General.TYPE) for p in sorted(folder.glob("*.gguf"))}
        models = [p for p, kind in kinds.items() if kind in (None, "model")]
        if not models:
            raise EdgeloraError(f"{folder}: no {MANIFEST_FILE} and no GGUF model files")
        skipped = [f"{p.name} ({kind})" for p, kind in kinds.items() if p not in models]
        log.warning("%s: no %s (an interrupted export?): benching its model files alone%s", folder, MANIFEST_FILE,
                    f", not {', '.join(skipped)}" if skipped else "")
        return [_from_file(p) for p in models]
    return _manifest_candidates(folder, ExportManifest.read(folder), quants, hf)


def _manifest_candidates(folder: Path, manifest: ExportManifest, quants: Optional[list[str]], hf: Optional[bool]):
    from ..gguf_info import inspect_gguf

    outputs = manifest.outputs_by_role()
    have = [role.quant for role in outputs if role.kind == MERGED]
    missing = [q for q in quants or [] if q not in have]
    if missing:
        raise EdgeloraError(f"{folder}: {', '.join(missing)} not in the export (it has {', '.join(have)})")
    wanted = set(quants or []) | {"f16"}
    cands = []
    for role, o in outputs.items():
        if role.kind == MERGED and (not quants or role.quant in wanted):
            notes = honest_notes(inspect_gguf(folder / o.file), o.imatrix) if role.quant != "f16" else []
            cands.append(Candidate(role.quant, "merged", str(folder / o.file), size_bytes=o.size_bytes, bpw=o.bpw,
                                   notes=notes))
    if Role(LORA) in outputs:
        lora = outputs[Role(LORA)]
        base = manifest.base
        # the base GGUF itself (named by its file type below), and each base quant the export wrote
        bases = [(None, Path(base.path))] if base.kind == "gguf" else []
        bases += [(role.quant, folder / o.file) for role, o in outputs.items() if role.kind == BASE
                  and (not quants or role.quant in wanted)]
        for quant, path in bases:
            cands.append(_paired(f"{quant or _quant_name(inspect_gguf(path)['file_type'])}+lora", path,
                                 folder / lora.file))
    for role, o in outputs.items():  # a LoRA refitted against the base file at its quant (edgelora.refit)
        if role.kind == REFIT and (not quants or role.quant in wanted):
            cands.append(_paired(f"{role.quant}+refit", folder / outputs[Role(BASE, role.quant)].file, folder / o.file))
        elif role.kind == REFIT_MERGED and (not quants or role.quant in wanted):  # ... merged, quantised again
            cands.append(Candidate(f"{role.quant}+refit-merged", "merged", str(folder / o.file),
                                   size_bytes=o.size_bytes, bpw=o.bpw))
    adapter = manifest.adapter
    torch_ok = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
    if hf and not torch_ok:
        raise EdgeloraError("the HF reference needs torch, transformers and peft: pip install 'edgelora[train]'")
    if adapter and (hf or (hf is None and torch_ok)):
        cands.append(Candidate("hf", "hf", manifest.base.path, [adapter.path]))
    return cands


def _paired(label: str, base: Path, lora: Path) -> Candidate:
    """The base + LoRA GGUF route: its size is both files', its bits per weight both files' tensors
    over the base's parameters."""
    from ..gguf_info import inspect_gguf

    info, lora_info = inspect_gguf(base), inspect_gguf(lora)
    bits = (info["tensor_bytes"] + lora_info["tensor_bytes"]) * 8 / info["n_params"]
    return Candidate(label, "lora", str(base), [str(lora)], info["size_bytes"] + lora_info["size_bytes"], bits)


def _quant_name(file_type: Optional[str]) -> str:
    """gguf's LlamaFileType name (MOSTLY_Q4_K_M) -> our quant name (q4_k_m)."""
    return (file_type or "base").removeprefix("MOSTLY_").lower().replace("all_f32", "f32")
