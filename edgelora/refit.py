"""Refit a run's LoRA against the exact weights of the quantised base it will run on (issue #31).

A run's adapter was trained against its base in torch (NF4 for QLoRA); the LoRA route then ships
it beside a llama.cpp-quantised base whose weights it never saw, and what the quantiser took away
nothing gives back. A refit continues training the adapter against the shipped file itself:

    dequantise  every weight of the quantised base GGUF, read back with ggml's own to_float
                (edgelora.ggml_quant.dequantize) and put back in HF's layout (Q/K rows un-permuted):
                a float32 HF folder holding, bit for bit, the values llama.cpp reads
    train       the run's adapter, from its trained weights, on the run's own training data,
                config, template and loss, against that frozen base (edgelora.trainer's setup /
                loop / finish: progress, checkpoints, resume after Ctrl-C); on the CPU the base's
                decoder weights are held as the file's own blocks, dequantised as each layer
                runs (edgelora.packed): the same values in the file's size, not 4 bytes a weight

What ships is that quantised base GGUF and the refitted adapter as a LoRA GGUF (edgelora.exporter
writes both and checks llama.cpp runs the pair as torch runs the refit model).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import EdgeloraError

log = logging.getLogger("edgelora")

# A refit takes the run's own steps / SHARE by default: a third kept 97% of the f16's task score at
# 73.6 MiB on the records task in 43% of the training time, a quarter did not (benchmarks/README.md)
SHARE = 3
MIN_STEPS = 4
SHARD_BYTES = 1 << 30  # float32 bytes per safetensors file of the dequantised base


@dataclass
class RefitRun:
    """What a refit reads: the run's config (data, adapter settings) and how many steps it takes."""

    run_dir: Path
    config: object  # edgelora.config.TrainConfig, as the run was trained
    steps: int

    @property
    def adapter_dir(self) -> Path:
        return self.run_dir / "adapter"


def check(run_dir: Path, steps: Optional[int]) -> RefitRun:
    """What a refit of the run in `run_dir` needs, checked before any work: its config and data
    still readable, an adapter llama.cpp can take as a LoRA (not DoRA). `steps`: None for the
    default, the run's own steps / SHARE (at least MIN_STEPS)."""
    from .config import load_config
    from .handoff import RunSummary

    cfg = load_config(str(run_dir / "config.yaml"), {})
    if cfg.dora:
        raise EdgeloraError(f"--refit: {run_dir} trained a DoRA adapter, which llama.cpp cannot run as a LoRA; "
                            "refit needs a LoRA or rsLoRA run")
    for what, path in (("training data", cfg.data), ("eval data", cfg.eval_data)):
        if path and not Path(path).is_file():
            raise EdgeloraError(f"--refit: the run's {what} {path} is not found (a refit trains on it again; "
                                "run export from the folder the run was trained in)")
    if steps is not None and steps < 1:
        raise EdgeloraError(f"--refit-steps must be at least 1, not {steps}")
    trained = RunSummary.read(run_dir).steps
    return RefitRun(run_dir, cfg, steps or max(MIN_STEPS, math.ceil(trained / SHARE)))


def dequantised_folder(quantised: Path, hf_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """An HF folder at `out` of the model in `hf_dir` whose weights (every tensor of two or more
    dimensions the GGUF holds) are those of the GGUF `quantised` as ggml reads them, float32;
    norms and biases (kept float32 in a GGUF) and the config come from `hf_dir`, the tokenizer
    (with the chat template training used) from `tokenizer_dir`. Written a shard at a time."""
    from safetensors.torch import save_file

    from .converters.hf_to_gguf import HFModel
    from .files import atomic_path
    from .gguf_header import gguf_layout
    from .hf_model import load_tokenizer

    if (out / ".complete").is_file():
        return out
    model = HFModel(hf_dir)
    held = {t.name: t for t in gguf_layout(quantised).tensors}
    names = [n for n in model.index.names() if not (model.tied and n == "lm_head.weight")]
    with atomic_path(out) as tmp:
        tmp.mkdir()
        weight_map, shard, size, files = {}, {}, 0, []

        def flush() -> None:
            nonlocal shard, size
            if shard:
                files.append(f"model-{len(files) + 1:05d}.safetensors")
                save_file(shard, tmp / files[-1], metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, files[-1]))
                shard, size = {}, 0

        for name in names:
            shape = model.index.shape(name)
            gguf_name = model.gguf_names.get(name)
            if gguf_name is not None and len(shape) >= 2:
                t = held.get(gguf_name)
                if t is None:
                    raise EdgeloraError(f"{quantised}: no tensor {gguf_name} (another model than {hf_dir}?)")
                tensor = model.from_gguf_layout(name, _as_float(t).reshape(shape))
            else:
                tensor = model.index.load(name).float()
            shard[name] = tensor.contiguous()
            size += tensor.numel() * 4
            if size >= SHARD_BYTES:
                flush()
        flush()
        total = sum(math.prod(model.index.shape(n)) for n in names) * 4
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
        config = json.loads((hf_dir / "config.json").read_text())
        config["torch_dtype"] = config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (hf_dir / "generation_config.json").is_file():
            shutil.copy(hf_dir / "generation_config.json", tmp)
        load_tokenizer(tokenizer_dir).save_pretrained(tmp)
        (tmp / "edgelora_source.json").write_text(json.dumps({"dequantised_from": str(quantised)}) + "\n")
        (tmp / ".complete").write_text("")
    return out


def refit(run: RefitRun, quantised: Path, hf_dir: Path, work: Path, on_step=None) -> dict:
    """Continue training `run`'s adapter against the weights of the GGUF `quantised` (a quant of
    the base in `hf_dir`), in `work` (the dequantised base in work/base, the refit as a run in
    work/run: an interrupted refit resumes there). Returns what it measured: steps, seconds, the
    training loss over the first and last steps, the eval loss before and after (where the run
    holds out an eval set); the refitted adapter is work/run/adapter. `on_step` as for
    trainer.loop: returning True stops as Ctrl-C does (KeyboardInterrupt, after a checkpoint)."""
    import torch

    from .handoff import RunSummary, finished_run
    from .packed import pack_linears
    from .trainer import TrainingInterrupted, checkpoints, finish, loop, read_metrics, setup

    base = dequantised_folder(quantised, hf_dir, run.adapter_dir, work / "base")
    out = work / "run"
    if not finished_run(out):
        cfg = dataclasses.replace(run.config, base=str(base), out=str(out), method="lora", max_steps=run.steps,
                                  save_every=max(1, run.steps // 4), eval_every=run.steps, json_schema=False,
                                  warmup_steps=0)
        start, resume = time.time(), bool(checkpoints(out))
        log.info("refitting %s against %s: %d steps%s", run.adapter_dir, quantised.name, run.steps,
                 " (resuming)" if resume else "")
        s = setup(cfg, force=not resume, resume=resume, dtype=torch.float32, start_adapter=run.adapter_dir)
        if s.device == "cpu":  # on a GPU the float32 base is there already (and dequantising is the CPU's)
            log.info("the base held as %s holds it: %s", quantised.name, ", ".join(
                f"{n} {t} layers" for t, n in pack_linears(s.model, quantised, hf_dir).items()))
        try:
            step, last_loss, metrics = loop(s, on_step)
        except TrainingInterrupted:
            raise KeyboardInterrupt from None  # the checkpoint is written: the same export again resumes
        finish(s, step, last_loss, metrics, time.time() - start)
    summary = RunSummary.read(out)
    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    first = max(1, len(losses) // 4)
    return {"steps": summary.steps, "seconds": round(summary.wall_time_s, 1),
            "loss_first": round(sum(losses[:first]) / first, 5), "loss_last": round(sum(losses[-first:]) / first, 5),
            **({"eval_loss_before": evals[0], "eval_loss_after": evals[-1]} if len(evals) > 1 else {})}


def _as_float(t):
    """A GGUF tensor (gguf_header.TensorInfo) as ggml reads it: a float32 torch tensor of its rows,
    (rows, row length)."""
    import torch

    from .ggml_quant import dequantize

    n = int(t.shape[0])  # gguf-py gives ggml's shape, innermost first
    return torch.from_numpy(dequantize(t.data, t.tensor_type.name, (math.prod(int(d) for d in t.shape[1:]), n)))


def adapter_from_gguf(lora: Path, hf_dir: Path, config_dir: Path, out: Path) -> Path:
    """The LoRA GGUF `lora` (written by convert_lora for the model in `hf_dir`) as a PEFT adapter
    folder at `out`: its A and B (B back in HF's row order), with the adapter config in `config_dir`
    (the run's: rank, alpha, targets). What doctor compares a shipped refit with, from the files alone."""
    from safetensors.torch import save_file

    from .converters.hf_to_gguf import HFModel
    from .gguf_header import gguf_layout

    model = HFModel(hf_dir)
    held = {t.name: t for t in gguf_layout(lora).tensors}
    weights = {}
    for name, gguf_name in model.gguf_names.items():
        if f"{gguf_name}.lora_a" not in held:
            continue
        module = "base_model.model." + name.removesuffix(".weight")
        for part, key in (("a", "lora_A"), ("b", "lora_B")):
            w = _as_float(held[f"{gguf_name}.lora_{part}"])
            weights[f"{module}.{key}.weight"] = model.from_gguf_layout(name, w) if part == "b" else w
    if not weights:
        raise EdgeloraError(f"{lora}: no LoRA tensors for the model in {hf_dir}")
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    shutil.copy(config_dir / "adapter_config.json", out)
    return out
