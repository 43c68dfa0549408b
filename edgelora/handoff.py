"""What one stage hands the next: train's run summary, export's manifest, bench's report.

Each is a JSON file that a later command (perhaps a later edgelora) reads back: summary.json in
the run directory, manifest.json beside the exported GGUFs, report.json in the bench folder.
Each holds `edgelora_schema`, the version of its layout (files from before the key are layout
1); reading one checks that version and the keys its reader needs, and says in one line which
file is damaged, or written by a newer edgelora. Keys added later get defaults here, so a run
trained by an older edgelora still exports.

An export's files are known by their role: `Role("merged", "q4_k_m")` is written "merged:q4_k_m",
`Role("lora")` "lora" (base:QUANT for the bare base beside a LoRA GGUF).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import EdgeloraError
from .files import atomic_write_json, read_json

SCHEMA_KEY = "edgelora_schema"
LAYOUT = 1
SUMMARY_FILE, MANIFEST_FILE, REPORT_FILE = "summary.json", "manifest.json", "report.json"
MERGED, BASE, LORA = "merged", "base", "lora"  # the kinds of exported file


@dataclass(frozen=True)
class Role:
    """Which file of an export: the merged model or the bare base at a quant, or the LoRA GGUF."""

    kind: str  # MERGED | BASE | LORA
    quant: Optional[str] = None  # none for the LoRA GGUF (always f16)

    @classmethod
    def parse(cls, text: str) -> "Role":
        kind, _, quant = str(text).partition(":")
        return cls(kind, quant or None)

    def __str__(self) -> str:
        return f"{self.kind}:{self.quant}" if self.quant else self.kind


@dataclass
class RunSummary:
    """summary.json: what was trained, on what, and how it went."""

    base: str  # --base as given
    base_sha256: str  # of the base's files: export checks the base is still the one trained on
    base_path: str = ""
    base_hf_dir: str = ""  # the base as an HF folder (a GGUF base dequantised into the cache)
    data: str = ""
    data_format: str = ""
    method: str = ""  # qlora | lora
    dora: bool = False
    rslora: bool = False
    rank: int = 0
    alpha: float = 0.0
    targets: str = ""
    device: str = ""  # machine.DEVICES' name
    compute_dtype: str = ""
    grad_checkpointing: Optional[bool] = None
    world_size: int = 1
    fsdp: bool = False
    trainable_params: int = 0
    total_params: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    truncated_examples: int = 0
    dropped_examples: int = 0
    json_schema: Optional[str] = None  # the schema file in the run directory, where answers are JSON
    steps: int = 0
    final_loss: float = float("nan")
    first_eval_loss: Optional[float] = None
    final_eval_loss: Optional[float] = None
    mean_tokens_per_s: Optional[float] = None
    peak_mem_mb: float = 0.0
    wall_time_s: float = 0.0
    versions: dict = field(default_factory=dict)  # package -> version

    def write(self, run_dir: Path) -> None:
        atomic_write_json(Path(run_dir) / SUMMARY_FILE, {SCHEMA_KEY: LAYOUT, **dataclasses.asdict(self)})

    @classmethod
    def read(cls, run_dir: Path | str) -> "RunSummary":
        path = Path(run_dir) / SUMMARY_FILE
        data = read_versioned(path, "run summary", ("base", "base_sha256"))
        hints = typing.get_type_hints(cls)
        values = {k: v for k, v in data.items() if k in hints}
        for name, value in values.items():
            if not _fits(value, hints[name]):
                raise EdgeloraError(f"{path}: damaged run summary ('{name}' is {value!r})")
        return cls(**values)


_JSON_KINDS = {str: str, bool: bool, int: int, float: (int, float), dict: dict}


def _fits(value, hint) -> bool:
    """Whether `value` read from JSON can be a field typed `hint` (int, float, str, bool, dict or
    Optional[...] of one): numbers are numbers (an int is not a bool), text is text."""
    optional = typing.get_origin(hint) is typing.Union
    if value is None:
        return optional
    want = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
    return isinstance(value, _JSON_KINDS[want]) and (want is bool or not isinstance(value, bool))


def read_versioned(path: Path, what: str, required: tuple[str, ...] = ()) -> dict:
    """`path`'s JSON object with the `required` keys, of a layout this edgelora reads: else one
    line naming the file."""
    data = read_json(path, what, required)
    layout = data.get(SCHEMA_KEY, 1)
    if not isinstance(layout, int) or isinstance(layout, bool) or layout < 1:
        raise EdgeloraError(f"{path}: damaged {what} ({SCHEMA_KEY} is {layout!r})")
    if layout > LAYOUT:
        raise EdgeloraError(f"{path}: written by a newer edgelora (layout {layout}; this one reads up to {LAYOUT}); "
                            "upgrade edgelora")
    return data


def stamped(obj: dict) -> dict:
    """`obj` with the layout version first, as every hand-off file is written."""
    return {SCHEMA_KEY: LAYOUT, **obj}


def read_manifest(folder: Path) -> dict:
    """An export folder's manifest.json: its inputs and outputs (each output's role as written)."""
    return read_versioned(Path(folder) / MANIFEST_FILE, "export manifest", ("inputs", "outputs"))


def outputs_by_role(manifest: dict) -> dict[Role, dict]:
    """{Role: output entry} of a manifest read by read_manifest."""
    return {Role.parse(o["role"]): o for o in manifest["outputs"]}


def read_report(folder: Path) -> dict:
    """A bench folder's report.json: its rows, reference and recommendation."""
    return read_versioned(Path(folder) / REPORT_FILE, "bench report", ("rows",))
