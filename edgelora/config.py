"""Training configuration as data: a typed dataclass, read from YAML, overridden by CLI flags."""
from __future__ import annotations

import dataclasses
import math
import typing
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
    grad_checkpointing: Optional[bool] = None  # None: on only where the activations would not fit the memory
    max_memory: Optional[str] = None  # the memory training may use (e.g. 8GiB); default: what is free
    fsdp: bool = False  # several processes: shard the model over them (FSDP2) instead of copying it to each (DDP)
    json_schema: bool = True  # JSON answers: infer their schema into schema.json (export ships it)
    eval_every: int = 50
    save_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1
    extra: dict = field(default_factory=dict)  # reserved for forward compatibility

    def resolved(self) -> "TrainConfig":
        """Check every value's type and range, fill in derived defaults; returns a new config.

        This is the one place values are checked, before anything is written: a value that
        passes here does not crash a later stage. ConfigError names the field."""
        c = dataclasses.replace(self, **{f: _typed(f, getattr(self, f)) for f in _TYPES})
        if c.alpha is None:
            c.alpha = 2.0 * c.rank
        checks = [
            ("data_format", c.data_format in ("auto", "chat", "instruction", "text"),
             "must be auto, chat, instruction or text"),
            ("method", c.method in ("auto", "qlora", "lora"), "must be auto, qlora or lora"),
            ("device", c.device in ("auto", "cpu", "cuda", "mps"), "must be auto, cpu, cuda or mps"),
            ("rank", c.rank >= 1, "must be >= 1"),
            ("alpha", c.alpha > 0, "must be > 0"),
            ("dropout", 0.0 <= c.dropout < 1.0, "must be in [0, 1)"),
            ("eval_split", 0.0 <= c.eval_split < 1.0, "must be in [0, 1)"),
            ("lr", c.lr > 0, "must be > 0"),
            ("batch_size", c.batch_size >= 1, "must be >= 1"),
            ("grad_accum", c.grad_accum >= 1, "must be >= 1"),
            ("seq_len", c.seq_len >= 8, "must be >= 8"),
            ("max_steps", c.max_steps is None or c.max_steps >= 1, "must be >= 1"),
            ("warmup_steps", c.warmup_steps is None or c.warmup_steps >= 0, "must be >= 0"),
            ("epochs", c.epochs > 0, "must be > 0"),
            ("seed", 0 <= c.seed < 2**32, "must be in [0, 2**32)"),
            ("eval_every", c.eval_every >= 1, "must be >= 1"),
            ("save_every", c.save_every >= 1, "must be >= 1"),
            ("keep_checkpoints", c.keep_checkpoints >= 1, "must be >= 1"),
            ("log_every", c.log_every >= 1, "must be >= 1"),
            ("targets", c.targets in ("attn", "all-linear") or bool(target_names(c.targets)),
             "must be attn, all-linear or layer names separated by commas"),
            ("max_memory", c.max_memory is None or _is_size(c.max_memory), "must be a size such as 8GiB"),
        ]
        for name, ok, msg in checks:
            if not ok:
                raise ConfigError(name, f"{name} {msg}, not {getattr(c, name)!r}")
        return c

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d


def _is_size(text: str) -> bool:
    from .budget import parse_size

    try:
        return parse_size(text, "max_memory") > 0
    except EdgeloraError:
        return False


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)  # field -> int, float, str, bool, dict or Optional[...]


class ConfigError(EdgeloraError):
    """A config value of the wrong type or out of range; `field` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"invalid config: {message}")
        self.field = field


def target_names(spec: str) -> list[str]:
    """The layer names of a comma-separated --targets value."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def _typed(name: str, value: Any) -> Any:
    """`value` as field `name`'s type. Whole numbers stay ints (2.0 -> 2, 2.5 is an error);
    a float field takes numeric strings, as PyYAML reads `1e-4` as a string; floats must be
    finite. Anything else of the wrong type is a ConfigError."""
    want = _TYPES[name]
    optional = typing.get_origin(want) is typing.Union
    if optional:
        if value is None:
            return None
        want = next(t for t in typing.get_args(want) if t is not type(None))
    if want is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(name, f"{name} must be true or false, not {value!r}")
    if want is str:
        if isinstance(value, str):
            return value
        raise ConfigError(name, f"{name} must be a string, not {value!r}")
    if want is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(name, f"{name} must be a mapping, not {value!r}")
    number = value
    if want is float and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(name, f"{name} must be a number, not {value!r}")
    if not math.isfinite(number):
        raise ConfigError(name, f"{name} must be a finite number, not {value!r}")
    if want is int:
        if number != int(number):
            raise ConfigError(name, f"{name} must be a whole number, not {value!r}")
        return int(number)
    return float(number)


def load_config(path: Optional[str], overrides: dict[str, Any]) -> TrainConfig:
    """Defaults < YAML file < CLI overrides (None means 'not given on the command line').

    An invalid value from the file is reported with the file's name."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise EdgeloraError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f"{path}:{line + 1}" if line is not None else path
            raise EdgeloraError(f"{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
        except (UnicodeDecodeError, RecursionError) as e:
            raise EdgeloraError(f"{path}: unreadable config ({type(e).__name__}: {e})") from None
        if not isinstance(loaded, dict):
            raise EdgeloraError(f"{path}: a config must be a mapping of keys to values")
        for key, value in loaded.items():
            k = str(key).replace("-", "_")
            if k not in FIELDS:
                raise EdgeloraError(f"{path}: unknown key '{key}' (known: {', '.join(sorted(FIELDS - {'extra'}))})")
            values[k] = value
    from_file = set(values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    from_file -= {k for k, v in overrides.items() if v is not None}
    unknown = set(values) - FIELDS
    if unknown:
        raise EdgeloraError(f"unknown option(s): {', '.join(sorted(unknown))}")
    try:
        return TrainConfig(**values).resolved()
    except ConfigError as e:
        raise EdgeloraError(f"{path}: {e}" if e.field in from_file else str(e)) from None


def save_config(cfg: TrainConfig, path: Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
