"""The `edgelora` command line. It only parses options and calls the stages."""
from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

import click

from .errors import EdgeloraError

log = logging.getLogger("edgelora")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(format="%(message)s", level=logging.INFO if not verbose else logging.DEBUG, stream=sys.stderr)
    for noisy in ("bitsandbytes", "transformers", "peft", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def friendly_errors(fn):
    """Bad input -> `error: <one line>` on stderr, exit 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeloraError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgelora")
@click.option("-v", "--verbose", is_flag=True, help="More logging.")
def main(verbose: bool) -> None:
    """edgelora: fine-tune a small model on your own data and run it offline on a laptop.

    \b
    edgelora train    --data my.jsonl --out run       # QLoRA/LoRA adapter
    edgelora export   run --quant q4_k_m               # laptop-ready GGUF
    edgelora inspect  run/export/run-q4_k_m.gguf       # types, size, bits/weight
    """
    _setup_logging(verbose)


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--base", help="Base model: alias (smollm2-135m), HF directory, GGUF file or cached hub id. [default: smollm2-135m]")
@click.option("--data", help="Training data, JSONL (chat, instruction or text).")
@click.option("--out", help="Run directory to write.")
@click.option("--format", "data_format", type=click.Choice(["auto", "chat", "instruction", "text"]), help="Data shape. [default: auto]")
@click.option("--eval-data", help="Held-out JSONL for eval loss.")
@click.option("--eval-split", type=float, help="Hold out this fraction of --data for eval (fixed seed).")
@click.option("--method", type=click.Choice(["auto", "qlora", "lora"]), help="qlora: 4-bit NF4 base; lora: full-precision base. [default: qlora where bitsandbytes works]")
@click.option("--dora/--no-dora", default=None, help="Weight-decomposed LoRA.")
@click.option("--rslora/--no-rslora", default=None, help="Rank-stabilised scaling alpha/sqrt(r).")
@click.option("--rank", type=int, help="LoRA rank. [default: 8]")
@click.option("--alpha", type=float, help="LoRA alpha. [default: 2 x rank]")
@click.option("--dropout", type=float, help="LoRA dropout. [default: 0.05]")
@click.option("--targets", help="attn | all-linear | NAME,NAME. [default: all-linear]")
@click.option("--lr", type=float, help="Peak learning rate. [default: 2e-4]")
@click.option("--warmup-steps", type=int, help="Linear warm-up steps, then cosine decay. [default: 5% of steps]")
@click.option("--epochs", type=float, help="Passes over the data. [default: 1]")
@click.option("--max-steps", type=int, help="Optimizer steps (overrides --epochs).")
@click.option("--batch-size", type=int, help="Examples per micro-batch. [default: 4]")
@click.option("--grad-accum", type=int, help="Micro-batches per optimizer step. [default: 1]")
@click.option("--seq-len", type=int, help="Longest sequence in tokens; longer ones are truncated. [default: 512]")
@click.option("--seed", type=int, help="Seed for data order, split and init. [default: 0]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), help="[default: auto]")
@click.option("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Trade compute for memory. [default: on]")
@click.option("--eval-every", type=int, help="Steps between eval-loss measurements. [default: 50]")
@click.option("--save-every", type=int, help="Steps between checkpoints. [default: 100]")
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
    s = result.summary
    evals = f", eval loss {s['first_eval_loss']:.4f} -> {s['final_eval_loss']:.4f}" if s["final_eval_loss"] is not None else ""
    click.echo(f"trained {s['steps']} steps in {s['wall_time_s']:.0f}s (loss {s['final_loss']:.4f}{evals}); "
               f"adapter in {result.run_dir / 'adapter'}")


@main.command()
@click.argument("run_dir", required=False, type=click.Path(file_okay=False))
@click.option("--base", help="Base model (default: the run's own). Without RUN_DIR: convert this model alone.")
@click.option("--quant", "quants", multiple=True, metavar="NAME",
              help="f16, q8_0, q4_k_m, q2_k or all; repeatable. [default: q4_k_m]")
@click.option("--lora-gguf", is_flag=True, help="Also write the adapter as a llama.cpp LoRA GGUF (and the base beside it).")
@click.option("--out", help="Output folder. [default: RUN_DIR/export]")
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@friendly_errors
def export(run_dir, base, quants, lora_gguf, out, force):
    """Write GGUF files for llama.cpp, Ollama and LM Studio: merged quants, optionally a LoRA GGUF."""
    from .export import export as run_export

    result = run_export(run_dir, base=base, quants=list(quants), lora_gguf=lora_gguf, out=out, force=force)
    for f in result.files:
        click.echo(f"{result.out_dir / f['file']}  {f['size_bytes'] / 2**20:8.1f} MiB  {f['bpw']:6.2f} bpw  {f['role']}")
    click.echo(f"manifest: {result.manifest}")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@friendly_errors
def inspect(path, tensors, as_json):
    """Show a GGUF's architecture, tensor types, size and bits per weight."""
    import json

    from .inspect import format_inspect, inspect_gguf

    info = inspect_gguf(path)
    if as_json:
        if not tensors:
            info = {k: v for k, v in info.items() if k != "tensors"}
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(format_inspect(info, tensors=tensors))


if __name__ == "__main__":  # pragma: no cover
    main()
