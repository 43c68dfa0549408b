"""Importance matrices: how much each input column of each weight matters, measured on your data.

For every weight llama.cpp quantises (the `blk.*` matrices), the sum over calibration tokens of
each input column's squared activation, and the token count: what llama.cpp's imatrix tool
collects (tools/imatrix), here measured on the fine-tuned model (base + adapter merged: the
merged f16 GGUF) running the run's own training examples, rendered exactly as in training, by
llama.cpp's own forward pass (`compute_gguf`, through the eval callback llama-imatrix uses; the
float32 torch computation `compute` is the reference it is tested against). llama.cpp's quantiser
then spends its rounding error where activations are small.

Export weights the tokens (`--imatrix-decision-weight A`, default 100; 0 counts every token
once, as llama.cpp's tool does): a token that comes before an answer token counts 1 + A x the
model's entropy over that answer token. The columns that carry the fine-tuned model's uncertain
decisions (is this contact remote, which field comes next) weigh most; the prompt and the
answer's predictable tokens least (benchmarks/quant_quality.py --decision-weight 100: q2_k scored
0.906 on the records task against 0.871 unweighted, f16 0.979; on the extract task 0.878 against
0.872).

Files are llama.cpp's own format, so `llama-quantize --imatrix` takes ours and we take theirs:
a GGUF with general.type = imatrix, `<tensor>.in_sum2` (F32, [n_mat, n_cols]) and `<tensor>.counts`
(F32, [n_mat, 1]) per weight, imatrix.datasets / chunk_count / chunk_size; or the legacy .dat.
Reading, checking, computing one with llama.cpp and handing it to the quantiser need no torch; `compute` does.
"""
from __future__ import annotations

import ctypes
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .data import IGNORE
from .errors import EdgeloraError
from .files import atomic_path

KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE = "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"
KEY_DECISION_WEIGHT = "edgelora.imatrix.decision_weight"  # ours: llama.cpp's reader ignores it
DEFAULT_TOKENS = 32768
DECISION_WEIGHT = 100.0  # export's default: tokens before uncertain answer tokens weigh most (see compute)


@dataclass
class IMatrix:
    """Per weight name: sums of squared activations, shape (n_mat, n_cols), and token counts (n_mat,)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    decision_weight: float = 0.0  # how much more the tokens before an uncertain answer token counted (compute)
    origin: str = "computed"  # the file it was read from, for messages

    def importance(self, name: str) -> np.ndarray:
        """The flat float32 vector the quantiser takes for `name`: each expert's sums / its count,
        1 where an expert saw no token (as llama-quantize does)."""
        sums, counts = self.sums[name], self.counts[name]
        mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], 1.0)
        return np.ascontiguousarray(mean, dtype=np.float32).reshape(-1)

    def only(self, names) -> "IMatrix":
        """This matrix for `names` alone: the quantiser treats every other weight as if it had none."""
        wanted = set(names)
        keep = [n for n in self.sums if n in wanted]
        return IMatrix({n: self.sums[n] for n in keep}, {n: self.counts[n] for n in keep}, self.datasets,
                       self.chunk_count, self.chunk_size, self.decision_weight, self.origin)


# ---------------------------------------------------------------- files

def write(imatrix: IMatrix, path: Path | str, arch: str) -> Path:
    """Write `imatrix` as llama.cpp's GGUF imatrix file (atomically); `arch` is recorded too."""
    import gguf

    path = Path(path)
    with atomic_path(path, suffix=".gguf") as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, imatrix.datasets)
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        if imatrix.decision_weight:
            writer.add_float32(KEY_DECISION_WEIGHT, imatrix.decision_weight)
        for name in sorted(imatrix.sums):
            writer.add_tensor(name + SUMS, imatrix.sums[name].astype(np.float32))
            writer.add_tensor(name + COUNTS, imatrix.counts[name].astype(np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read(path: Path | str) -> IMatrix:
    """A llama.cpp importance matrix, GGUF or legacy .dat; one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise EdgeloraError(f"imatrix {path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    try:
        imatrix = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
        imatrix.origin = str(path)
        return imatrix
    except EdgeloraError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways
        raise EdgeloraError(f"imatrix {path}: damaged or not an imatrix file ({type(e).__name__}: {e})") from None


def _read_gguf(path: Path) -> IMatrix:
    import gguf

    from .gguf_info import read_gguf

    reader = read_gguf(path)

    def value(key, default):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    kind = value(gguf.Keys.General.TYPE, None)
    if kind != "imatrix":
        raise EdgeloraError(f"imatrix {path}: a GGUF, but not an importance matrix (general.type is {kind!r})")
    tensors = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors}
    sums, counts = {}, {}
    for name, data in tensors.items():
        if name.endswith(SUMS):
            base = name[:-len(SUMS)]
            if base + COUNTS not in tensors:
                raise EdgeloraError(f"imatrix {path}: {base} has sums but no counts")
            counts[base] = tensors[base + COUNTS].reshape(-1)
            sums[base] = data.reshape(len(counts[base]), -1)
    if not sums:
        raise EdgeloraError(f"imatrix {path}: no entries")
    return IMatrix(sums, counts, list(value(KEY_DATASETS, [])), int(value(KEY_CHUNK_COUNT, 0)),
                   int(value(KEY_CHUNK_SIZE, 0)), float(value(KEY_DECISION_WEIGHT, 0.0)))


def _read_dat(path: Path) -> IMatrix:
    """The legacy format: n_entries, then per entry name length, name, ncall, nval, nval floats
    holding (sum / count) * ncall; optionally the chunk count and a dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return out

    (n_entries,) = take("i")
    if not 0 < n_entries < 1 << 20:
        raise EdgeloraError(f"imatrix {path}: not an importance matrix (neither GGUF nor a legacy .dat)")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = take("i")
        name = data[pos:pos + length].decode("utf-8")
        pos += length
        ncall, nval = take("ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise EdgeloraError(f"imatrix {path}: entry {name} is cut off")
        sums[name] = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32).reshape(1, -1)
        counts[name] = np.array([ncall], dtype=np.float32)
        pos += 4 * nval
    chunks, datasets = 0, []
    if pos + 8 <= len(data):
        chunks, length = take("ii")
        datasets = [data[pos:pos + length].decode("utf-8", "replace")] if length > 0 else []
    return IMatrix(sums, counts, datasets, chunks, 0)


# ---------------------------------------------------------------- checking, and handing it to llama.cpp

def check(imatrix: IMatrix, source: dict) -> None:
    """Every entry must name a weight of `source` (inspect_gguf's summary of the model to quantise),
    with one value per input column (per expert), finite and >= 0: else one line naming the tensor.
    Weights without an entry are quantised without one, as llama.cpp does."""
    where = imatrix.origin
    shapes = {t["name"]: t["shape"] for t in source["tensors"] if len(t["shape"]) >= 2}
    for name, sums in imatrix.sums.items():
        if name not in shapes:
            raise EdgeloraError(f"imatrix {where}: '{name}' is not a weight of {source['path']} "
                                "(an imatrix made for another model?)")
        shape = shapes[name]
        want = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if sums.size != want:
            raise EdgeloraError(f"imatrix {where}: '{name}' has {sums.size} values, the tensor needs {want} "
                                f"(one per input column; shape {shape})")
        if not (np.isfinite(sums).all() and np.isfinite(imatrix.counts[name]).all()):
            raise EdgeloraError(f"imatrix {where}: '{name}' holds NaN or infinite values")
        if (sums < 0).any() or (imatrix.counts[name] < 0).any():
            raise EdgeloraError(f"imatrix {where}: '{name}' holds negative values (sums of squares cannot be)")


def quantizer_array(imatrix: IMatrix) -> tuple[ctypes.Array, list]:
    """The NULL-terminated llama_model_imatrix_data array for llama_model_quantize_params.imatrix,
    and the buffers it points into (keep both referenced until the quantiser returns)."""
    import llama_cpp

    _check_struct_layout()
    keep, entries = [], []
    for name in sorted(imatrix.sums):
        values = imatrix.importance(name)
        keep.append(values)
        entries.append(llama_cpp.llama_model_imatrix_data(
            name.encode(), values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size))
    entries.append(llama_cpp.llama_model_imatrix_data(None, None, 0))
    return (llama_cpp.llama_model_imatrix_data * len(entries))(*entries), keep


def _check_struct_layout() -> None:
    """The quantiser reads the array through llama-cpp-python's ctypes mirror of llama.h: refuse
    to pass it if the installed version's mirror is not the layout this code was written for."""
    import llama_cpp

    from .llamacpp import NEEDS_PIN, PINNED

    data = getattr(llama_cpp, "llama_model_imatrix_data", None)
    params = dict(getattr(llama_cpp.llama_model_quantize_params, "_fields_", []))
    want = [("name", ctypes.c_char_p), ("data", ctypes.POINTER(ctypes.c_float)), ("size", ctypes.c_size_t)]
    if data is None or list(data._fields_) != want or params.get("imatrix") is not ctypes.POINTER(data):
        raise EdgeloraError("the installed llama-cpp-python passes importance matrices differently from "
                            f"the {PINNED} this was written for (it is {llama_cpp.__version__}); "
                            f"export with --imatrix none; {NEEDS_PIN}")


# ---------------------------------------------------------------- computing one (torch)

def compute(model_dir: Path, adapter_dir: Optional[Path], token_ids: list[list[int]], *, datasets: list[str],
            chunk_size: int, labels: Optional[list[list[int]]] = None, decision_weight: float = 0.0,
            batch_size: int = 8, progress: Optional[Callable[[int, int], None]] = None) -> IMatrix:
    """Run `token_ids` (the calibration sequences, as training saw them) through the model with the
    adapter merged, collecting every blk.* weight's input sums of squares at every real token.

    With `labels` (per sequence, -100 where a token is not part of an answer) and `decision_weight`
    a > 0, a token's squares count 1 + a*H times, H being the model's entropy (nats) over the next
    token where that next token is an answer, 0 elsewhere: the positions where the fine-tuned model
    decides something (true or false, which field comes next) weigh most, the prompt and the
    answer's predictable tokens least. Counts stay token counts, as llama.cpp's reader expects; the
    weighting scales every weight's sums alike, so only the columns' relative importance changes.
    Each batch runs twice then: once for the entropies, once measured."""
    import torch

    from .converters.hf_to_gguf import HFModel
    from .hf_model import load_with_adapter

    weighted = labels is not None and decision_weight > 0
    gguf_names = HFModel(model_dir).gguf_names  # HF tensor name -> GGUF tensor name
    model = load_with_adapter(model_dir, adapter_dir, merged=True)  # the weights the merged GGUF holds
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    measuring: list[tuple] = []  # the batch's (real-token mask, token weights or None: every token once)

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            if not measuring:  # the entropy pass
                return
            mask, weight = measuring[0]
            x = inputs[0][mask].double()  # (real tokens, n_cols)
            squares = x * x if weight is None else x * x * weight[mask][:, None]
            sums[name] = sums.get(name, 0) + squares.sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = [m.register_forward_hook(hook_for(gguf_names[f"{n}.weight"])) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and gguf_names.get(f"{n}.weight", "").startswith("blk.")]
    if not hooks:
        raise EdgeloraError(f"{model_dir}: no blk.* weights found to measure")
    body = model.get_decoder()  # no LM head: its output is not needed, and llama.cpp's imatrix skips it too
    head = model.get_output_embeddings()
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))  # batches of similar lengths
    total = sum(map(len, token_ids))
    done = 0
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                width = max(len(token_ids[i]) for i in batch)
                ids = torch.zeros((len(batch), width), dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                deciding = torch.zeros((len(batch), width), dtype=torch.bool)  # the next token is an answer's
                for row, i in enumerate(batch):
                    n = len(token_ids[i])
                    ids[row, :n] = torch.tensor(token_ids[i])
                    attention[row, :n] = 1
                    if weighted:
                        deciding[row, :n - 1] = torch.tensor(labels[i][1:n]) != IGNORE
                weight = None
                if deciding.any():
                    weight = torch.ones((len(batch), width), dtype=torch.float64)
                    hidden = body(input_ids=ids, attention_mask=attention).last_hidden_state[deciding]
                    logp = torch.log_softmax(head(hidden).double(), dim=-1)
                    weight[deciding] += decision_weight * -(logp.exp() * logp).sum(-1)
                measuring[:] = [(attention.bool(), weight)]
                body(input_ids=ids, attention_mask=attention)
                measuring.clear()
                done += int(attention.sum())
                if progress:
                    progress(done, total)
    finally:
        for h in hooks:
            h.remove()
    return IMatrix({n: s.numpy().astype(np.float32)[None, :] for n, s in sums.items()},
                   {n: np.array([c], dtype=np.float32) for n, c in counts.items()},
                   datasets, chunk_count=len(token_ids), chunk_size=chunk_size,
                   decision_weight=decision_weight if weighted else 0.0)


def compute_gguf(model: Path, token_ids: list[list[int]], *, datasets: list[str], chunk_size: int,
                 labels: Optional[list[list[int]]] = None, decision_weight: float = 0.0, device: str = "auto",
                 progress: Optional[Callable[[int, int], None]] = None) -> IMatrix:
    """What `compute` measures, from llama.cpp's own forward pass over the float GGUF `model` (the
    merged f16 export writes): each blk.* weight's input sums of squares at every token, as
    llama-imatrix collects them (llamacpp.WeightInputs), on the GPU where llama.cpp has one. No
    torch, and no float32 copy of the model: the file is mapped as the quantiser maps it.

    Decision weighting as in `compute`, in the same single pass: the squares at the rows whose next
    token is an answer's are kept aside until the batch's logits give the entropies there, then
    added again times a*H (so those rows weigh 1 + a*H, the others 1). Every row's output is
    computed, so that llama.cpp's last layer sees every token. The first tokens every sequence
    shares (a system prompt, an instruction, before any answer) are read once and count once per
    sequence. Sequences are read several to a batch where llama.cpp runs on a GPU (batched_logits)."""
    from .logprobs import log_softmax
    from .llamacpp import WeightInputs, batched_logits
    from .runtime import CTX_STEP, PACKED_CTX, load, reading_sequences

    weighted = labels is not None and decision_weight > 0
    # per sequence, per position: whether the next token is an answer's (the rows decision weighting weighs)
    deciding_at = [np.append(np.asarray(labels[i][1:len(ids)]) != IGNORE, False) if weighted else None
                   for i, ids in enumerate(token_ids)]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    # this batch's: rows seen per weight, the last input squared, the answer-predicting rows, and the
    # squares there of each distinct input with the weights it fed (until the entropies are known)
    batch = {"seen": {}, "last": None, "deciding": np.zeros(0, dtype=int), "aside": [], "entropies": [], "times": 1}

    def on_input(name: str, x: np.ndarray) -> None:
        start = batch["seen"].get(name, 0)
        batch["seen"][name] = start + len(x)
        last = batch["last"]
        if last is None or last[0] is not x or last[1] != start:  # q/k/v (gate/up) share x: square it once
            squares = x.astype(np.float64) ** 2
            batch["last"] = last = (x, start, squares.sum(0) * batch["times"], [])
            deciding = batch["deciding"]
            at = np.flatnonzero((deciding >= start) & (deciding < start + len(x)))  # which of the batch's
            if len(at):
                batch["aside"].append((at, squares[deciding[at] - start].astype(np.float32), last[3]))
        last[3].append(name)
        sums[name] = sums.get(name, 0) + last[2]
        counts[name] = counts.get(name, 0) + len(x) * batch["times"]

    def add_decisions() -> None:  # the batch just read: its answer-predicting rows again, times a*H
        if batch["aside"]:
            extra = decision_weight * np.concatenate(batch["entropies"])  # per answer-predicting row, in order
            for at, squares, names in batch["aside"]:
                weighted_sum = extra[at] @ squares
                for name in names:
                    sums[name] = sums[name] + weighted_sum
        batch["aside"], batch["entropies"] = [], []

    total, done = sum(map(len, token_ids)), 0

    def before(parts) -> None:
        nonlocal done
        add_decisions()
        at, rows = 0, []
        for i, first, n in parts:
            if weighted and i is not None:
                rows.append(at + np.flatnonzero(deciding_at[i][first:first + n]))
            at += n
        times = len(token_ids) if parts[0][0] is None else 1  # the tokens every sequence begins with
        batch.update(seen={}, last=None, deciding=np.concatenate(rows) if rows else np.zeros(0, dtype=int), times=times)
        observer.new_batch()
        done += at * times
        if progress:
            progress(done, total)

    observer = WeightInputs(lambda name: name.startswith("blk."), on_input)
    longest = max(map(len, token_ids))
    rt = load(model, device=device, n_ctx=max(-(-longest // CTX_STEP) * CTX_STEP, PACKED_CTX), observe=observer,
              sequences=reading_sequences(device))
    observer.active = True
    try:
        rows = [np.flatnonzero(at) if weighted else [] for at in deciding_at]
        for _, _, logits in batched_logits(rt.llm, token_ids, rows, before, every_output=True):
            if weighted:
                logp = log_softmax(logits).astype(np.float64)
                batch["entropies"].append(-(np.exp(logp) * logp).sum(-1))
        add_decisions()
    finally:
        observer.active = False
        rt.close()
    observer.raise_error()
    if not sums:
        raise EdgeloraError(f"{model}: llama.cpp multiplied no blk.* weight to measure")
    return IMatrix({n: np.asarray(s, dtype=np.float32)[None, :] for n, s in sums.items()},
                   {n: np.array([c], dtype=np.float32) for n, c in counts.items()},
                   datasets, chunk_count=len(token_ids), chunk_size=chunk_size,
                   decision_weight=decision_weight if weighted else 0.0)


def calibration_order(n: int, seed: int = 0) -> list[int]:
    """The fixed-seed shuffled order calibration sequences are taken in (the last ones are the
    least likely to have been used, so a measurement of the result takes those)."""
    import random

    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def calibration_sample(sequences: list[tuple[list[int], list[int]]], budget: int,
                       seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Whole (token ids, labels) sequences, in calibration_order, until `budget` tokens are reached."""
    chosen, n = [], 0
    for i in calibration_order(len(sequences), seed):
        if n >= budget:
            break
        chosen.append(sequences[i])
        n += len(sequences[i][0])
    return chosen


def describe(imatrix: IMatrix) -> str:
    tokens = max((int(c.max()) for c in imatrix.counts.values()), default=0)
    return f"{len(imatrix.sums)} weights, {tokens:,} tokens, {math.ceil(imatrix.chunk_count)} sequences"
