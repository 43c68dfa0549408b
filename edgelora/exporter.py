"""`edgelora export`: a run directory (or a bare base model) -> GGUF files a laptop app loads.

Two routes, both from the same adapter:
  merged   the adapter folded into the base by our streaming converter (f16), then each
           requested quantisation made from that f16 by llama.cpp's own quantiser;
  LoRA     a standalone llama.cpp LoRA GGUF, plus the base as a GGUF beside it when the
           base was not a GGUF already.
Beside them: an Ollama Modelfile per route and manifest.json (inputs and outputs with sha256,
size, bits per weight, tool versions). Every file is written under a temporary name and
renamed; existing outputs are kept unless force=True.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence


from . import card as C
from . import data as D
from . import imatrix as IM
from . import quant_presets
from . import refit as R
from . import verify as V
from .errors import EdgeloraError
from .ollama import lora_command
from .handoff import (BASE, LORA, MERGED, REFIT, REFIT_MERGED, SUMMARY_FILE, AdapterInput, BaseInput, ExportedFile,
                      ExportManifest, Role,
                      RunSummary, finished_run)
from .files import atomic_write_json, output_folder, read_json, temp_name
from .machine import package_versions
from .bases import BaseModel, base_hash, file_sha256, materialise, resolve_base
from .klprobe import SETTLED_Z
from .schema import SCHEMA_FILE
from .resume import ExportProgress
from .search import MATRIX_UNUSED, quantize_searched
from .stages import StageClock, progress_bar, stage

if TYPE_CHECKING:
    from .klprobe import KLProbe

log = logging.getLogger("edgelora")


@dataclass
class ExportPlan:
    name: str
    base: BaseModel
    base_sha256: str
    hf_dir: Path
    adapter_dir: Optional[Path]
    out_dir: Path
    quants: list[str]
    lora_gguf: bool
    run: Optional[RunSummary] = None  # the run's summary.json (None: a plain conversion)
    outputs: dict[Role, Path] = field(default_factory=dict)  # what each file is -> its final path

    @property
    def dataset(self) -> Optional[str]:
        """The training data file's name, for the model card."""
        return (Path(self.run.data).name or None) if self.run else None


@dataclass(frozen=True)
class Effort:
    """How much an export measures before it keeps a quantised file (--effort)."""

    imatrix_tokens: int  # most calibration tokens the importance matrix is measured on
    search: bool  # also quantise without the matrix and with it per group; keep the file answering as the f16 does
    settle_z: float  # a group's trial is read until its difference is this many standard errors from 0 (inf: whole)


EFFORTS = {
    "fast": Effort(4096, search=False, settle_z=math.inf),
    "default": Effort(IM.DEFAULT_TOKENS, search=True, settle_z=SETTLED_Z),
    "thorough": Effort(IM.DEFAULT_TOKENS, search=True, settle_z=math.inf),
}


@dataclass
class ExportResult:
    out_dir: Path
    files: list[ExportedFile]
    manifest: Path
    checks: list[dict] = field(default_factory=list)  # edgelora.verify's, as in the manifest
    seconds: dict[str, float] = field(default_factory=dict)  # per stage, and the total (edgelora.stages)
    lora_route: Optional[str] = None  # the llama-server command that runs the base + LoRA GGUF route
    refit_routes: dict = field(default_factory=dict)  # Role(REFIT, q) -> the command that runs its base + LoRA


AUTO = "auto"  # per-tensor types chosen to a size budget (edgelora.budget)
LAPTOP_QUANT = "q4_k_m"  # exported when no --quant is given, and the file the Modelfile points at when there


def parse_quants(quants: list[str], budgeted: bool = False) -> list[str]:
    """The presets asked for, largest first (the f16 the others are made from comes out first);
    `auto`, the budgeted file, last. A budget (--target-size / --target-bpw) adds `auto`."""
    known = quant_presets.names()
    wanted: list[str] = []
    for q in [*(quants or [LAPTOP_QUANT]), *([AUTO] if budgeted else [])]:
        for item in (known if q.lower() == "all" else [q.lower()]):
            if item not in known + [AUTO]:
                raise EdgeloraError(f"unknown quant '{item}' (known: {', '.join(known)}, all, auto)")
            if item not in wanted:
                wanted.append(item)
    if AUTO in wanted and not budgeted:
        raise EdgeloraError("--quant auto needs a budget: --target-size SIZE or --target-bpw BITS")
    return sorted(wanted, key=lambda q: -quant_presets.load(q)["expected_bpw"][1] if q != AUTO else 0)


def plan_export(run_dir: Optional[str], base: Optional[str], quants: list[str], lora_gguf: bool,
                out: Optional[str], budgeted: bool = False, name: Optional[str] = None,
                refit: Sequence[str] = (), refit_merged: bool = False) -> ExportPlan:
    """What to write where. `name` (default: the run folder's, or the base's) names the files and
    the model in them (general.name). `refit`: the base quants to refit the adapter against (and
    with `refit_merged`, each refit merged and quantised again as one file)."""
    quants = parse_quants(quants, budgeted)
    refit = _refit_types(refit, run_dir, budgeted)
    if name is not None and not re.fullmatch(r"\w[\w.+-]{0,99}", name):
        raise EdgeloraError(f"--name {name!r}: use letters, digits and . _ + - (it names the files)")
    adapter_dir, summary = None, None
    if run_dir:
        run = Path(run_dir)
        if not finished_run(run):
            raise EdgeloraError(f"{run}: not a finished edgelora run (no adapter/ or {SUMMARY_FILE})")
        summary = RunSummary.read(run)
        adapter_dir = run / "adapter"
        resolved = resolve_base(base or summary.base)
        digest = base_hash(resolved)
        if base is None and digest != summary.base_sha256:
            raise EdgeloraError(f"base '{summary.base}' has changed since {run} was trained "
                                f"(sha256 {digest[:12]} != {str(summary.base_sha256)[:12]}); pass --base")
        name = name or run.resolve().name
        out_dir = Path(out) if out else run / "export"
    else:
        if not base:
            raise EdgeloraError("export needs a RUN_DIR, or --base MODEL for a plain conversion")
        if lora_gguf:
            raise EdgeloraError("--lora-gguf needs a RUN_DIR with an adapter")
        resolved = resolve_base(base)
        digest = base_hash(resolved)
        name = name or resolved.name
        out_dir = Path(out) if out else Path(f"{name}-gguf")
    plan = ExportPlan(name, resolved, digest, materialise(resolved, digest), adapter_dir, out_dir, quants, lora_gguf,
                      summary)
    for q in quants:
        plan.outputs[Role(MERGED, q)] = out_dir / f"{name}-{q}.gguf"
    if lora_gguf:
        plan.outputs[Role(LORA)] = out_dir / f"{name}-lora-f16.gguf"
        if resolved.kind != "gguf":
            for q in quants:
                if q != AUTO:  # the budget is fitted to the fine-tuned model, not the bare base
                    plan.outputs[Role(BASE, q)] = out_dir / f"{resolved.name}-base-{q}.gguf"
    for q in refit:  # the base at q (a GGUF base too is quantised again: the refit needs the exact file)
        plan.outputs[Role(BASE, q)] = out_dir / f"{resolved.name}-base-{q}.gguf"
        plan.outputs[Role(REFIT, q)] = out_dir / f"{name}-refit-{q}-lora-f16.gguf"
        if refit_merged:  # one file, for Ollama / LM Studio (it loses most of what the refit won: measured)
            plan.outputs[Role(REFIT_MERGED, q)] = out_dir / f"{name}-refit-{q}.gguf"
    return plan


def _refit_types(refit: Sequence[str], run_dir: Optional[str], budgeted: bool) -> list[str]:
    """--refit's quants, checked: presets of a quantised type, or auto (the budgeted file's types)
    where there is a budget, and a run to refit."""
    if refit and not run_dir:
        raise EdgeloraError("--refit needs a RUN_DIR: it continues training the run's adapter")
    known = [q for q in quant_presets.names() if q != "f16"] + [AUTO]
    for q in refit:
        if q not in known:
            raise EdgeloraError(f"--refit {q}: not a quantised preset (choose from {', '.join(known)})")
        if q == AUTO and not budgeted:
            raise EdgeloraError("--refit auto needs a budget: --target-size SIZE or --target-bpw BITS")
    return list(dict.fromkeys(refit))


def _types_of(path: Path, name: str) -> dict:
    """A quantisation preset called `name` giving each weight the type it has in the GGUF at `path`."""
    from .budget import FILE_TYPE
    from .gguf_header import gguf_layout

    types = {t.name: t.tensor_type.name for t in gguf_layout(path).tensors if len(t.shape) >= 2}
    main = max(set(types.values()), key=list(types.values()).count)
    return {"name": name, "llama_ftype": FILE_TYPE.get(main, "MOSTLY_Q8_0"),
            "overrides": {re.escape(name): qtype for name, qtype in types.items()}}


def export(run_dir: Optional[str] = None, *, base: Optional[str] = None, quants: Optional[list[str]] = None,
           lora_gguf: bool = False, out: Optional[str] = None, force: bool = False, imatrix: str = "auto",
           effort: str = "default", imatrix_data: Optional[str] = None, imatrix_tokens: Optional[int] = None,
           imatrix_decision_weight: float = IM.DECISION_WEIGHT, target_size: Optional[str | int] = None,
           target_bpw: Optional[float] = None,
           keep_better: bool = True, name: Optional[str] = None, verify: bool = True,
           verify_examples: int = V.EXAMPLES, refit: Sequence[str] = (), refit_steps: Optional[int] = None,
           refit_merged: bool = False) -> ExportResult:
    """Export as the module docstring says; returns the files written and the manifest path.

    imatrix: "auto" (computed from the run's training data, or from `imatrix_data` for a plain
    conversion), "none", or the path of a llama.cpp imatrix file (.gguf or .dat).
    effort: a key of EFFORTS: how many calibration tokens the matrix is measured on (unless
    `imatrix_tokens` says), and whether each quant is also made without it and per group of weights.
    imatrix_decision_weight: for a computed imatrix, how much more the tokens before an uncertain
    answer token count (edgelora.imatrix.compute); 0 weighs every token alike.
    target_size (bytes, or "70MB") / target_bpw: also write `auto`, a file of per-tensor types
    chosen to that budget by measured loss (edgelora.budget).
    keep_better: where the effort searches, the file made without the matrix is a candidate too:
    the file that answers more held-out training prompts greedily as the f16 does is kept, then the
    one with the lower KL (the figures of all are in the manifest either way).
    name: names the files and the model in them (default: the run folder's; see edgelora.card).
    verify: check the written files against the run's first `verify_examples` training examples
    (edgelora.verify); the results go in the manifest, and a failed check is an EdgeloraError once it is written.
    refit: presets (q2_k, ...) to quantise the bare base to and refit the run's adapter against
    (edgelora.refit), each written as the base file + a LoRA GGUF; `refit_steps` (default: a
    third of the run's steps) each; `refit_merged`: each refit also merged into its base's
    weights and quantised again to the base file's types, as one file."""
    clock = StageClock()
    with clock.running():
        run = _setup(run_dir, base, quants, lora_gguf, out, force, imatrix, effort, imatrix_data, imatrix_tokens,
                     imatrix_decision_weight, target_size, target_bpw, keep_better, name, verify, verify_examples,
                     refit, refit_steps, refit_merged)
        _ladder(run, run.plan.adapter_dir, MERGED)
        _lora_gguf(run)
        if any(role.kind == BASE for role in run.plan.outputs):
            _ladder(run, None, BASE)
        _refits(run)
        return _finish(run, clock)


@dataclass
class ExportRun:
    """One export as its steps see it: what was asked (checked), and what each step adds."""

    plan: ExportPlan
    how: Effort
    settings: dict  # what decides the outputs (resume.ExportProgress: a rerun with the same resumes)
    progress: ExportProgress
    calibration: Optional[Calibration]
    cards: dict[str, dict]  # kind of file -> the model card it carries
    wants_imatrix: bool  # computed from the calibration examples (--imatrix auto)
    verifying: bool
    refit_run: Optional[R.RefitRun]
    importance: Optional[IM.IMatrix] = None
    importance_info: Optional[dict] = None  # its manifest entry
    results: dict[Role, dict] = field(default_factory=dict)  # quantize()'s summary
    budgets: dict[Role, dict] = field(default_factory=dict)  # what the budgeted file's choice measured
    checks: dict[Role, dict] = field(default_factory=dict)  # KL with and without the imatrix, which file was kept
    verified: list[tuple[str, V.Check]] = field(default_factory=list)  # failures raise once the manifest is written
    reference: Optional["KLProbe"] = None  # the merged f16's log-probabilities at the first examples' answers
    stopped_in_torch: Optional[list[bool]] = None  # whether the model in torch ends its answer to each of them

    @property
    def refits(self) -> list[str]:
        return [role.quant for role in self.plan.outputs if role.kind == REFIT]


def _setup(run_dir, base, quants, lora_gguf, out, force, imatrix, effort, imatrix_data, imatrix_tokens,
           decision_weight, target_size, target_bpw, keep_better, name, verify, verify_examples, refit, refit_steps,
           refit_merged) -> ExportRun:
    """Every option checked and every input read before any output is written; the plan, the
    resume record, the calibration examples and the model cards."""
    if target_size is not None and target_bpw is not None:
        raise EdgeloraError("give --target-size or --target-bpw, not both")
    if target_bpw is not None and not 1.5 <= target_bpw <= 16:
        raise EdgeloraError(f"--target-bpw {target_bpw}: must be between 1.5 and 16")
    budgeted = target_size is not None or target_bpw is not None
    plan = plan_export(run_dir, base, quants or [LAPTOP_QUANT], lora_gguf, out, budgeted, name, refit, refit_merged)
    refits = [role.quant for role in plan.outputs if role.kind == REFIT]
    if (refit_steps is not None or refit_merged) and not refits:
        raise EdgeloraError("--refit-steps and --refit-merged go with --refit QUANT")
    refit_run = R.check(plan.adapter_dir.parent, refit_steps) if refits else None
    if verify and verify_examples < 1:
        raise EdgeloraError(f"verify_examples must be at least 1, not {verify_examples}")
    if effort not in EFFORTS:
        raise EdgeloraError(f"--effort {effort}: must be one of {', '.join(EFFORTS)}")
    how = EFFORTS[effort]
    imatrix_tokens = how.imatrix_tokens if imatrix_tokens is None else imatrix_tokens
    if imatrix_tokens < 1:
        raise EdgeloraError(f"--imatrix-tokens must be at least 1, not {imatrix_tokens}")
    if not (math.isfinite(decision_weight) and decision_weight >= 0):
        raise EdgeloraError(f"--imatrix-decision-weight must be a finite number, at least 0, not {decision_weight}")
    if isinstance(target_size, str):
        from .sizes import parse_size

        parse_size(target_size)  # refused now, not after the other files are written
    importance, importance_info = _imatrix_file(plan, imatrix)  # a FILE, read and checked before any work
    settings = {
        "base": plan.base_sha256, "adapter": _adapter_sha256(plan), "quants": plan.quants, "lora_gguf": plan.lora_gguf,
        "imatrix": importance_info["sha256"] if importance_info else imatrix, "effort": effort,
        "imatrix_data": file_sha256(Path(imatrix_data)) if imatrix_data and Path(imatrix_data).is_file() else None,
        "imatrix_tokens": imatrix_tokens, "decision_weight": decision_weight, "target_size": target_size,
        "target_bpw": target_bpw, "keep_better": keep_better, "name": plan.name,
        "refit": refits, "refit_steps": refit_run.steps if refit_run else None, "refit_merged": refit_merged,
        "edgelora": package_versions().get("edgelora")}
    progress = ExportProgress.start(plan.out_dir, settings, plan.outputs, force)
    output_folder(plan.out_dir)
    wants_imatrix = imatrix == "auto" and plan.quants + refits != ["f16"]  # an f16 file is not quantised
    calibration = _calibration(plan, imatrix_data, verify_examples, needed=wants_imatrix or budgeted) if (
        wants_imatrix or budgeted or verify) else None
    if budgeted and calibration is None:
        raise EdgeloraError("--target-size / --target-bpw need calibration data: a RUN_DIR, or --imatrix-data FILE.jsonl")
    base_card = C.base_card(plan.base.kind, plan.base.path, plan.hf_dir)
    cards = {BASE: C.model_card(base_card, plan.base_sha256),
             MERGED: C.model_card(base_card, plan.base_sha256, plan.name if plan.adapter_dir else None, plan.dataset)}
    if name and not plan.adapter_dir:  # a plain conversion keeps the base's card, under the name asked for
        cards[MERGED][C.K.NAME] = name
    return ExportRun(plan, how, {**settings, "verify": verify}, progress, calibration, cards, wants_imatrix,
                     verify and calibration is not None and bool(calibration.first), refit_run, importance,
                     importance_info)


def _adapter_sha256(plan: ExportPlan) -> Optional[str]:
    return file_sha256(plan.adapter_dir / "adapter_model.safetensors") if plan.adapter_dir else None


def _ladder(run: ExportRun, adapter: Optional[Path], kind: str) -> None:
    """The f16 GGUF (merged when an adapter is given), then each quant made from it; each output
    recorded in run.progress once finished, and one finished before kept. The merged f16 also
    gives the importance matrix, the reference in torch and the KL probe the quants are searched with."""
    from .converters.hf_to_gguf import convert

    plan, progress = run.plan, run.progress
    wanted = {role.quant: path for role, path in plan.outputs.items() if role.kind == kind}
    f16 = wanted.get("f16") or plan.out_dir / f"{temp_name(Path(f'{plan.name}-{kind}-f16'))}gguf.tmp"
    if progress.get(Role(kind, "f16")) is None:
        log.info("converting %s -> %s", plan.base.spec + (" + adapter" if adapter else ""), f16.name)
        with stage("convert"), progress_bar(f16.name) as bar:
            convert(plan.hf_dir, f16, adapter_dir=adapter, outtype="f16", progress=bar, card=run.cards[kind])
        if "f16" in wanted:
            progress.finished(Role(kind, "f16"), f16)
    try:
        if kind == MERGED:
            _importance(run, f16)
        if kind == MERGED and run.verifying:
            with stage("torch"):
                run.reference, run.stopped_in_torch, parity = _against_torch(plan, f16, run.calibration)
            run.verified.extend((f"{plan.name}-f16.gguf" + ("" if "f16" in wanted else " (not kept)"), c)
                                for c in parity)
        todo = [q for q in wanted if q != "f16" and progress.get(Role(kind, q)) is None]
        search = kind == MERGED and run.how.search and run.importance is not None and run.wants_imatrix
        probe = None
        if kind == MERGED and run.calibration is not None and (search or AUTO in todo) and todo:
            with stage("probe"):
                probe = _probe(f16, run.calibration)
        for q, path in wanted.items():
            if q != "f16":
                _quant(run, Role(kind, q), f16, path, probe if search else None, probe)
    finally:
        if "f16" not in wanted:
            f16.unlink(missing_ok=True)


def _importance(run: ExportRun, f16: Path) -> None:
    """run.importance for --imatrix auto: measured on the merged `f16` (or read back, resuming)."""
    plan, progress = run.plan, run.progress
    if not run.wants_imatrix:
        return
    if run.calibration is None:
        log.info("no calibration data for an importance matrix (--imatrix-data FILE.jsonl): quantising without one")
        return
    if measured := progress.get("imatrix"):
        run.importance_info = measured["info"]
        run.importance = IM.read(plan.out_dir / run.importance_info["file"])
        return
    with stage("imatrix"):
        run.importance, run.importance_info = _computed_imatrix(
            plan, f16, run.calibration, run.settings["imatrix_tokens"], run.settings["decision_weight"])
    path = IM.write(run.importance, plan.out_dir / run.importance_info["file"], _arch(plan.hf_dir))
    run.importance_info["sha256"] = file_sha256(path)
    progress.finished("imatrix", path, info=run.importance_info)


def _quant(run: ExportRun, role: Role, f16: Path, path: Path, search_probe, probe) -> None:
    """One quantised file from `f16` (searched with `search_probe` where the effort searches;
    `auto` measured with `probe`), recorded in run.progress; one finished before is kept."""
    if done := run.progress.get(role):
        run.results[role], run.checks[role], run.budgets[role] = done["result"], done["check"], done["budget"]
        return
    if role.quant == AUTO and role.kind == BASE:  # the bare base a refit trains against: the merged auto's types
        from .quantize import quantize

        merged_auto = run.plan.outputs[Role(MERGED, AUTO)]
        log.info("quantising %s -> %s (the types of %s)", f16.name, path.name, merged_auto.name)
        with stage("quantise"):
            run.results[role] = quantize(f16, path, _types_of(merged_auto, AUTO), imatrix=run.importance)
        run.checks[role] = None
    elif role.quant == AUTO:
        run.results[role], run.budgets[role], run.checks[role] = _budgeted(
            f16, path, run.importance, probe, run.settings["target_size"], run.settings["target_bpw"],
            search_probe is not None and run.settings["keep_better"], run.how.settle_z)
    else:
        log.info("quantising %s -> %s", f16.name, path.name)
        run.results[role], run.checks[role] = quantize_searched(
            f16, path, role.quant, run.importance, search_probe, run.settings["keep_better"], run.how.settle_z)
    run.progress.finished(role, path, result=run.results[role], check=run.checks[role], budget=run.budgets.get(role))


def _lora_gguf(run: ExportRun) -> None:
    from .converters.hf_to_gguf import convert_lora

    plan = run.plan
    if plan.lora_gguf and run.progress.get(Role(LORA)) is None:
        log.info("writing LoRA GGUF %s", plan.outputs[Role(LORA)].name)
        with stage("lora_gguf"):
            convert_lora(plan.hf_dir, plan.adapter_dir, plan.outputs[Role(LORA)], card=run.cards[MERGED])
        run.progress.finished(Role(LORA), plan.outputs[Role(LORA)])


def _refits(run: ExportRun) -> None:
    """Each --refit: the adapter refitted against its quantised base (edgelora.refit)."""
    plan, progress = run.plan, run.progress
    for q in run.refits:
        role, merged = Role(REFIT, q), Role(REFIT_MERGED, q)
        made = [r for r in (role, merged) if r in plan.outputs]
        if any(progress.get(r) is None for r in made):
            info, result = _refitted(plan, run.refit_run, q, run.cards[MERGED], run.importance,
                                     run.reference if run.verifying else None)
            if merged in plan.outputs:
                progress.finished(merged, plan.outputs[merged], result=result)
            progress.finished(role, plan.outputs[role], check=info)
        run.checks[role] = progress.get(role)["check"]
        if merged in plan.outputs:
            run.results[merged] = progress.get(merged)["result"]
        if "verified" in run.checks[role]:
            run.verified.append((plan.outputs[role].name, V.Check(**run.checks[role]["verified"])))


def _finish(run: ExportRun, clock: StageClock) -> ExportResult:
    """Modelfiles, the verification of every file, manifest.json; then a failed check is raised."""
    from .gguf_info import inspect_gguf

    plan = run.plan
    files = []
    for role, path in plan.outputs.items():
        info = inspect_gguf(path)
        quantised = run.results.get(role)
        check = run.checks.get(role)
        files.append(ExportedFile(
            role, path.name, file_sha256(path), path.stat().st_size, round(info["bpw"], 3), role.quant or "f16",
            info.get("file_type"), info["tensor_types"], info["class_types"],
            imatrix=bool(quantised and run.importance is not None and not set(info["tensor_types"]) <= MATRIX_UNUSED
                         and (check or {}).get("imatrix_kept", True)),
            imatrix_check=check if role.kind != REFIT else None, refit=check if role.kind == REFIT else None,
            fallbacks={k: v for k, v in quantised["fallbacks"].items() if k != "tensors"} if quantised else None))
    schema_info = _copy_schema(plan)
    base_file = plan.base.path if plan.base.kind == "gguf" else plan.outputs.get(Role(BASE, plan.quants[0]))
    stops = _write_modelfiles(plan, base_file, schema_info is not None)
    verify = run.settings["verify"]
    if run.verifying:
        with stage("verify"):
            run.verified += _verify(plan, run.calibration, base_file, stops, run.reference, run.stopped_in_torch)
    elif verify:
        log.info("no examples to verify the files on (a plain --base conversion without --imatrix-data)")
    verification = [{"file": file, **c.as_dict()} for file, c in run.verified]
    seconds = clock.as_dict()
    manifest = ExportManifest(
        name=plan.name,
        base=BaseInput(plan.base.spec, plan.base.kind, str(plan.base.path), plan.base_sha256),
        adapter=None if plan.adapter_dir is None else AdapterInput(str(plan.adapter_dir), run.settings["adapter"]),
        outputs=files, card=run.cards[MERGED], effort=run.settings["effort"], checks=verification if verify else None,
        imatrix=run.importance_info, json_schema=schema_info, budget=run.budgets.get(Role(MERGED, AUTO)),
        seconds=seconds, peak_rss_mb={k: round(v) for k, v in clock.peak_mb.items()},
        peak_rise_mb={k: round(v) for k, v in clock.peak_rise_mb.items()}, versions=package_versions(),
    ).write(plan.out_dir)
    run.progress.close()
    for file, c in run.verified:
        V.failed([c], plan.out_dir / file)
    lora = plan.outputs.get(Role(LORA))
    return ExportResult(plan.out_dir, files, manifest, verification, seconds,
                        lora_command(str(base_file), str(lora)) if lora and base_file else None,
                        {r: lora_command(str(plan.outputs[Role(BASE, r.quant)]), str(p))
                         for r, p in plan.outputs.items() if r.kind == REFIT})


# ---------------------------------------------------------------- importance matrix

@dataclass
class Calibration:
    """The examples an importance matrix and a budget are measured on: training examples (never
    the eval split), rendered and tokenised exactly as training did."""

    sequences: list[tuple[list[int], list[int]]]  # (token ids, labels: -100 where not an answer)
    source: str  # the data file's name
    first: list[tuple[D.Example, D.Tokenized]] = field(default_factory=list)  # the first examples, as trained


def _imatrix_file(plan: ExportPlan, choice: str):
    """(IMatrix or None, its manifest entry) for --imatrix FILE, read before any work; (None, None)
    for none and for auto (computed once the merged f16 is written: _computed_imatrix)."""
    if choice in ("none", "auto") or plan.quants == ["f16"]:
        return None, None
    imatrix = IM.read(choice)
    IM.check(imatrix, _weights_of(plan))
    return imatrix, {"file": str(Path(choice).resolve()), "sha256": file_sha256(Path(choice)), "computed": False,
                     "datasets": imatrix.datasets, "entries": len(imatrix.sums)}


def _weights_of(plan: ExportPlan) -> dict:
    """The names and shapes (GGUF's order) of the weights the export writes, read from the HF
    folder's headers (nothing converted yet), as inspect_gguf summarises a file: what an imatrix is
    checked against before any work."""
    from .converters.hf_to_gguf import HFModel

    model = HFModel(plan.hf_dir)
    return {"path": plan.base.spec + (" + adapter" if plan.adapter_dir else ""),
            "tensors": [{"name": name, "shape": list(reversed(model.index.shape(hf)))}
                        for hf, name in model.gguf_names.items()]}


def _computed_imatrix(plan: ExportPlan, f16: Path, calibration: Calibration, budget: int, decision_weight: float):
    """(IMatrix, its manifest entry): measured by llama.cpp on the merged `f16` running the
    calibration examples (imatrix.compute_gguf), written beside the GGUFs with the manifest."""
    chosen = IM.calibration_sample(calibration.sequences, budget)
    n_tokens = sum(len(ids) for ids, _ in chosen)
    log.info("importance matrix: %d tokens of %s (%d sequences); a token before an answer token weighs "
             "1 + %g x the model's entropy there", n_tokens, calibration.source, len(chosen), decision_weight)
    with progress_bar("imatrix", unit="tok") as progress:
        imatrix = IM.compute_gguf(f16, [ids for ids, _ in chosen], datasets=[calibration.source],
                                  chunk_size=max(len(ids) for ids, _ in chosen), labels=[lab for _, lab in chosen],
                                  decision_weight=decision_weight, progress=progress)
    return imatrix, {"file": f"{plan.name}-imatrix.gguf", "computed": True,  # written with the manifest
                     "datasets": [calibration.source], "tokens": n_tokens, "sequences": len(chosen),
                     "decision_weight": imatrix.decision_weight, "entries": len(imatrix.sums), "engine": "llama.cpp"}


def _calibration(plan: ExportPlan, data: Optional[str], first: int, needed: bool = True) -> Optional[Calibration]:
    """The run's own training examples through its tokenizer and chat template, or `data` through
    the base's for a plain conversion, the `first` of them also whole (for verification); None
    for a plain conversion without data, or (not `needed`: for verification alone) when the
    run's data has gone."""
    from .config import load_config
    from .hf_model import load_tokenizer

    if data is not None:
        source, fmt, seq_len, split, seed, tok_dir = data, "auto", 2048, 0.0, 0, plan.hf_dir
    elif plan.run is not None:
        run = plan.run
        if run.seq_len:
            source, fmt, seq_len, seed, split = run.data, run.data_format, run.seq_len, run.seed, run.held_out
        else:  # trained before summary.json recorded these: the run's config
            cfg = load_config(str(plan.adapter_dir.parent / "config.yaml"), {})
            source, fmt, seq_len, seed = cfg.data, cfg.data_format, cfg.seq_len, cfg.seed
            split = 0.0 if cfg.eval_data else cfg.eval_split
        tok_dir = plan.adapter_dir
        if not Path(source).is_file() and not needed:
            log.warning("the run's training data %s is not found: the files are not verified", source)
            return None
        if not Path(source).is_file():
            raise EdgeloraError(f"calibration: the run's training data {source} is not found; "
                                "pass --imatrix-data FILE.jsonl, or --imatrix none")
    else:
        return None
    examples, shape = D.read_jsonl(source, fmt)
    examples = D.split_eval(examples, split, seed)[0]
    tok = load_tokenizer(tok_dir)
    if shape != "text":
        D.ensure_chat_template(tok)
    tokenized, _ = D.tokenize_all(tok, examples, seq_len, what=str(source))
    whole = [(ex, D.tokenize_example(tok, ex)) for ex in examples[:first]]  # not cut to seq_len
    return Calibration([(t.input_ids, t.labels) for t in tokenized], Path(source).name, whole)


def _probe(f16: Path, calibration: Calibration):
    """A KL probe against `f16` on held-out training examples: the end of the order the imatrix took
    its tokens from, so the least likely to have been calibrated on."""
    from .klprobe import KLProbe

    order = IM.calibration_order(len(calibration.sequences))
    return KLProbe(f16, [calibration.sequences[i] for i in reversed(order)][:32], f16.parent)


def _budgeted(f16: Path, dst: Path, importance: Optional[IM.IMatrix], probe, target_size,
              target_bpw: Optional[float], search: bool, settle_z: float) -> tuple[dict, dict, Optional[dict]]:
    """The `auto` file: per-tensor types to the budget (edgelora.budget), quantised, its KL measured;
    with `search`, quantised to those types as search.quantize_searched searches for a fixed quant (the
    types, so the size, are the same whichever file is kept)."""
    from . import budget as B
    from .sizes import parse_size
    from .gguf_header import gguf_layout

    weights = [t for t in gguf_layout(f16).tensors if B.quantisable(t.name, t.shape)]
    overhead = f16.stat().st_size - sum(int(t.n_bytes) for t in weights)
    if target_bpw is not None:
        target = int(overhead + target_bpw * sum(int(t.n_elements) for t in weights) / 8)
    else:
        target = parse_size(target_size) if isinstance(target_size, str) else int(target_size)
    del weights
    if importance is None:
        log.warning("choosing per-tensor types without an importance matrix: every input column counts the same")

    def column_importance(name: str):
        return importance.importance(name) if importance is not None and name in importance.sums else None

    log.info("measuring the quantisation error of each weight at each type")
    with stage("budget"), progress_bar("errors", unit="w") as progress:
        options = B.weight_options(f16, column_importance, progress)
    log.info("measuring each weight class's cost in KL divergence")
    with stage("budget"):
        choice = B.choose(options, target, overhead, probe)
    preset = {"name": AUTO, "llama_ftype": choice.file_type, "overrides": choice.overrides()}
    log.info("quantising %s -> %s (%d per-tensor types, target %.1f MiB)", f16.name, dst.name, len(choice.types),
             target / 2**20)
    result, check = quantize_searched(f16, dst, preset, importance, probe if search else None, settle_z=settle_z)
    size = dst.stat().st_size
    if size > target:
        dst.unlink()
        raise EdgeloraError(f"{dst}: {size / 2**20:.2f} MiB came out over the target of "
                            f"{target / 2**20:.2f} MiB")
    with stage("measure"):
        measured = check["kl_kept"] if check else probe.measure(dst)
    return result, {"target_bytes": target, "target_bpw": target_bpw, "size_bytes": size,
                    "predicted_kl": choice.predicted_kl, "measured_kl": measured,
                    "kl_sequences": len(probe.rows), "sensitivity": choice.sensitivity,
                    "class_types": result["class_types"]}, check


def _copy_schema(plan: ExportPlan) -> Optional[dict]:
    """The run's schema.json (the JSON schema of its training answers), copied beside the GGUFs,
    where `--json-schema auto` finds it; its manifest entry."""
    source = plan.adapter_dir.parent / SCHEMA_FILE if plan.adapter_dir else None
    if source is None or not source.is_file():
        return None
    schema = read_json(source, "JSON schema")
    atomic_write_json(plan.out_dir / SCHEMA_FILE, schema)
    return {"file": SCHEMA_FILE, "sha256": file_sha256(plan.out_dir / SCHEMA_FILE)}


def _arch(hf_dir: Path) -> str:
    from .converters.hf_to_gguf import HFModel

    return HFModel(hf_dir).arch.name


# ---------------------------------------------------------------- Ollama Modelfile

def _trained_template(plan: ExportPlan) -> Optional[str]:
    """The chat template the run trained with (its adapter folder's tokenizer), else the base's."""
    from .converters.vocab import chat_template

    return (chat_template(plan.adapter_dir) if plan.adapter_dir else None) or chat_template(plan.hf_dir)


def _write_modelfiles(plan: ExportPlan, base_file: Optional[Path], schema: bool) -> Optional[list[str]]:
    """ollama.write_modelfiles for the laptop quant (and the LoRA route), with the run's chat template."""
    from .ollama import write_modelfiles

    return write_modelfiles(plan.out_dir, plan.outputs[Role(MERGED, _laptop_pick(plan.quants))], _trained_template(plan),
                            base_file, plan.outputs.get(Role(LORA)) if plan.lora_gguf else None, schema)


def _against_torch(plan: ExportPlan, f16: Path, calibration: Calibration):
    """(KLProbe of the merged f16 at the first examples' answers, whether the model in torch ends its
    answer to each (verify.Trained.stopped), the logits checks). The log-probabilities in torch are
    dropped once checked (4 bytes x vocabulary x position, with and without the adapter)."""
    from .klprobe import KLProbe

    reference = KLProbe(f16, [(t.input_ids, t.labels) for _, t in calibration.first], f16.parent,
                        max_positions=V.POSITIONS)
    log.info("comparing the f16 GGUF with the model in torch on %d training examples", len(reference.rows))
    in_torch = V.trained_model(plan.hf_dir, plan.adapter_dir, reference.rows, [t for _, t in calibration.first], f16)
    return reference, in_torch.stopped, V.logits_checks(reference, in_torch)


def _verify(plan: ExportPlan, calibration: Calibration, base_file: Optional[Path], stops: Optional[list[str]],
            reference, stopped_in_torch: list[bool]) -> list[tuple[str, "V.Check"]]:
    """edgelora.verify's checks on the run's first training examples, for the smallest merged
    file (every quant of it holds the same vocabulary and template) and the base + LoRA route
    (`reference`: the merged f16 at the examples' answers, which that route must come close to;
    `stopped_in_torch`: where the model as trained stops)."""
    from .runtime import load

    examples, trained = zip(*calibration.first)
    merged = min((p for r, p in plan.outputs.items() if r.kind == MERGED), key=lambda p: p.stat().st_size)
    routes = [(merged.name, merged, [])]
    lora = plan.outputs.get(Role(LORA))
    if lora is not None and base_file is not None:
        routes.append((lora.name, base_file, [(lora, 1.0)]))
    routes += [(path.name, plan.outputs[Role(BASE, role.quant)], [(path, 1.0)])  # checked against torch already
               for role, path in plan.outputs.items() if role.kind == REFIT]
    routes += [(path.name, path, []) for role, path in plan.outputs.items() if role.kind == REFIT_MERGED]
    out = []
    for label, model, loras in routes:
        with load(model, loras=loras, device="cpu", sequences=len(examples)) as rt:  # the stops answered together
            checks = V.token_checks(rt, examples, trained, stops) + [V.stop_check(rt, examples, trained,
                                                                                  stopped_in_torch)]
        if loras and loras[0][0] == lora:
            checks.append(V.lora_route_check(reference, model, loras[0][0]))
        log.info("verified %s on %d training examples: %s", label, len(examples),
                 ", ".join(f"{c.name} {'ok' if c.passed else 'FAILED'}" for c in checks))
        out += [(label, c) for c in checks]
    return out


def _refitted(plan: ExportPlan, run: "R.RefitRun", quant: str, card: dict, importance: Optional[IM.IMatrix],
              reference) -> tuple[dict, Optional[dict]]:
    """The run's adapter refitted against the base file at `quant`, written as a LoRA GGUF and, where
    the plan has a refit-merged file, merged into the refit's base and quantised again to the base
    file's types (with `importance`). With `reference` (the KLProbe of the merged f16 at the first
    examples' answers), the pair is checked in llama.cpp against the refit model in torch, and the
    merged file measured against it too. Returns (what the refit measured, with the check as
    `verified` and the merged file's KL as `merged`; quantize()'s summary of the merged file, or
    None). Works in a hidden folder beside the outputs, where an interrupted refit resumes."""
    import shutil

    from .logprobs import kl_top1
    from .converters.hf_to_gguf import convert, convert_lora
    from .layerwise import answer_logprobs
    from .quantize import quantize

    base_file, lora = plan.outputs[Role(BASE, quant)], plan.outputs[Role(REFIT, quant)]
    base_sha256 = file_sha256(base_file)
    # named by what it is made of, so a refit resumes only against the same base file and steps
    work = plan.out_dir / f".{plan.name}-refit-{quant}-{base_sha256[:12]}-{run.steps}.work"
    for stale in plan.out_dir.glob(f".{plan.name}-refit-{quant}-*.work"):
        if stale != work:
            shutil.rmtree(stale, ignore_errors=True)
    with stage("refit"):
        info = R.refit(run, base_file, plan.hf_dir, work)
    log.info("refitted against %s in %d steps: training loss %.4f -> %.4f", base_file.name, info["steps"],
             info["loss_first"], info["loss_last"])
    with stage("lora_gguf"):  # it belongs to that one file: its sha256 is the base the LoRA records
        convert_lora(plan.hf_dir, work / "run" / "adapter", lora,
                     card={**card, C.BASE_SHA256: base_sha256, C.REFIT_QUANT: quant})
    merged, result = plan.outputs.get(Role(REFIT_MERGED, quant)), None
    if merged is not None:
        log.info("merging the refit into %s and quantising it again -> %s", base_file.name, merged.name)
        with stage("convert"):
            convert(work / "base", work / "merged-f16.gguf", adapter_dir=work / "run" / "adapter", outtype="f16",
                    card=card)
        with stage("quantise"):
            result = quantize(work / "merged-f16.gguf", merged, _types_of(base_file, quant), imatrix=importance)
    if reference is not None:
        with stage("verify"):
            [in_torch] = answer_logprobs(work / "base", work / "run" / "adapter", reference.rows)
            info["verified"] = V.refit_check(reference, in_torch, base_file, lora).as_dict()
            if merged is not None:
                kl, top1 = kl_top1(in_torch, reference.logprobs(merged))
                info["merged"] = {"kl_vs_refit": kl, "top1_vs_refit": top1}
    shutil.rmtree(work)
    return info, result


def _laptop_pick(quants: list[str]) -> str:
    return LAPTOP_QUANT if LAPTOP_QUANT in quants else quants[0]
