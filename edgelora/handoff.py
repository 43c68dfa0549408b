"""What one stage hands the next: train's run summary, export's manifest, bench's report.

Each is a JSON file that a later command (perhaps a later edgelora) reads back: summary.json in
the run directory, manifest.json beside the exported GGUFs, report.json in the bench folder.
Each holds `edgelora_schema`, the version of its layout (files from before the key are layout
1); reading one checks that version and the keys its reader needs, and says in one line which
file is damaged, or written by a newer edgelora. Keys added later get defaults here, so a run
trained by an older edgelora still exports.

Each is a dataclass here -- RunSummary; ExportManifest and its ExportedFile outputs; BenchReport
and its BenchRow rows -- so stages pass fields, not string keys. An export's files are known by
their role: `Role("merged", "q4_k_m")` is written "merged:q4_k_m", `Role("lora")` "lora"
(base:QUANT for the bare base beside a LoRA GGUF; refit:QUANT for a LoRA GGUF refitted against
base:QUANT, edgelora.refit, and refit-merged:QUANT for it merged and quantised as base:QUANT).
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
MERGED, BASE, LORA, REFIT, REFIT_MERGED = "merged", "base", "lora", "refit", "refit-merged"  # kinds of exported file


@dataclass(frozen=True)
class Role:
    """Which file of an export: the merged model or the bare base at a quant, or the LoRA GGUF."""

    kind: str  # MERGED | BASE | LORA | REFIT (a LoRA GGUF refitted against the base at `quant`) | REFIT_MERGED
    # (that LoRA merged into the base's weights and quantised again to the base file's types)
    quant: Optional[str] = None  # none for the LoRA GGUF (always f16)

    @classmethod
    def parse(cls, text: str) -> "Role":
        kind, _, quant = str(text).partition(":")
        return cls(kind, quant or None)

    def __str__(self) -> str:
        return f"{self.kind}:{self.quant}" if self.quant else self.kind


def finished_run(folder: Path | str) -> bool:
    """Whether `folder` is a finished edgelora run: its adapter (PEFT's files) and its summary.json."""
    return (Path(folder) / "adapter" / "adapter_config.json").is_file() and (Path(folder) / SUMMARY_FILE).is_file()


@dataclass
class RunSummary:
    """summary.json: what was trained, on what, and how it went."""

    base: str  # --base as given
    base_sha256: str  # of the base's files: export checks the base is still the one trained on
    base_path: str = ""
    base_hf_dir: str = ""  # the base as an HF folder (a GGUF base dequantised into the cache)
    data: str = ""
    data_format: str = ""
    seq_len: int = 0  # what export tokenises the data with, as training did (0: a run from before it was recorded)
    seed: int = 0
    held_out: float = 0.0  # the share of --data kept out of training for eval (0 with --eval-data)
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
        return _typed(cls, read_versioned(path, "run summary", ("base", "base_sha256")), f"{path}: damaged run summary")


@dataclass
class ExportedFile:
    """One file an export wrote: an entry of manifest.json's `outputs`."""

    role: Role
    file: str  # its name in the export folder
    sha256: str
    size_bytes: int
    bpw: float  # real bits per weight, whatever the preset's name says
    quant: str  # the preset it was made with (f16 for the LoRA GGUF)
    file_type: Optional[str] = None  # general.file_type's name
    tensor_types: dict = field(default_factory=dict)  # llama.cpp type -> how many tensors
    class_types: dict = field(default_factory=dict)  # kind of weight (attn_q, ...) -> {type: how many}
    imatrix: bool = False  # quantised with the importance matrix (for some weights at least)
    imatrix_check: Optional[dict] = None  # KLs and answers kept with and without it, and which file was kept
    fallbacks: Optional[dict] = None  # weights whose rows a K-quant could not take: count, by_type
    refit: Optional[dict] = None  # a refitted LoRA GGUF: its steps, seconds, losses (edgelora.refit.refit), checks

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "role": str(self.role)}


@dataclass
class BaseInput:
    """manifest.json's inputs.base: the base model an export read."""

    spec: str  # --base as given (or the run's)
    kind: str  # gguf | hf
    path: str
    sha256: str


@dataclass
class AdapterInput:
    """manifest.json's inputs.adapter: the run's adapter an export merged or converted."""

    path: str
    sha256: Optional[str] = None


@dataclass
class ExportManifest:
    """manifest.json: what an export read, what it wrote, and what it measured on the way."""

    name: str  # the model's name in its files
    base: BaseInput
    adapter: Optional[AdapterInput]  # None for a plain conversion
    outputs: list[ExportedFile] = field(metadata={"item": "output"})
    card: dict = field(default_factory=dict)  # the model card written into the merged files
    effort: Optional[str] = None  # --effort: how much was measured before each quantised file was kept
    checks: Optional[list] = None  # edgelora.verify's checks; None when not verified
    imatrix: Optional[dict] = None  # the importance matrix used: file, sha256, computed, datasets, ...
    json_schema: Optional[dict] = None  # the run's answer schema, copied beside the files
    budget: Optional[dict] = None  # what the budgeted (auto) file's choice measured
    seconds: dict = field(default_factory=dict)  # per stage of the export, and the total (edgelora.stages)
    peak_rss_mb: dict = field(default_factory=dict)  # the process's peak RSS when each stage last ended
    peak_rise_mb: dict = field(default_factory=dict)  # how far that peak rose while each stage ran (edgelora.stages)
    versions: dict = field(default_factory=dict)

    def outputs_by_role(self) -> dict[Role, ExportedFile]:
        return {o.role: o for o in self.outputs}

    def write(self, folder: Path) -> Path:
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "base", "adapter", "outputs")}
        path = Path(folder) / MANIFEST_FILE
        inputs = {"base": dataclasses.asdict(self.base), "adapter": self.adapter and dataclasses.asdict(self.adapter)}
        atomic_write_json(path, stamped({"name": self.name, "inputs": inputs,
                                         "outputs": [o.as_json() for o in self.outputs], **rest}))
        return path

    @classmethod
    def read(cls, folder: Path | str) -> "ExportManifest":
        path = Path(folder) / MANIFEST_FILE
        damaged = f"{path}: damaged export manifest"
        data = read_versioned(path, "export manifest", ("inputs", "outputs"))
        inputs, outputs = data["inputs"], data["outputs"]
        if not isinstance(inputs, dict) or not isinstance(inputs.get("base"), dict) or not isinstance(outputs, list):
            raise EdgeloraError(f"{damaged} (its inputs or outputs are not what an export writes)")
        return _typed(cls, {"name": "", **data, "base": inputs["base"], "adapter": inputs.get("adapter")}, damaged)


@dataclass
class BenchRow:
    """One model the bench measured: a row of report.json."""

    label: str  # q4_k_m, q4_1+lora, hf, a file's name; +grammar for answers held to the JSON schema
    route: str  # merged | lora (base GGUF + LoRA GGUF) | file | hf (HF base + adapter in torch)
    model: str  # the GGUF; for hf, the base
    size_bytes: int
    bpw: float  # real bits per weight (with the LoRA GGUF, for the lora route)
    task_score: float  # the share of greedy answers right, by the report's score
    perplexity: float  # of the reference answers
    kl: float  # mean KL(reference || this) over every answer token
    top1: float  # the share of answer tokens where this and the reference rank the same token first
    loras: list = field(default_factory=list)  # LoRA GGUFs; for hf, the adapter folder
    reference: bool = False  # the row the others' KL and top-1 are measured against
    grammar: bool = False
    notes: list = field(default_factory=list)  # what the file really is, where its name says otherwise
    json_valid: Optional[float] = None  # with the json score: the share of answers that parse
    json_exact: Optional[float] = None  # ... and that equal the reference's JSON
    load_s: float = 0.0
    peak_rss_mb: float = 0.0
    prompt_tok_s: float = 0.0
    gen_tok_s: float = 0.0
    device: str = ""
    answers: list = field(default_factory=list)


@dataclass
class BenchReport:
    """report.json: every row, and the recommendation."""

    eval_data: str
    examples: int
    threshold: float  # the recommendation keeps at least this share of the reference's task score
    settings: dict  # edgelora.bench.Settings: score, pattern, max_tokens, device, threads
    reference: str  # its row's label
    rows: list[BenchRow] = field(metadata={"item": "row"})
    recommendation: dict  # label, model, text
    expected: list = field(default_factory=list)  # the reference answers
    machine: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def row(self, label: str) -> BenchRow:
        return next(r for r in self.rows if r.label == label)

    def as_json(self) -> dict:
        return stamped(dataclasses.asdict(self))

    @classmethod
    def read(cls, folder: Path | str) -> "BenchReport":
        path = Path(folder) / REPORT_FILE
        return _typed(cls, read_versioned(path, "bench report", ("rows",)), f"{path}: damaged bench report")


_JSON_KINDS = {str: str, bool: bool, int: int, float: (int, float), dict: dict, list: list, Role: str}


def _fits(value, hint) -> bool:
    """Whether `value` read from JSON can be a field typed `hint` (int, float, str, bool, dict,
    list, a Role's text, a dataclass's object or Optional[...] of one): numbers are numbers (an
    int is not a bool), text is text."""
    if value is None:
        return typing.get_origin(hint) is typing.Union
    want = typing.get_origin(_inner(hint)) or _inner(hint)  # list[ExportedFile] -> list
    kind = _JSON_KINDS[want] if want in _JSON_KINDS else dict  # a dataclass (BaseInput, ...): its object
    return isinstance(value, kind) and (want is bool or not isinstance(value, bool))


def _inner(hint):
    """Optional[X] -> X; any other hint as it is."""
    if typing.get_origin(hint) is typing.Union:
        return next(t for t in typing.get_args(hint) if t is not type(None))
    return hint


def _typed(cls, data: dict, damaged: str):
    """`cls` from the JSON object `data` (keys it does not know are ignored: a newer edgelora's
    additions), each field's type checked, a list of dataclasses item by item (named by the
    field's "item"): else one line starting with `damaged`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {k: v for k, v in data.items() if k in fields}
    missing = [name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise EdgeloraError(f"{damaged} (no '{missing[0]}')")
    for name, value in values.items():
        if not _fits(value, hints[name]):
            raise EdgeloraError(f"{damaged} ('{name}' is {value!r})")
    if hints.get("role") is Role and "role" in values:
        values["role"] = Role.parse(values["role"])
    for name, f in fields.items():
        item = (typing.get_args(hints[name]) or [None])[0] if typing.get_origin(hints[name]) is list else None
        if dataclasses.is_dataclass(item) and name in values:
            values[name] = [_typed(item, v if isinstance(v, dict) else {}, f"{damaged} ({f.metadata['item']} {i + 1})")
                            for i, v in enumerate(values[name])]
        elif dataclasses.is_dataclass(_inner(hints[name])) and isinstance(values.get(name), dict):
            values[name] = _typed(_inner(hints[name]), values[name], f"{damaged} ({name})")
    return cls(**values)


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


