"""Training configuration as data: a typed dataclass, read from YAML, overridden by CLI flags."""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .data import SHAPES
from .errors import EdgeloraError
from .machine import DEVICES, device_name


FORMATS = ("auto", *SHAPES)  # auto: the shape the data itself shows
METHODS = ("auto", "qlora", "lora")


def _arg(default: Any, help: str, *, choices: tuple[str, ...] = (), shown: Optional[str] = None,
         flag: Optional[str] = None, metavar: Optional[str] = None, cli: bool = True):
    """A config field with what `edgelora train --help` says of it: the command's options are built
    from these (edgelora.cli.train_options). `shown`: the default as help states it, where the
    value alone would not say it; `flag`: the option's name where it is not --field-name."""
    meta = dict(help=help, choices=choices, shown=shown, flag=flag, metavar=metavar, cli=cli)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)



def slug(name: str) -> str:
    """`name` as lower-case letters, digits, dots and dashes: what names a run, its files and its model."""
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.") or "model"


def default_run_dir(base: str, data: str) -> Path:
    """runs/BASE-DATA (runs/smollm2-135m-extract for the alias smollm2-135m and extract_train.jsonl):
    a run named for what it is, since its folder names its files and the model in them, which is
    what LM Studio and Ollama list."""
    base_name = re.sub(r"\.gguf$", "", re.split(r"[/\\:]", base.rstrip("/\\"))[-1], flags=re.I)
    data_name = re.sub(r"[-_.](train|training)$", "", Path(data).stem, flags=re.I)
    return Path("runs") / f"{slug(base_name)}-{slug(data_name)}"

@dataclass
class TrainConfig:
    base: str = _arg("smollm2-135m", "Base model: alias (smollm2-135m), HF directory, GGUF file or cached hub id.")
    data: Optional[str] = _arg(None, "Training data, JSONL (chat, instruction or text).")
    out: Optional[str] = _arg(None, "Run directory to write. [default: runs/BASE-DATA, e.g. runs/smollm2-135m-extract: its files and the model in them take that name]")
    data_format: str = _arg("auto", "Data shape.", choices=FORMATS, flag="--format")
    eval_data: Optional[str] = _arg(None, "Held-out JSONL for eval loss.")
    eval_split: float = _arg(0.0, "Hold out this fraction of --data for eval (fixed seed).")
    method: str = _arg("auto", "qlora: 4-bit NF4 base; lora: full-precision base.", choices=METHODS,
                       shown="qlora where bitsandbytes works")
    dora: bool = _arg(False, "Weight-decomposed LoRA.")
    rslora: bool = _arg(False, "Rank-stabilised scaling alpha/sqrt(r).")
    rank: int = _arg(8, "LoRA rank.")
    alpha: Optional[float] = _arg(None, "LoRA alpha.", shown="2 x rank")
    dropout: float = _arg(0.05, "LoRA dropout.")
    targets: str = _arg("all-linear", "attn | all-linear | NAME,NAME.")
    lr: float = _arg(2e-4, "Peak learning rate.", shown="2e-4")
    warmup_steps: Optional[int] = _arg(None, "Linear warm-up steps, then cosine decay.", shown="5% of steps")
    epochs: float = _arg(1.0, "Passes over the data.")
    max_steps: Optional[int] = _arg(None, "Optimizer steps (overrides --epochs).")
    batch_size: int = _arg(4, "Examples per micro-batch.")
    grad_accum: int = _arg(1, "Micro-batches per optimizer step.")
    seq_len: int = _arg(512, "Longest sequence in tokens; longer ones are truncated.")
    seed: int = _arg(0, "Seed for data order, split and init.")
    device: str = _arg("auto", "Where to train (metal: Apple's GPU).", choices=DEVICES)  # older configs' "mps": metal
    grad_checkpointing: Optional[bool] = _arg(None, "Trade compute for memory.",
                                              shown="on only where the activations would not fit --max-memory")
    max_memory: Optional[str] = _arg(None, "Memory training may use, e.g. 8GiB.", metavar="SIZE", shown="what is free")
    fsdp: bool = _arg(False, "Under torchrun / accelerate launch: shard the model over the processes (PyTorch "
                             "FSDP2, a unit per decoder block) instead of a copy in each (DDP), for a model too large "
                             "for one device; LoRA/DoRA (a 4-bit QLoRA base is not sharded).")
    json_schema: bool = _arg(True, "When every answer is JSON, infer its schema into RUN_DIR/schema.json.")
    eval_every: int = _arg(50, "Steps between eval-loss measurements.")
    save_every: int = _arg(100, "Steps between checkpoints.")
    keep_checkpoints: int = _arg(2, "Checkpoints kept, the newest (each holds the adapter and the optimizer state).")
    log_every: int = _arg(1, "Steps between rows of metrics.jsonl.")
    extra: dict = _arg({}, "Reserved for forward compatibility.", cli=False)

    def resolved(self) -> "TrainConfig":
        """Check every value's type and range, fill in derived defaults; returns a new config.

        This is the one place values are checked, before anything is written: a value that
        passes here does not crash a later stage. ConfigError names the field."""
        c = dataclasses.replace(self, **{f: _typed(f, getattr(self, f)) for f in _TYPES})
        if c.alpha is None:
            c.alpha = 2.0 * c.rank
        c.device = device_name(c.device)  # torch's "mps" (older run configs) is our "metal"
        checks = [(f.name, getattr(c, f.name) in f.metadata["choices"], "must be " + _one_of(f.metadata["choices"]))
                  for f in dataclasses.fields(c) if f.metadata["choices"]]
        checks += [
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


def _one_of(choices: tuple[str, ...]) -> str:
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def default_text(f: dataclasses.Field) -> Optional[str]:
    """A field's default as --help states it (None: nothing to state)."""
    if f.metadata.get("shown"):
        return f.metadata["shown"]
    if f.default is None or f.default is dataclasses.MISSING:
        return None
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def _is_size(text: str) -> bool:
    from .sizes import parse_size

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


def field_type(name: str) -> type:
    """Field `name`'s type, Optional[...] unwrapped: int, float, str, bool or dict."""
    want = _TYPES[name]
    if typing.get_origin(want) is typing.Union:
        want = next(t for t in typing.get_args(want) if t is not type(None))
    return want


def _typed(name: str, value: Any) -> Any:
    """`value` as field `name`'s type. Whole numbers stay ints (2.0 -> 2, 2.5 is an error);
    a float field takes numeric strings, as PyYAML reads `1e-4` as a string; floats must be
    finite. Anything else of the wrong type is a ConfigError."""
    if value is None and typing.get_origin(_TYPES[name]) is typing.Union:
        return None  # an Optional field left unset
    want = field_type(name)
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
    from .files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
