"""The `edgelora` command line. It only parses options and calls the stages."""
from __future__ import annotations

import functools
from inspect import signature
import json
import logging
import os
from pathlib import Path
import sys
import warnings

import click

from .bench import THRESHOLD as BENCH_THRESHOLD
from .errors import EdgeloraError
from .exporter import EFFORTS, LAPTOP_QUANT
from .serve_limits import BODY_TIMEOUT_S, MAX_REQUEST_BYTES, MAX_TOKENS_LIMIT
from .imatrix import DECISION_WEIGHT
from .refit import MIN_STEPS as REFIT_MIN_STEPS, SHARE as REFIT_SHARE
from .runtime import Runtime, load as load_runtime
from .files import os_error
from .machine import DEVICES

log = logging.getLogger("edgelora")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(message)s", level=logging.INFO if not verbose else logging.DEBUG, stream=sys.stderr)
    for noisy in ("bitsandbytes", "transformers", "peft", "accelerate", "httpx", "gguf"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# Modules of the optional extras: the light install (the runtime) has none of them.
EXTRAS = {**dict.fromkeys(["torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"], "train"),
          **dict.fromkeys(["starlette", "uvicorn", "pydantic", "sse_starlette", "fastapi"], "serve")}


def friendly_errors(fn):
    """Bad input -> `error: <one line>` on stderr, exit 1, no traceback. So are a missing extra and
    an OS error (naming the path); Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeloraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in EXTRAS:
                raise
            click.echo(f"error: edgelora {click.get_current_context().info_name} needs {top}: "
                       f"pip install 'edgelora[{EXTRAS[top]}]'", err=True)
            sys.exit(1)
        except OSError as e:  # a full disk, a read-only folder, a missing file: the path and the reason
            click.echo(f"error: {os_error(e)}", err=True)
            sys.exit(1)

    return wrapper


def _default(fn, name: str):
    """The default of `fn`'s parameter `name`: an option shows the default its function has."""
    return signature(fn).parameters[name].default


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgelora")
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
def main(verbose: bool) -> None:
    """edgelora: fine-tune a small model on your own data and run it offline on a laptop.

    \b
    edgelora demo     --quick                              # the whole pipeline on the bundled task
    edgelora train    --data my.jsonl --out runs/my        # QLoRA/LoRA adapter
    edgelora export   runs/my --quant q4_k_m --lora-gguf   # laptop-ready GGUFs
    edgelora bench    runs/my/export --eval-data eval.jsonl   # quality vs size ladder
    edgelora run      runs/my/export/my-q4_k_m.gguf -p "Hi"   # or: chat FILE, serve FILE
    edgelora inspect  runs/my/export/my-q4_k_m.gguf        # types, size, bits/weight
    """
    _setup_logging(verbose)


def train_options(command):
    """`train`'s options, one per TrainConfig field: help, choices and default are stated once,
    beside the field (edgelora.config)."""
    import dataclasses

    from .config import TrainConfig, default_text, field_type

    for f in reversed([f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]):
        meta, shown, dashed = f.metadata, default_text(f), f.name.replace("_", "-")
        text = meta["help"] + (f" [default: {shown}]" if shown else "")
        if field_type(f.name) is bool:
            option = click.option(f"--{dashed}/--no-{dashed}", f.name, default=None, help=text)
        else:
            kind = click.Choice(meta["choices"]) if meta["choices"] else field_type(f.name)
            option = click.option(meta["flag"] or f"--{dashed}", f.name, type=kind, metavar=meta["metavar"], help=text)
        command = option(command)
    return command


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@train_options
@click.option("--resume", is_flag=True, help="Continue RUN_DIR from its last checkpoint.")
@click.option("--force", is_flag=True, help="Overwrite an existing RUN_DIR.")
@friendly_errors
def train(config, resume, force, **options):
    """Train a LoRA adapter. CONFIG is an optional YAML file with the same keys; flags override it."""
    from .config import load_config

    cfg = load_config(config, options)
    from .trainer import TrainingInterrupted, train as run_train

    try:
        result = run_train(cfg, force=force, resume=resume)
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(130)
    if not result.main:  # one line for a distributed run, from its main process
        return
    s = result.summary
    evals = f", eval loss {s.first_eval_loss:.4f} -> {s.final_eval_loss:.4f}" if s.final_eval_loss is not None else ""
    click.echo(f"trained {s.steps} steps in {s.wall_time_s:.0f}s (loss {s.final_loss:.4f}{evals}); "
               f"adapter in {result.run_dir / 'adapter'}")


@main.command()
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--format", "data_format", type=click.Choice(["auto", "chat", "instruction"]), default="auto",
              show_default=True, help="Data shape.")
@click.option("--no-enums", is_flag=True, help="Never turn a string field's values into an enum.")
@friendly_errors
def schema(data, data_format, no_enums):
    """Print the JSON schema `train` would infer from DATA's answers (and save as schema.json).

    Every assistant answer must be JSON, all objects or all arrays; otherwise it says why not and
    exits 1. Keys keep the data's order; keys missing from some answers are optional; a string
    field becomes an enum only when it takes a few short values, each seen several times.
    """
    from .schema import from_data

    inferred, found = from_data(data, data_format, enums=not no_enums)
    if inferred is None:
        raise EdgeloraError(found)
    click.echo(found, err=True)
    click.echo(json.dumps(inferred, indent=2))


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--base", help="Base model (default: the run's own). Without RUN_DIR: convert this model alone.")
@click.option("--quant", "quants", multiple=True, metavar="NAME",
              help=f"f16, q8_0, q4_k_m, q2_k or all; repeatable. [default: {LAPTOP_QUANT}]")
@click.option("--lora-gguf", is_flag=True, help="Also write the adapter as a llama.cpp LoRA GGUF (and the base beside it).")
@click.option("--imatrix", default="auto", show_default=True, metavar="auto|none|FILE",
              help="Importance matrix for the quantiser: auto = measured on the run's own training examples "
                   "(each quant is also made without it, and the file that answers more held-out training "
                   "prompts as the f16 does, then the lower KL, is kept); FILE = a llama.cpp imatrix (.gguf or .dat).")
@click.option("--effort", type=click.Choice(list(EFFORTS)), default="default", show_default=True,
              help="How much the export measures before it keeps a file. fast: the matrix from at most 4096 "
                   "tokens, each quant made once, with it; default: also made without it and with it per group "
                   "of weights, each group tried until its effect is clear; thorough: each group tried on every "
                   "held-out example. The files are verified at every effort.")
@click.option("--imatrix-data", type=click.Path(dir_okay=False), metavar="FILE.jsonl",
              help="Calibration examples for --imatrix auto without a RUN_DIR (a plain --base conversion).")
@click.option("--imatrix-tokens", type=click.IntRange(min=1),
              help=f"Most calibration tokens for --imatrix auto. [default: {EFFORTS['fast'].imatrix_tokens} at --effort "
                   f"fast, else {EFFORTS['default'].imatrix_tokens}]")
@click.option("--imatrix-decision-weight", type=click.FloatRange(min=0), default=DECISION_WEIGHT, show_default=True,
              metavar="A", help="For --imatrix auto: a token before an answer token counts 1 + A x the model's "
                                "entropy over that answer token (0: every token alike, as llama.cpp's imatrix "
                                "tool; the default kept a task of a few uncertain decisions at q2_k).")
@click.option("--target-size", metavar="SIZE",
              help="Also write NAME-auto.gguf: per-tensor types chosen by measured loss to fit SIZE (70MB, 64MiB).")
@click.option("--target-bpw", type=float, metavar="BITS", help="As --target-size, as bits per weight.")
@click.option("--refit", "refit", multiple=True, metavar="QUANT",
              help="Also quantise the bare base to QUANT (q2_k, q4_k_m, q8_0) and continue training the run's "
                   "adapter against exactly those weights: ships NAME-refit-QUANT-lora-f16.gguf beside the base "
                   "file (llama.cpp / llama-server run the pair as trained). auto (with --target-size): the types "
                   "of NAME-auto.gguf. Repeatable.")
@click.option("--refit-steps", type=click.IntRange(min=1), metavar="N",
              help=f"Training steps of each --refit. [default: 1/{REFIT_SHARE} of the run's steps, at least "
                   f"{REFIT_MIN_STEPS}]")
@click.option("--refit-merged", is_flag=True,
              help="Also merge each --refit into its base and quantise it again to the same types "
                   "(NAME-refit-QUANT.gguf, one file for any app); the second rounding loses most of what the "
                   "refit won (see benchmarks/README.md).")
@click.option("--name", help="Names the files (NAME-q4_k_m.gguf) and the model in them (general.name, what "
                             "LM Studio and Ollama list). [default: the run folder's name]")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check the files on the run's first training examples: the GGUF's chat template gives the "
                   "training token ids, answers end with a token llama.cpp and the Modelfile stop on, no doubled BOS.")
@click.option("--out", help="Output folder. [default: RUN_DIR/export]")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@friendly_errors
def export(run_dir, base, quants, lora_gguf, imatrix, effort, imatrix_data, imatrix_tokens, imatrix_decision_weight,
           target_size, target_bpw, refit, refit_steps, refit_merged, name, verify, out, force):
    """Write GGUF files for llama.cpp, Ollama and LM Studio: merged quants, optionally a LoRA GGUF."""
    from .exporter import export as run_export
    from .stages import summary as stage_summary

    result = run_export(run_dir, base=base, quants=list(quants), lora_gguf=lora_gguf, out=out, force=force,
                        imatrix=imatrix, effort=effort, imatrix_data=imatrix_data, imatrix_tokens=imatrix_tokens,
                        imatrix_decision_weight=imatrix_decision_weight, target_size=target_size,
                        target_bpw=target_bpw, name=name, verify=verify, refit=refit, refit_steps=refit_steps,
                        refit_merged=refit_merged)
    for f in result.files:
        click.echo(f"{result.out_dir / f.file}  {f.size_bytes / 2**20:8.1f} MiB  {f.bpw:6.2f} bpw  {f.role}")
        fell = f.fallbacks or {}
        if fell.get("count"):  # a K-quant name the model's row widths could not honour
            kinds = ", ".join(f"{t} x{n}" for t, n in fell["by_type"].items())
            click.echo(f"    nominal: {fell['count']} weights fell back ({kinds}); real {f.bpw:.2f} bits/weight")
    if result.checks:  # all passed: a failure is an error
        click.echo(f"verified on the run's training examples: {', '.join(dict.fromkeys(c['name'] for c in result.checks))}"
                   f" ({', '.join(dict.fromkeys(c['file'] for c in result.checks))})")
    if result.lora_route:
        click.echo(f"LoRA route (llama.cpp; Ollama 0.34.1+ and LM Studio take the merged file): {result.lora_route}")
    for role, command in result.refit_routes.items():
        click.echo(f"refitted against {role.quant} (llama.cpp): {command}")
    click.echo(f"time: {stage_summary(result.seconds)}")
    click.echo(f"manifest: {result.manifest}")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def inspect(path, tensors, as_json):
    """Show a GGUF's architecture, tensor types, size and bits per weight."""
    import json

    from .gguf_info import format_inspect, inspect_gguf

    info = inspect_gguf(path)
    if as_json:
        if not tensors:
            info = {k: v for k, v in info.items() if k != "tensors"}
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(format_inspect(info, tensors=tensors))


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--lora", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A LoRA GGUF to check on PATH as its base.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Chat or instruction JSONL (the training data): template, end of turn, BOS and stopping on its "
                   "first 8 examples.")
@click.option("--base", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The HF model folder or edgelora run the file came from (needs --data): its tokenizer's ids and "
                   "its logits in torch to compare with.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def doctor(path, lora, data, base, as_json):
    """Check any GGUF for the faults that raise no error: tokenizer, special tokens, chat template,
    end of turn, doubled BOS, stopping, a LoRA on the wrong base, logits against the source model.
    Exits 1 if a check fails."""
    from .doctor import diagnose

    result = diagnose(path, lora=lora, data=data, base=base)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
    else:
        info = result.info
        click.echo(f"{path}  {info['arch'] or '?'}  {info['name'] or ''}  {info['size_bytes'] / 2**20:.1f} MiB  "
                   f"{info['bpw']:.2f} bpw")
        if info["card"]:  # who the file says it is (edgelora.card)
            click.echo("  card  " + ", ".join(f"{k.removeprefix('general.')}={', '.join(map(str, v)) if isinstance(v, list) else v}"
                                              for k, v in info["card"].items()))
        for c in result.checks:
            click.echo(f"  {'ok  ' if c.passed else 'FAIL'}  {c.name:<15} {c.figure}")
        bad = [c.name for c in result.checks if not c.passed]
        click.echo(f"verdict: {'healthy' if not bad else 'problems: ' + ', '.join(bad)} ({len(result.checks)} checks)")
    if not result.healthy:
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True, metavar="EXPORT_DIR | FILE.gguf...")
@click.option("--eval-data", required=True, type=click.Path(dir_okay=False), help="Held-out chat or instruction JSONL.")
@click.option("--quants", help="Only these merged quants, comma-separated (f16 is always the reference).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N examples (a quick pass).")
@click.option("--score", type=click.Choice(["auto", "exact", "contains", "regex", "json"]), default="auto",
              show_default=True,
              help="How a greedy answer is judged against the reference: auto is json (field accuracy, valid JSON, exact "
                   "structure) when every reference answer is JSON, else exact.")
@click.option("--json-schema", metavar="auto|FILE",
              help="Also bench each GGUF with its answers held to this JSON schema (rows NAME+grammar); auto: the "
                   "schema.json export wrote.")
@click.option("--pattern", help="--score regex: the first match (or group 1) must agree with the reference's.")
@click.option("--threshold", type=float, default=BENCH_THRESHOLD, show_default=True,
              help="Recommend the smallest file keeping this fraction of the reference's task score.")
@click.option("--max-tokens", type=click.IntRange(min=1), help="Longest generated answer. [default: longest reference answer + 16]")
@click.option("--hf/--no-hf", default=None, help="Also measure the HF base + adapter in torch. [default: if installed]")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads. [default: llama.cpp's choice]")
@click.option("--out", help="Report folder. [default: EXPORT_DIR/bench, or ./bench]")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
@friendly_errors
def bench(inputs, eval_data, quants, limit, score, json_schema, pattern, threshold, max_tokens, hf, device, threads, out,
          force):
    """Quality versus size: every quant of an export (or the GGUF files given) on your eval set.

    Writes report.json, report.md and ladder.png, and recommends the smallest file whose task
    score stays within --threshold of the f16 reference.
    """
    from .bench import bench as run_bench
    from .bench.report import markdown

    result = run_bench(list(inputs), eval_data, out=out, quants=quants.split(",") if quants else None, limit=limit,
                       score=score, pattern=pattern, threshold=threshold, max_tokens=max_tokens, device=device,
                       threads=threads, hf=hf, force=force, progress=sys.stderr.isatty(), json_schema=json_schema)
    click.echo(markdown(result.report))
    click.echo("reports: " + ", ".join(str(p) for p in result.files.values()))


@main.command()
@click.option("--quick", is_flag=True, help="Fewer steps and eval examples, no torch reference row (< 5 min on 2 cores).")
@click.option("--out", default="edgelora-demo", show_default=True, help="Folder for the run, the GGUFs and the reports.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for llama.cpp. [default: llama.cpp's choice]")
@click.option("--refit", is_flag=True,
              help="Also refit the adapter against the smallest base file (auto, fitted to a smaller size than "
                   "without --refit; --quick: q2_k) and bench that pair too (a few minutes more).")
@click.option("--force", is_flag=True, help="Redo every stage (by default finished stages are reused).")
@friendly_errors
def demo(quick, out, threads, refit, force):
    """The whole pipeline on the embedded default: train, export, bench, before vs after.

    QLoRA-trains SmolLM2-135M-Instruct on a bundled extraction task (offline), exports f16,
    q8_0, q4_k_m and q2_k GGUFs plus a LoRA GGUF, benches them on held-out examples against
    the untrained base, and prints the ladder with a recommendation.
    """
    from .demo import demo as run_demo
    from .bench.report import markdown

    res = run_demo(out, quick=quick, refit=refit, force=force, threads=threads, progress=sys.stderr.isatty(),
                   say=lambda line: click.echo(line, err=True))
    s = res.summary
    click.echo()
    click.echo(markdown(res.after_report))
    scores = ", ".join(f"{q} {v['before']:.0%} -> {v['after']:.0%}" for q, v in s["task_score"].items())
    click.echo(f"task score on {s['examples']} held-out examples, before -> after training: {scores}")
    ex = s["example"]
    click.echo(f"\nexample question: {ex['question']!r}\n  expected: {ex['expected']}\n"
               f"  before (base q4_k_m):  {ex['before'].strip()!r}\n  after  (tuned q4_k_m): {ex['after'].strip()!r}\n")
    f = s["files"]
    click.echo(f"files: {f['export']}  (report: {f['report']}, plot: {f['plot']})")
    click.echo(f"try it:  edgelora chat {f['q4_k_m']}\n         "
               f"ollama create extract -f {f['modelfile']} && ollama run extract")
    if "refit" in f:
        click.echo(f"         {f['refit']}    (the refitted pair)")


def _runtime_options(fn):
    """The options `run` and `chat` share: model, LoRAs, device and sampling."""
    options = [
        click.argument("model", type=click.Path(dir_okay=False)),
        click.option("--lora", "loras", multiple=True, metavar="FILE", help="LoRA GGUF to apply; repeatable."),
        click.option("--lora-scale", "lora_scales", multiple=True, type=float, metavar="S",
                     help="Scale of the n-th --lora. [default: 1.0]"),
        click.option("--system", help="System message (chat template only)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=_default(Runtime.chat, "max_tokens"),
                     show_default=True, help="Longest answer in tokens."),
        click.option("--temperature", type=float, default=_default(Runtime.chat, "temperature"), show_default=True,
                     help="0 = greedy, reproducible."),
        click.option("--top-p", type=float, default=_default(Runtime.chat, "top_p"), show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True),
        click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=_default(load_runtime, "n_ctx"),
                     show_default=True, help="Context length in tokens (capped to the model's)."),
        click.option("--threads", type=click.IntRange(min=1), help="CPU threads. [default: llama.cpp's choice]"),
        click.option("--json-schema", metavar="auto|FILE",
                     help="Hold answers to this JSON schema (a llama.cpp grammar); auto: the schema.json export wrote "
                          "beside MODEL."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _lora_scales(loras, lora_scales) -> list[float]:
    """The n-th --lora-scale for the n-th --lora; 1.0 for those without one."""
    if len(lora_scales) > len(loras):
        raise EdgeloraError(f"{len(lora_scales)} --lora-scale values for {len(loras)} --lora files")
    return list(lora_scales) + [1.0] * (len(loras) - len(lora_scales))


def _open_runtime(model, loras, lora_scales, device, n_ctx, seed, threads):
    from .runtime import load

    scales = _lora_scales(loras, lora_scales)
    rt = load(model, loras=list(zip(loras, scales)), device=device, n_ctx=n_ctx, seed=seed, threads=threads,
              verbose=log.isEnabledFor(logging.DEBUG))  # `edgelora -v`: llama.cpp's own log too
    click.echo(f"device: {rt.describe()}", err=True)
    return rt


def _stream(pieces) -> str:
    """Echo the pieces as they come; returns the whole text."""
    text = []
    for piece in pieces:
        click.echo(piece, nl=False)
        text.append(piece)
    click.echo()
    return "".join(text)


@main.command()
@_runtime_options
@click.option("-p", "--prompt", required=True, help="The question (or, with --raw, the text to continue).")
@click.option("--raw", is_flag=True, help="Plain text completion, without the chat template.")
@click.option("--stats", is_flag=True, help="Print llama.cpp's prompt and generation speed to stderr.")
@friendly_errors
def run(model, loras, lora_scales, system, max_tokens, temperature, top_p, seed, device, n_ctx, threads, json_schema,
        prompt, raw, stats):
    """Answer one prompt with a GGUF model, streaming the answer to stdout."""
    from .schema import resolve

    if raw and system:
        raise EdgeloraError("--system needs the chat template; drop --raw")
    schema = resolve(json_schema, *loras, model)
    rt = _open_runtime(model, loras, lora_scales, device, n_ctx, seed, threads)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stream=True, json_schema=schema)
    if raw:
        _stream(rt.complete(prompt, **sampling))
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        _stream(rt.chat(messages, **sampling))
    if stats:
        t = rt.timings()
        click.echo(f"prompt: {t['prompt_tokens']} tokens, {t['prompt_tok_s']:.1f} tok/s; "
                   f"generation: {t['gen_tokens']} tokens, {t['gen_tok_s']:.1f} tok/s", err=True)


@main.command()
@_runtime_options
@friendly_errors
def chat(model, loras, lora_scales, system, max_tokens, temperature, top_p, seed, device, n_ctx, threads, json_schema):
    """Talk to a GGUF model: one line per message, /reset clears the conversation, /exit or EOF ends.

    Ctrl-C while it answers stops that answer (and drops that exchange); at the prompt it quits.
    """
    from .schema import resolve

    schema = resolve(json_schema, *loras, model)
    rt = _open_runtime(model, loras, lora_scales, device, n_ctx, seed, threads)
    rt.check_chat_template()  # a template that renders no conversation: refused now, not at every message
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo(err=True)
            sys.exit(130)
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            click.echo("(conversation cleared)", err=True)
            continue
        if not line:
            continue
        turn = history + [{"role": "user", "content": line}]
        try:
            answer = _stream(rt.chat(turn, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stream=True,
                                     json_schema=schema))
        except KeyboardInterrupt:
            click.echo()
            click.echo("(stopped)", err=True)
            continue
        except EdgeloraError as e:
            click.echo(f"error: {e}; /reset starts a new conversation", err=True)
            continue
        history = turn + [{"role": "assistant", "content": answer}]


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]FILE",
              help="LoRA GGUF served as model NAME [default: its file stem]; repeatable.")
@click.option("--lora-scale", "lora_scales", multiple=True, type=float, metavar="S",
              help="Scale of the n-th --lora. [default: 1.0]")
@click.option("--name", help="Model name of MODEL itself. [default: its file stem]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port; 0 picks a free one.")
@click.option("--api-key", envvar="EDGELORA_API_KEY", help="Require 'Authorization: Bearer KEY'. [env: EDGELORA_API_KEY]")
@click.option("--max-tokens-limit", type=click.IntRange(min=1), default=MAX_TOKENS_LIMIT, show_default=True,
              help="Most tokens one answer may ask for; also the default.")
@click.option("--max-request-bytes", type=click.IntRange(min=1), default=MAX_REQUEST_BYTES, show_default=True,
              help="Larger request bodies get 413.")
@click.option("--request-timeout", type=click.FloatRange(min=0, min_open=True), default=BODY_TIMEOUT_S, show_default=True,
              help="Seconds a request body may take to arrive (then 408).")
@click.option("--json-schema", metavar="auto|FILE",
              help="Hold answers to a JSON schema unless a request gives its own grammar or response_format; auto: "
                   "each model's schema.json beside its file.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=1), default=_default(load_runtime, "n_ctx"), show_default=True,
              help="Context length in tokens (capped to the model's).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads. [default: llama.cpp's choice]")
@friendly_errors
def serve(model, loras, lora_scales, name, host, port, api_key, max_tokens_limit, max_request_bytes, request_timeout,
          json_schema, n_ctx, device, threads):
    """Serve a GGUF model, and LoRA GGUFs on it as more models, over an OpenAI-compatible HTTP API.

    \b
    POST /v1/chat/completions (stream: true for server-sent events), POST /v1/completions,
    GET /v1/models. The request's `model` picks the base or a LoRA; the base is loaded once.
    Requests are answered one at a time, in order. Ctrl-C stops the server.
    """
    from .serve import build_app, listen, open_models, run as run_server

    scales = _lora_scales(loras, lora_scales)
    verbose = log.isEnabledFor(logging.DEBUG)
    models = open_models(model, list(zip(loras, scales)), name=name, device=device, n_ctx=n_ctx, threads=threads,
                         verbose=verbose, json_schema=json_schema)
    sock = listen(host, port)
    address = f"[{host}]" if ":" in host else host
    click.echo(f"serving http://{address}:{sock.getsockname()[1]}/v1 (OpenAI-compatible; Ctrl-C stops)")
    click.echo(f"models: {', '.join(n + (' (JSON schema)' if n in models.schemas else '') for n in models.names)}")
    click.echo(f"device: {models.runtime.describe()}")
    try:
        run_server(build_app(models, api_key=api_key, max_tokens_limit=max_tokens_limit,
                             max_request_bytes=max_request_bytes, body_timeout=request_timeout), sock,
                   log_level="debug" if verbose else "info")
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the signal
        sys.exit(130)


def program() -> None:
    """The `edgelora` program: `main`, the training commands first restarted with glibc's malloc
    set for training (allocator.py)."""
    from .allocator import restart_for_training

    restart_for_training(sys.argv[1:])
    main()


if __name__ == "__main__":  # pragma: no cover
    program()
