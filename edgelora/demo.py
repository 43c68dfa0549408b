"""`edgelora demo`: the whole product on the embedded default, offline, in one command.

    base SmolLM2-135M-Instruct (shipped GGUF)  --train-->  QLoRA adapter on the bundled
    extraction task  --export-->  f16 / q8_0 / q4_k_m / q2_k GGUFs + a LoRA GGUF
    --bench-->  the quality-versus-size ladder, and the base model's own score beside it.

With `refit`, the export also refits the adapter against its smallest base file (edgelora.refit)
and the ladder gains that pair.

Each stage leaves a finished marker (the run's summary.json, the export's manifest.json, the
bench's report.json) and a rerun skips what is finished; a training run cut off part-way
resumes from its last checkpoint; --force redoes everything. The stages are the same
functions `edgelora train / export / bench` call.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from .errors import EdgeloraError
from .verify import EXAMPLES as VERIFY_EXAMPLES
from .files import atomic_write_json, output_folder, read_json, remove_own_folder
from .handoff import MANIFEST_FILE, REPORT_FILE, SUMMARY_FILE, BenchReport
from .ollama import lora_command

QUANTS = ["f16", "q8_0", "q4_k_m", "q2_k"]
TARGET_SIZE = "74MiB"  # the full demo also writes `auto`: per-tensor types fitted to this (edgelora.budget)
REFIT_TARGET_SIZE = "69MiB"  # ... and with --refit to this, the base the adapter is refitted against
TRAIN = dict(base="smollm2-135m", method="auto", rank=8, targets="all-linear", batch_size=8, seq_len=256, seed=0)
MODES = {  # steps of 8 examples; eval loss while training (quick: none); examples benched (None: all 60); torch row;
    # the task importance matrix, the auto file and the +grammar bench rows (quick: none); training examples the
    # export is verified on (quick: fewer); with --refit, the base file the adapter is refitted against and the
    # auto file's size (full: smaller, where the merged file loses part of the task). The quick demo stays within
    # 5 minutes on 2 cores.
    "quick": dict(max_steps=24, lr=2e-3, eval_every=None, save_every=10, limit=8, hf=False, imatrix="none",
                  target_size=None, json_schema=None, verify_examples=4, refit="q2_k", refit_target_size=None),
    "full": dict(max_steps=60, lr=1e-3, eval_every=20, save_every=20, limit=None, hf=True, imatrix="auto",
                 target_size=TARGET_SIZE, json_schema="auto", verify_examples=VERIFY_EXAMPLES, refit="auto",
                 refit_target_size=REFIT_TARGET_SIZE),
}


@dataclass
class DemoResult:
    out_dir: Path
    summary: dict
    after_report: BenchReport
    before_report: BenchReport


def demo_data() -> tuple[Path, Path]:
    """The bundled task (examples/data, installed as edgelora.demo_data): train and eval JSONL."""
    root = resources.files("edgelora.demo_data")
    train, evals = root / "extract_train.jsonl", root / "extract_eval.jsonl"
    if not (train.is_file() and evals.is_file()):
        raise EdgeloraError("the demo dataset is missing from this installation (edgelora.demo_data)")
    return Path(str(train)), Path(str(evals))


def demo(out: str = "edgelora-demo", *, quick: bool = False, refit: bool = False, force: bool = False,
         threads: Optional[int] = None, progress: bool = True, say: Callable[[str], None] = print) -> DemoResult:
    from .bench import bench, read_eval
    from .config import default_run_dir, load_config
    from .exporter import export
    from .trainer import checkpoints, train

    mode = "quick" if quick else "full"
    m = MODES[mode]
    out_dir = Path(out)
    state_path = out_dir / "demo.json"
    try:
        state = read_json(state_path, "demo state") if state_path.is_file() else {}
    except EdgeloraError:
        if not force:
            raise EdgeloraError(f"{state_path}: damaged demo state; --force starts the demo over") from None
        state = {}
    if state and state.get("mode") != mode and not force:
        say(f"{out_dir} holds a {state.get('mode')} demo: starting over for the {mode} one")
        force = True
    output_folder(out_dir, "demo folder")
    if force:
        remove_own_folder(out_dir, state_path.name, "demo folder")
    output_folder(out_dir, "demo folder")
    timings = state.get("timings", {}) if state.get("mode") == mode else {}
    train_file, eval_file = demo_data()
    run_dir, base_dir = out_dir / default_run_dir(TRAIN["base"], str(train_file)).name, out_dir / "base"
    export_dir = run_dir / "export"
    if state and not force and state.get("refit", False) != refit:  # the export and its bench are redone, not training
        say(f"{out_dir} holds a demo {'with' if state.get('refit') else 'without'} the refit: redoing its export "
            "and bench")
        for marker in (export_dir / MANIFEST_FILE, export_dir / "bench" / REPORT_FILE):
            marker.unlink(missing_ok=True)

    def save_state() -> None:
        atomic_write_json(state_path, {"mode": mode, "refit": refit, "timings": timings})

    save_state()

    def stage(name: str, done: bool, what: str, fn) -> None:
        if done:
            say(f"[{name}] done already ({what}); --force redoes it")
            return
        say(f"[{name}] {what} ...")
        t0 = time.time()
        fn()
        timings[name] = round(time.time() - t0, 1)
        save_state()

    def do_train():
        resume = bool(checkpoints(run_dir))
        evals = {"eval_data": str(eval_file), "eval_every": m["eval_every"]} if m["eval_every"] else {}
        cfg = load_config(None, {**TRAIN, **evals, "data": str(train_file), "out": str(run_dir),
                                 "max_steps": m["max_steps"], "lr": m["lr"], "save_every": m["save_every"]})
        train(cfg, resume=resume, force=not resume)

    bench_opts = dict(limit=m["limit"], threads=threads, progress=progress, force=True)
    stage("train", (run_dir / SUMMARY_FILE).is_file(),
          f"QLoRA on {TRAIN['base']}, {m['max_steps']} steps of {TRAIN['batch_size']} examples", do_train)
    target_size = m["refit_target_size"] if refit else m["target_size"]
    budget = f" + auto (to {target_size})" if target_size else ""
    refits = [m["refit"]] if refit else []
    refitted = f" + the LoRA refitted against the {m['refit']} base" if refit else ""
    stage("export", (export_dir / MANIFEST_FILE).is_file(),
          f"merged {', '.join(QUANTS)}{budget} + LoRA GGUF{refitted}",
          lambda: export(str(run_dir), quants=QUANTS, lora_gguf=True, force=True, imatrix=m["imatrix"],
                         target_size=target_size, verify_examples=m["verify_examples"], refit=refits))
    stage("before", (base_dir / "bench" / REPORT_FILE).is_file(), "the untrained base at f16 and q4_k_m, benched",
          lambda: (export(None, base=TRAIN["base"], quants=["f16", "q4_k_m"], out=str(base_dir), force=True),
                   bench([str(base_dir)], str(eval_file), hf=False, **bench_opts)))
    grammar = " (and under the JSON schema learned from the answers)" if m["json_schema"] else ""
    stage("bench", (export_dir / "bench" / REPORT_FILE).is_file(),
          f"the trained ladder on the held-out set{grammar}",
          lambda: bench([str(export_dir)], str(eval_file), hf=m["hf"], json_schema=m["json_schema"], **bench_opts))

    before, after = BenchReport.read(base_dir / "bench"), BenchReport.read(export_dir / "bench")
    question = read_eval(str(eval_file), 1)[0]["messages"][-1]["content"]
    summary = _summary(mode, refit, timings, before, after, export_dir, question)
    atomic_write_json(state_path, summary)
    return DemoResult(out_dir, summary, after, before)


def _summary(mode: str, refit: bool, timings: dict, before: BenchReport, after: BenchReport, export_dir: Path,
             question: str) -> dict:
    """Scores before -> after, the first held-out question answered by both q4_k_m files, the files
    (and with the refit, the command that serves the refitted pair: llama.cpp and llama-server take
    it, Ollama and LM Studio do not)."""
    pair = next((r for r in after.rows if r.label.endswith("+refit")), None)
    return {
        "mode": mode, "refit": refit, "timings": timings, "examples": after.examples,
        "task_score": {q: {"before": before.row(q).task_score, "after": after.row(q).task_score}
                       for q in ("f16", "q4_k_m")},
        "example": {"question": question, "expected": after.expected[0],
                    "before": before.row("q4_k_m").answers[0], "after": after.row("q4_k_m").answers[0]},
        "recommendation": after.recommendation["text"],
        "files": {"export": str(export_dir), "q4_k_m": after.row("q4_k_m").model,
                  "report": str(export_dir / "bench" / "report.md"), "plot": str(export_dir / "bench" / "ladder.png"),
                  "modelfile": str(export_dir / "Modelfile"),
                  **({"refit": lora_command(pair.model, pair.loras[0])} if pair else {})},
    }
