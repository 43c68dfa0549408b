"""Training configuration as data: a typed dataclass, read from YAML, overridden by CLI flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import EdgeloraError


@dataclass
class TrainConfig:
    base: str = "smollm2-135m"
    data: Optional[str] = None
    out: Optional[str] = None
    data_format: str = "auto"  # auto | chat | instruction | text
    eval_data: Optional[str] = None
    eval_split: float = 0.0
    method: str = "auto"  # auto | qlora | lora
    dora: bool = False
    rslora: bool = False
    rank: int = 8
    alpha: Optional[float] = None  # default 2 x rank
    dropout: float = 0.05
    targets: str = "all-linear"  # attn | all-linear | NAME,NAME
    lr: float = 2e-4
    warmup_steps: Optional[int] = None  # default: 5% of the steps
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | mps
    grad_checkpointing: bool = True
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    extra: dict = field(default_factory=dict)  # reserved for forward compatibility

    def resolved(self) -> "TrainConfig":
        """Fill in derived defaults and check ranges; returns a new config."""
        c = dataclasses.replace(self)
        if c.alpha is None:
            c.alpha = 2.0 * c.rank
        checks = [
            (c.data_format in ("auto", "chat", "instruction", "text"), "data_format must be auto, chat, instruction or text"),
            (c.method in ("auto", "qlora", "lora"), "method must be auto, qlora or lora"),
            (c.device in ("auto", "cpu", "cuda", "mps"), "device must be auto, cpu, cuda or mps"),
            (c.rank >= 1, "rank must be >= 1"),
            (0.0 <= c.dropout < 1.0, "dropout must be in [0, 1)"),
            (0.0 <= c.eval_split < 1.0, "eval_split must be in [0, 1)"),
            (c.lr > 0, "lr must be > 0"),
            (c.batch_size >= 1 and c.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (c.seq_len >= 8, "seq_len must be >= 8"),
            (c.max_steps is None or c.max_steps >= 1, "max_steps must be >= 1"),
            (c.epochs > 0, "epochs must be > 0"),
            (c.eval_every >= 1 and c.save_every >= 1, "eval_every and save_every must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise EdgeloraError(f"invalid config: {msg}")
        return c

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def load_config(path: Optional[str], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < CLI overrides (None means 'not given on the command line')."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise EdgeloraError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f"{path}:{line + 1}" if line is not None else path
            raise EdgeloraError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(loaded, dict):
            raise EdgeloraError(f"{path}: a config must be a mapping of keys to values")
        for key, value in loaded.items():
            k = str(key).replace("-", "_")
            if k not in FIELDS:
                raise EdgeloraError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(FIELDS - {'extra'}))})")
            values[k] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig(**values).resolved()
    except TypeError as e:
        raise EdgeloraError(f"invalid config: {e}") from None


def save_config(cfg: TrainConfig, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
