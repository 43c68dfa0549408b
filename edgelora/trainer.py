"""`edgelora train`: QLoRA / LoRA / DoRA / rsLoRA fine-tuning in a plain loop you can read top to bottom.

Why a hand-written loop rather than transformers' Trainer or TRL: the features this stage
needs (exact resume with the same data order and RNG, Ctrl-C -> checkpoint, tokens/s and
peak memory per step, completion-only loss normalised over the whole accumulated step) are
each a few lines here but callbacks-and-overrides there. The libraries still do the heavy
parts: transformers loads the model, PEFT builds and saves the adapter, bitsandbytes does
NF4 and the paged 8-bit optimizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from . import data as D
from . import schema as S
from .config import TrainConfig, default_run_dir, save_config, target_names
from .converters.architectures import ARCHITECTURES
from .errors import EdgeloraError
from .files import atomic_path, atomic_write_json, atomic_write_text, output_folder, refuse_overwrite, remove_own_folder
from .lean import lean
from .handoff import RunSummary
from .hf_model import compute_dtype, load_model, load_tokenizer, pick_device, pick_method
from .machine import device_name, package_versions, peak_rss_mb
from .bases import BaseModel, base_hash, materialise, resolve_base

log = logging.getLogger("edgelora")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RESUME_MUST_MATCH = ("base", "data", "data_format", "eval_data", "eval_split", "method", "dora", "rslora", "rank",
                     "alpha", "targets", "batch_size", "grad_accum", "seq_len", "seed")


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (or a callback asking to stop) once a checkpoint is safely written."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}; checkpoint saved to {checkpoint} (continue with --resume)")
        self.step, self.checkpoint = step, checkpoint


@dataclass
class TrainResult:
    run_dir: Path
    summary: RunSummary
    metrics: list = field(default_factory=list)
    main: bool = True  # False in the other processes of a distributed run (which wrote nothing)


# ---------------------------------------------------------------- the adapter and its memory

def target_modules(spec: str, model) -> list[str] | str:
    if spec == "all-linear":
        return "all-linear"
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__}
    wanted = list(ATTN_TARGETS) if spec == "attn" else target_names(spec)
    missing = [w for w in wanted if w not in names]
    if missing:
        raise EdgeloraError(f"--targets: no linear layer named {', '.join(missing)} (the model has: {', '.join(sorted(names))})")
    if "lm_head" in wanted and getattr(model.config, "tie_word_embeddings", False):
        raise EdgeloraError("--targets lm_head: this model ties its output layer to the token embedding "
                            "(tie_word_embeddings), which a GGUF stores once, so an adapter on it could not be "
                            "exported; leave lm_head out")
    return wanted


def activation_bytes(config, tokens: int, longest: int, dtype: torch.dtype) -> int:
    """A micro-batch's activations kept for the backward pass without gradient checkpointing:
    per layer and token ~6 hidden-size and 3 MLP-width values with the lean layers (the norms'
    inputs, attention's q, k, v and output, o_proj's input, gate and up, the dropout masks;
    measured on SmolLM2: 5.9 and 2.3) and the attention weights over up to `longest` positions."""
    e = torch.finfo(dtype).bits // 8
    per_token = 6 * config.hidden_size + 3 * config.intermediate_size + 2 * config.num_attention_heads * longest
    return e * tokens * config.num_hidden_layers * per_token


def free_memory(device: str) -> int:
    """Bytes training can still use on `device` (CUDA: free device memory; else free RAM)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def choose_checkpointing(cfg: TrainConfig, config, tokens: int, longest: int, device: str,
                         dtype: torch.dtype) -> tuple[bool, str]:
    """Gradient checkpointing (and why): as asked, else on only where a micro-batch's activations
    would take more than half of --max-memory or of the memory free now (it costs ~30% compute)."""
    if cfg.grad_checkpointing is not None:
        return cfg.grad_checkpointing, "as asked"
    from .sizes import parse_size

    need = activation_bytes(config, tokens, longest, dtype)
    room = parse_size(cfg.max_memory, "max_memory") if cfg.max_memory else free_memory(device)
    on = need > room / 2
    return on, f"activations ~{need / 2**30:.1f} GiB without it, {room / 2**30:.1f} GiB " + (
        "allowed" if cfg.max_memory else "free")


def add_adapter(model, cfg: TrainConfig, method: str, checkpointing: bool = True, lean_layers: bool = True):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.dora,
                      use_rslora=cfg.rslora, target_modules=target_modules(cfg.targets, model), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if lean_layers:
        lean(model)  # the same math, less kept for the backward pass
    return model


# ---------------------------------------------------------------- batches

GROUP_WINDOW = 16  # micro-batches whose examples are grouped by length


def micro_batches(n: int, batch_size: int, seed: int, start: int = 0,
                  lengths: Optional[list[int]] = None) -> Iterator[list[int]]:
    """Endless micro-batches of example indices, a fresh fixed-seed shuffle each epoch; skips `start`.

    Given the examples' `lengths`, each run of GROUP_WINDOW micro-batches of the shuffle is sorted
    by length before it is cut, and its micro-batches are shuffled again: similar lengths share a
    micro-batch (little padding) while the order stays random. Every example once per epoch; the
    same seed gives the same batches, so a resumed run sees what the first run would have."""
    per_epoch = math.ceil(n / batch_size)
    k, epoch_batches = start, (None, [])
    while True:
        epoch, j = divmod(k, per_epoch)
        if epoch_batches[0] != epoch:
            epoch_batches = (epoch, _epoch_batches(n, batch_size, random.Random(seed * 100003 + epoch), lengths))
        yield epoch_batches[1][j]
        k += 1


def _epoch_batches(n: int, batch_size: int, rng: random.Random, lengths: Optional[list[int]]) -> list[list[int]]:
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    batches = []
    span = batch_size * GROUP_WINDOW
    for w in range(0, n, span):
        window = sorted(order[w:w + span], key=lengths.__getitem__)
        cut = [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(cut)
        batches += cut
    return batches


def collate(items: list[D.Tokenized], pad_id: int, device: str):
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), D.IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        ids[i, :len(t.input_ids)] = torch.tensor(t.input_ids)
        labels[i, :len(t.labels)] = torch.tensor(t.labels)
        mask[i, :len(t.input_ids)] = 1
    return ids.to(device), labels.to(device), mask.to(device)


HEAD_CHUNK = 1024  # target positions whose logits exist at once


def summed_loss(model, ids, labels, mask) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over target tokens, and how many there were.

    With completion-only labels most positions are prompt, so for the architectures whose logits
    are the LM head of the last hidden state (Arch.head_at_targets) the head and the loss run only
    at the positions that predict a target, HEAD_CHUNK at a time, each chunk recomputed in the
    backward pass rather than kept: the batch x length x vocabulary logits never exist."""
    targets = labels[:, 1:]
    keep = targets != D.IGNORE
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    arch = ARCHITECTURES.get(base.config.model_type)
    if arch is None or not arch.head_at_targets:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        return F.cross_entropy(logits[keep], targets[keep], reduction="sum"), int(keep.sum())
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][keep]
    wanted = targets[keep]
    head, cap = base.get_output_embeddings(), getattr(base.config, "final_logit_softcapping", None)

    def chunk_loss(h, y):
        logits = head(h).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return F.cross_entropy(logits, y, reduction="sum")

    loss = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(wanted), HEAD_CHUNK):
        h, y = hidden[start:start + HEAD_CHUNK], wanted[start:start + HEAD_CHUNK]
        loss = loss + (torch.utils.checkpoint.checkpoint(chunk_loss, h, y, use_reentrant=False)
                       if torch.is_grad_enabled() else chunk_loss(h, y))
    return loss, len(wanted)


class TargetLoss(torch.nn.Module):
    """The model with its loss as one module: summed_loss(model, ids, labels, mask). Run through its
    forward, DistributedDataParallel (Accelerate's prepare) syncs the gradients of what it ran."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, mask):
        return summed_loss(self.model, ids, labels, mask)


@torch.no_grad()
def evaluate(loss_of: TargetLoss, items: list[D.Tokenized], batch_size: int, pad_id: int, device: str) -> float:
    """Mean loss per target token of `items`; under FSDP every process runs it (each forward
    gathers the weights from all of them)."""
    loss_of.eval()
    total, count = 0.0, 0
    for i in range(0, len(items), batch_size):
        loss, n = loss_of(*collate(items[i:i + batch_size], pad_id, device))
        total, count = total + loss.item(), count + n
    loss_of.train()
    return total / max(count, 1)


# ---------------------------------------------------------------- checkpoints

def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:07d}"


def trainable_state(model, optimizer, sharded: bool) -> tuple[Optional[dict], dict]:
    """(adapter weights by parameter name, optimizer state) as one process holds them: None and
    the optimizer's own state unsharded; sharded (FSDP), gathered from every process (each must
    call this) into the main one's CPU memory (the others get empty dicts)."""
    if not sharded:
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def save_checkpoint(run_dir: Path, step: int, model, state: tuple[Optional[dict], dict], scheduler, keep: int,
                    world: int = 1) -> Path:
    """`state`: trainable_state's. A sharded run's checkpoint also keeps the weights under the
    model's own parameter names, which restoring them into the shards needs."""
    ckpt_root = run_dir / "checkpoints"
    final = checkpoint_dir(run_dir, step)
    weights, optimizer_state = state
    with atomic_path(final) as tmp:
        model.save_pretrained(tmp / "adapter", state_dict=weights)
        torch.save({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(), "world_size": world, "weights_by_name": weights}, tmp / "state.pt")
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, newest first."""
    return sorted((p for p in (run_dir / "checkpoints").glob("step-*") if (p / "state.pt").is_file()), reverse=True)


def read_checkpoint(ckpt: Path, device: str) -> tuple[dict, dict]:
    """(adapter weights, optimizer/scheduler/RNG state) of a checkpoint, both read before either
    is used; EdgeloraError naming the file if one is damaged (truncated, not what we wrote)."""
    from safetensors.torch import load_file

    weights_path, state_path = ckpt / "adapter" / "adapter_model.safetensors", ckpt / "state.pt"

    def read(path: Path, load: Callable[[], object]):
        try:
            return load()
        except Exception as e:  # safetensors, zipfile, pickle and EOF errors all mean a damaged file
            raise EdgeloraError(f"{path}: damaged checkpoint ({type(e).__name__})") from None

    weights = read(weights_path, lambda: load_file(weights_path, device=device))
    state = read(state_path, lambda: torch.load(state_path, weights_only=False))
    if not isinstance(state, dict) or not {"step", "optimizer", "scheduler", "rng"} <= set(state):
        raise EdgeloraError(f"{state_path}: damaged checkpoint (not an edgelora training state)")
    return weights, state


def restore_checkpoint(run_dir: Path, model, optimizer, scheduler, world: int = 1,
                       sharded: bool = False) -> tuple[int, Path]:
    """Load the newest checkpoint that reads whole into model, optimizer and scheduler; a damaged
    one is reported and the one before it used. Returns (step, checkpoint). A run resumes with as
    many processes as it had (each step's batch is batch_size x processes), sharded if it was."""
    from peft import set_peft_model_state_dict

    device, damaged = str(next(model.parameters()).device), []
    for ckpt in checkpoints(run_dir):
        try:
            weights, state = read_checkpoint(ckpt, device)
        except EdgeloraError as e:
            log.warning("%s; trying an older checkpoint", e)
            damaged.append(str(e))
            continue
        if state.get("world_size", 1) != world:
            raise EdgeloraError(f"--resume: {ckpt} was written by a run of {state.get('world_size', 1)} processes, "
                                f"this one has {world}: launch it as it was launched")
        if (state.get("weights_by_name") is not None) != sharded:
            raise EdgeloraError(f"--resume: {ckpt} was written by a run {'with' if not sharded else 'without'} "
                                f"--fsdp: launch it as it was launched")
        if sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(model, optimizer, model_state_dict=state["weights_by_name"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            set_peft_model_state_dict(model, weights)
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        return int(state["step"]), ckpt
    raise EdgeloraError(f"--resume: no usable checkpoint in {run_dir / 'checkpoints'}"
                        + (f" ({damaged[0]})" if damaged else ""))


def check_resume_config(run_dir: Path, cfg: TrainConfig) -> None:
    import yaml

    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise EdgeloraError(f"--resume: {run_dir} has no config.yaml (not an edgelora run directory)")
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise EdgeloraError(f"{saved_path}: damaged run config ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise EdgeloraError(f"{saved_path}: damaged run config (not a mapping)")
    for key in RESUME_MUST_MATCH:
        if saved.get(key) != getattr(cfg, key):
            raise EdgeloraError(f"--resume: '{key}' was {saved.get(key)!r} in {saved_path}, now {getattr(cfg, key)!r}")


def prepare_run_dir(out: Path, force: bool, resume: bool) -> None:
    output_folder(out, "run directory")
    if any(out.iterdir()):
        refuse_overwrite([out], force or resume, "use --force to overwrite it or --resume to continue it")
    if force and not resume:
        remove_own_folder(out, "config.yaml", "run directory")
    output_folder(out, "run directory")


# ---------------------------------------------------------------- memory and progress

def peak_memory_mb(device: str) -> float:
    """The GPU's peak allocation on CUDA, else this process's peak resident memory."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mb()


class _CtrlC:
    """First Ctrl-C: finish the step, save a checkpoint, stop. Second: stop at once."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True
        log.warning("Ctrl-C: saving a checkpoint after this step (press again to abort)")

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ---------------------------------------------------------------- the run: setup, loop, finish

@dataclass
class Setup:
    """Everything the loop needs, made once by `setup` before the first step."""

    cfg: TrainConfig
    run_dir: Path
    base: BaseModel
    hf_dir: Path  # the base as an HF folder (a GGUF base is dequantised into the cache once)
    digest: str  # the base's sha256: summary.json names exactly what was trained on
    shape: str  # the data's format: chat | instruction | text
    schema: Optional[dict]  # the JSON schema of the training answers, where every answer is JSON
    tok: object
    train_set: list[D.Tokenized]
    eval_set: list[D.Tokenized]
    token_stats: tuple[D.TokenStats, D.TokenStats]  # train, eval
    accelerator: object  # Accelerate's, when this is one of several processes; else None
    device: str  # torch's name
    method: str  # qlora | lora
    dtype: torch.dtype
    sharded: bool  # FSDP: each process holds a shard of the model
    checkpointing: bool
    model: torch.nn.Module  # the PEFT model
    n_params: tuple[int, int]  # (trainable, all), counted before FSDP shards them
    loss_of: torch.nn.Module  # what a step calls: TargetLoss, wrapped for DDP / FSDP
    scorer: torch.nn.Module  # what evaluation calls
    params: list[torch.nn.Parameter]  # the trainable ones
    optimizer: torch.optim.Optimizer
    scheduler: object
    total_steps: int
    start_step: int  # 0, or the checkpoint's step on --resume

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else self.accelerator.process_index

    @property
    def main(self) -> bool:
        """Only the main process writes and reports."""
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"


def train(cfg: TrainConfig, *, force: bool = False, resume: bool = False,
          on_step: Optional[Callable[[int, float], Optional[bool]]] = None) -> TrainResult:
    """Train an adapter as `cfg` says and write the run directory. `on_step(step, loss)`
    returning True stops like Ctrl-C (a checkpoint is written, TrainingInterrupted raised)."""
    t_start = time.time()
    s = setup(cfg, force, resume)
    step, last_loss, metrics = loop(s, on_step)
    return finish(s, step, last_loss, metrics, time.time() - t_start)


def setup(cfg: TrainConfig, force: bool, resume: bool, *, dtype: Optional[torch.dtype] = None,
          start_adapter: Optional[Path] = None) -> Setup:
    """Check the request, read and tokenise the data (bad input fails before a model is loaded),
    prepare the run directory, load the model with its adapter, the optimizer and schedule, and
    on --resume restore the last checkpoint. `dtype`: the base's (default: the device's compute
    dtype); `start_adapter`: a PEFT adapter folder of the same config whose weights the adapter
    starts from (edgelora.refit), instead of PEFT's initialisation."""
    if cfg.data and not cfg.out:
        cfg = dataclasses.replace(cfg, out=str(default_run_dir(cfg.base, cfg.data)))
        log.info("run directory: %s (--out names another)", cfg.out)
    run_dir = _check_request(cfg, resume)
    train_ex, eval_ex, shape = _read_data(cfg)
    accelerator = _accelerator(cfg.device)  # None: one process; else launched by `accelerate launch` / torchrun
    main = accelerator is None or accelerator.is_main_process
    if not main:
        log.setLevel(logging.WARNING)  # one copy of each line: the main process's
    world = 1 if accelerator is None else accelerator.num_processes
    base = resolve_base(cfg.base)
    digest = base_hash(base)
    hf_dir = materialise(base, digest) if main else None
    if accelerator is not None:
        accelerator.wait_for_everyone()
        hf_dir = materialise(base, digest)  # made by the main process, found by the others
    device = pick_device(cfg.device) if accelerator is None else str(accelerator.device)
    method = pick_method("lora" if cfg.fsdp and cfg.method == "auto" else cfg.method, device)
    sharded = _check_fsdp(cfg, method, world)
    dtype = dtype or compute_dtype(device)
    tok = _tokenizer(hf_dir, base, shape, train_ex)
    train_set, train_stats = D.tokenize_all(tok, train_ex, cfg.seq_len, what=str(cfg.data))
    eval_set, eval_stats = (D.tokenize_all(tok, eval_ex, cfg.seq_len, what=str(cfg.eval_data or "eval split"))
                            if eval_ex else ([], D.TokenStats()))
    for name, st in (("train", train_stats), ("eval", eval_stats)):
        if st.truncated or st.dropped:
            log.warning("%s: %d of %d examples truncated to %d tokens, %d dropped (no answer tokens left)",
                        name, st.truncated, st.examples, cfg.seq_len, st.dropped)
    schema = _answer_schema(cfg, shape, train_ex)  # training answers only: the eval set stays unseen
    if main:
        prepare_run_dir(run_dir, force, resume)
        save_config(cfg, run_dir / "config.yaml")
        if schema is not None:
            atomic_write_json(run_dir / S.SCHEMA_FILE, schema)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    model = load_model(hf_dir, method, device, dtype)
    longest = max(len(t.input_ids) for t in train_set)
    checkpointing, why = choose_checkpointing(cfg, model.config, cfg.batch_size * longest, longest, device, dtype)
    log.info("gradient checkpointing %s (%s)", "on" if checkpointing else "off", why)
    model = add_adapter(model, cfg, method, checkpointing)
    if start_adapter is not None:
        _start_from(model, start_adapter)
    n_params = (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    if sharded:  # before the optimizer: FSDP replaces the parameters with their shards
        loss_of = shard(TargetLoss(model), device, world)
    else:
        loss_of = TargetLoss(model) if accelerator is None else accelerator.prepare(TargetLoss(model))
    scorer = loss_of if sharded else TargetLoss(model)  # eval: sharded, every process runs it; else the main one
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler, total_steps = _schedule(cfg, params, device, method, len(train_set), world)

    step = 0
    if resume:
        step, ckpt = restore_checkpoint(run_dir, model, optimizer, scheduler, world, sharded)
        log.info("resuming from %s (step %d of %d)", ckpt, step, total_steps)
        if main:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    elif main:
        (run_dir / "metrics.jsonl").write_text("")
    log.info("base %s | %s on %s (%s)%s | %d train / %d eval examples | %s trainable params | %d steps",
             base.spec, method, device, str(dtype).replace("torch.", ""), f" x {world} processes" if world > 1 else "",
             len(train_set), len(eval_set), f"{n_params[0]:,}", total_steps)
    return Setup(cfg=cfg, run_dir=run_dir, base=base, hf_dir=hf_dir, digest=digest, shape=shape, schema=schema,
                 tok=tok, train_set=train_set, eval_set=eval_set, token_stats=(train_stats, eval_stats),
                 accelerator=accelerator, device=device, method=method, dtype=dtype, sharded=sharded,
                 checkpointing=checkpointing, model=model, n_params=n_params, loss_of=loss_of, scorer=scorer,
                 params=params, optimizer=optimizer, scheduler=scheduler, total_steps=total_steps, start_step=step)


def _start_from(model, adapter_dir: Path) -> None:
    """Load the weights of the adapter in `adapter_dir` (trained with this config) into `model`'s."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(adapter_dir / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise EdgeloraError(f"{adapter_dir}: the adapter does not fit this model's ({result.unexpected_keys[0]})")


def _schedule(cfg: TrainConfig, params: list, device: str, method: str, n_examples: int, world: int):
    """(optimizer, learning-rate schedule, total steps): AdamW (bitsandbytes' paged 8-bit one for
    QLoRA on CUDA), linear warm-up then cosine decay over --max-steps or --epochs."""
    from transformers import get_cosine_schedule_with_warmup

    if device == "cuda" and method == "qlora":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(params, lr=cfg.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(n_examples / (cfg.batch_size * cfg.grad_accum * world))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, total_steps // 20)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, total_steps), total_steps


def _check_request(cfg: TrainConfig, resume: bool) -> Path:
    """The run directory, once what was asked can be done: data and out given, a checkpoint to
    resume from with the settings it was made with."""
    if not cfg.data or not cfg.out:
        raise EdgeloraError("train needs --data FILE.jsonl")
    run_dir = Path(cfg.out)
    if resume and run_dir.exists() and not run_dir.is_dir():
        raise EdgeloraError(f"run directory {run_dir} is a file, not a folder")
    if resume and not checkpoints(run_dir):
        raise EdgeloraError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}")
    if resume:
        check_resume_config(run_dir, cfg)
    return run_dir


def _read_data(cfg: TrainConfig) -> tuple[list, list, str]:
    """(training examples, eval examples, the data's format): --eval-data, or a split of --data."""
    train_ex, shape = D.read_jsonl(cfg.data, cfg.data_format)
    if cfg.eval_data:
        eval_ex, _ = D.read_jsonl(cfg.eval_data, shape)
    else:
        train_ex, eval_ex = D.split_eval(train_ex, cfg.eval_split, cfg.seed)
    return train_ex, eval_ex, shape


def _tokenizer(hf_dir: Path, base: BaseModel, shape: str, train_ex: list):
    """The base's tokenizer with the chat template training renders with (ChatML where it has none)."""
    tok = load_tokenizer(hf_dir)
    added = D.ensure_chat_template(tok)
    if shape != "text" and D.default_to_no_think(tok, train_ex):
        log.info("chat template: its no-think variant by default (enable_thinking false), as the answers hold no "
                 "<think> reasoning; the exported files carry it")
    if added and shape != "text":
        log.warning("%s has no chat template: training with %s turns, each closed by one token llama.cpp stops at; "
                    "the exported GGUF and Modelfile carry the template", base.spec, added)
    return tok


class Reporter:
    """What a run reports as it goes (mlx-lm's training callback): the eval loss before the first
    step and every eval_every steps, a metrics.jsonl row per step (main process), the progress bar."""

    def __init__(self, s: Setup):
        from tqdm.auto import tqdm

        self.s, self.metrics = s, []
        self.evaluating = bool(s.eval_set) and (s.main or s.sharded)  # a sharded model evaluates on every process
        self.bar = tqdm(total=s.total_steps, initial=s.start_step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not s.main)

    def start(self) -> None:
        if self.evaluating and self.s.start_step == 0:
            self._log({"step": 0, "eval_loss": round(self._eval_loss(), 5)})

    def step(self, step: int, loss: float, tokens: int, seconds: float) -> None:
        s = self.s
        tps = tokens / max(seconds, 1e-9)
        row = {"step": step, "loss": round(loss, 5), "lr": s.scheduler.get_last_lr()[0], "tokens": tokens,
               "tokens_per_s": round(tps, 1), "peak_mem_mb": round(peak_memory_mb(s.device), 1)}
        if self.evaluating and (step % s.cfg.eval_every == 0 or step == s.total_steps):
            row["eval_loss"] = round(self._eval_loss(), 5)
        self._log(row)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tps:.0f}",
                             **({"eval": f"{row['eval_loss']:.4f}"} if "eval_loss" in row else {}))
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()

    def _eval_loss(self) -> float:
        s = self.s
        return evaluate(s.scorer, s.eval_set, s.cfg.batch_size, s.tok.pad_token_id, s.device)

    def _log(self, row: dict) -> None:
        if self.s.main:
            _log_metric(self.s.metrics_path, self.metrics, row)


def loop(s: Setup, on_step: Optional[Callable[[int, float], Optional[bool]]] = None) -> tuple[int, float, list]:
    """The optimizer steps from s.start_step to s.total_steps: (the last step, its loss, the
    metrics rows logged). Ctrl-C or `on_step` returning True writes a checkpoint and raises
    TrainingInterrupted."""
    cfg, train_set, step = s.cfg, s.train_set, s.start_step
    # a global micro-batch is batch_size x world examples; each process takes its own slice of it
    batches = micro_batches(len(train_set), cfg.batch_size * s.world, cfg.seed, start=step * cfg.grad_accum,
                            lengths=[len(t.input_ids) for t in train_set])
    report, last_loss = Reporter(s), float("nan")
    report.start()
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    s.model.train()
    with _CtrlC() as ctrl_c:
        try:
            while step < s.total_steps:
                t0 = time.time()
                chunks = [[train_set[i] for i in next(batches)] for _ in range(cfg.grad_accum)]  # every process's
                last_loss = _optimizer_step(s, chunks)
                step += 1
                if not math.isfinite(last_loss):
                    raise EdgeloraError(f"loss became {last_loss} at step {step}; lower --lr")
                report.step(step, last_loss, sum(len(t.input_ids) for c in chunks for t in c), time.time() - t0)
                stop = bool(on_step and on_step(step, last_loss)) or ctrl_c.hit
                if s.accelerator is not None:  # one process stopping stops them all
                    stop = bool(s.accelerator.reduce(torch.tensor(int(stop), device=s.device), "sum").item())
                if stop or (step % cfg.save_every == 0 and step < s.total_steps):
                    _save(s, step)
                if stop:
                    raise TrainingInterrupted(step, checkpoint_dir(s.run_dir, step))
        finally:
            report.close()
    return step, last_loss, report.metrics


def _optimizer_step(s: Setup, chunks: list[list[D.Tokenized]]) -> float:
    """One optimizer step over `chunks` (grad_accum micro-batches of every process's examples, this
    process taking its slice of each): the gradient of the mean loss per target token over all of
    them, clipped, applied. Returns that mean loss."""
    world, pad_id = s.world, s.tok.pad_token_id
    mine = slice(s.rank * s.cfg.batch_size, (s.rank + 1) * s.cfg.batch_size)
    n_targets = sum(t.n_targets for c in chunks for t in c)
    summed = 0.0
    for k, chunk in enumerate(chunks):
        last = k == len(chunks) - 1  # processes sync gradients once per step, after the last
        share = chunk[mine] or chunk[:1]  # an epoch's last batch may leave a process nothing: it
        weight = world / n_targets if chunk[mine] else 0.0  # still joins the gradient sync, weighing 0
        with _sync_if(last, s.loss_of, s.accelerator, s.sharded):
            loss, _ = s.loss_of(*collate(share, pad_id, s.device))
            (loss * weight).backward()  # DDP averages over the processes: world / n_targets undoes it
        summed += loss.item() if chunk[mine] else 0.0
    if s.accelerator is not None:
        summed = s.accelerator.reduce(torch.tensor(summed, device=s.device), "sum").item()
    torch.nn.utils.clip_grad_norm_(s.params, 1.0)
    s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return summed / n_targets


def _save(s: Setup, step: int) -> None:
    """A checkpoint at `step` (written by the main process; the others wait for it)."""
    state = trainable_state(s.model, s.optimizer, s.sharded)
    if s.main:
        save_checkpoint(s.run_dir, step, s.model, state, s.scheduler, s.cfg.keep_checkpoints, s.world)
    if s.accelerator is not None:
        s.accelerator.wait_for_everyone()


def finish(s: Setup, step: int, last_loss: float, metrics: list, wall_s: float) -> TrainResult:
    """Write the adapter (PEFT's files, with the tokenizer) and summary.json, then drop the
    checkpoints: the run directory is complete."""
    weights, _ = trainable_state(s.model, s.optimizer, s.sharded)
    if not s.main:
        s.accelerator.wait_for_everyone()  # the main process writes the adapter and the summary
        return TrainResult(s.run_dir, RunSummary.read(s.run_dir), metrics, main=False)

    with atomic_path(s.run_dir / "adapter") as tmp:
        s.model.save_pretrained(tmp, state_dict=weights)
        cfg_path = tmp / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text())
        adapter_cfg["base_model_name_or_path"] = str(s.hf_dir)
        cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
        s.tok.save_pretrained(tmp)
    summary = _summary(s, step, last_loss, read_metrics(s.metrics_path), wall_s)
    summary.write(s.run_dir)
    shutil.rmtree(s.run_dir / "checkpoints", ignore_errors=True)
    if s.accelerator is not None:
        s.accelerator.wait_for_everyone()
    return TrainResult(s.run_dir, summary, metrics)


def _summary(s: Setup, step: int, last_loss: float, rows: list[dict], wall_s: float) -> RunSummary:
    """What was trained, on what, how it went (the whole run's metrics, resumed parts too)."""
    cfg, (train_stats, eval_stats) = s.cfg, s.token_stats
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return RunSummary(
        base=s.base.spec, base_path=str(s.base.path), base_hf_dir=str(s.hf_dir), base_sha256=s.digest,
        data=str(cfg.data), data_format=s.shape, seq_len=cfg.seq_len, seed=cfg.seed,
        held_out=0.0 if cfg.eval_data else cfg.eval_split, method=s.method, dora=cfg.dora, rslora=cfg.rslora,
        rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, device=device_name(s.device),
        compute_dtype=str(s.dtype).replace("torch.", ""), grad_checkpointing=s.checkpointing,
        world_size=s.world, fsdp=s.sharded, trainable_params=s.n_params[0], total_params=s.n_params[1],
        train_examples=len(s.train_set), eval_examples=len(s.eval_set),
        truncated_examples=train_stats.truncated + eval_stats.truncated,
        dropped_examples=train_stats.dropped + eval_stats.dropped,
        json_schema=S.SCHEMA_FILE if s.schema is not None else None,
        steps=step, final_loss=last_loss, first_eval_loss=evals[0] if evals else None,
        final_eval_loss=evals[-1] if evals else None,
        mean_tokens_per_s=round(sum(speeds) / len(speeds), 1) if speeds else None,
        peak_mem_mb=round(peak_memory_mb(s.device), 1), wall_time_s=round(wall_s, 1), versions=package_versions())


def _accelerator(device: str):
    """Hugging Face Accelerate's Accelerator when this process is one of several (`accelerate
    launch` or torchrun set WORLD_SIZE): DDP over NCCL on GPUs, gloo on CPUs (`device` cpu, or no
    GPU); None when alone."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu" or not torch.cuda.is_available())


def _check_fsdp(cfg: TrainConfig, method: str, world: int) -> bool:
    """Whether this run shards the model (--fsdp), refusing what FSDP cannot do here."""
    if not cfg.fsdp:
        return False
    if world < 2:
        raise EdgeloraError("--fsdp shards the model over several processes: launch with "
                            "torchrun --nproc_per_node N -m edgelora.cli train ... (or accelerate launch)")
    if method == "qlora":
        raise EdgeloraError("--fsdp: a 4-bit (QLoRA) base is not sharded here; use --method lora")
    return True


def shard(loss_of: TargetLoss, device: str, world: int) -> TargetLoss:
    """PyTorch FSDP2 (`fully_shard`) over the processes: each decoder block (the model's
    `_no_split_modules`) is a unit whose weights are gathered for its forward and backward and
    sharded again after; the embedding, final norm and head are the root's. Accelerate hands
    FSDP only to GPU processes, so this calls the torch API it calls, on any device."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world,))
    blocks = set(getattr(loss_of.model.get_base_model(), "_no_split_modules", None) or ())
    units = [m for m in loss_of.modules() if type(m).__name__ in blocks]
    if not units:
        raise EdgeloraError(f"--fsdp: {type(loss_of.model.get_base_model()).__name__} names no decoder block "
                            "class (_no_split_modules) to shard by")
    whole = sum(p.numel() for p in loss_of.parameters())
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(loss_of, mesh=mesh)
    held = sum(p.to_local().numel() for p in loss_of.parameters())
    log.info("FSDP: %d decoder blocks and the rest sharded over %d processes; this one holds %.0f%% of the "
             "weights between uses", len(units), world, 100 * held / whole)
    return loss_of


def _sync_if(last: bool, loss_of, accelerator, sharded: bool):
    """The processes synchronise gradients once per step, in the backward of its last micro-batch."""
    if sharded:
        loss_of.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if accelerator is None or last else accelerator.no_sync(loss_of)


def _answer_schema(cfg: TrainConfig, shape: str, examples: list) -> Optional[dict]:
    """The JSON schema of the answers (edgelora.schema), or None: text data, inference switched
    off, or answers that are not all JSON (said in the log)."""
    if not cfg.json_schema or shape == "text":
        return None
    schema, found = S.infer(S.answers_of(examples))
    log.info("%s", found)
    return schema


def _log_metric(path: Path, rows: list, row: dict) -> None:
    rows.append(row)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of metrics.jsonl; a line that does not parse (torn by a kill mid-write) is skipped
    with a warning naming it: the rows are a record, and training does not depend on them."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            row = None
        if not isinstance(row, dict):
            log.warning("%s:%d: damaged metrics row skipped", path, lineno)
            continue
        rows.append(row)
    return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, forget metric rows written after the checkpoint (they will be redone)."""
    if path.is_file():
        keep = [r for r in read_metrics(path) if isinstance(r.get("step"), int) and r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
