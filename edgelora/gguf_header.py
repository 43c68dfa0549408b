"""A GGUF file's header read with the standard library and numpy: its metadata (what `run`,
`chat`, `serve` and `bench` need before llama.cpp opens a file: its type, chat template,
architecture) and its tensors' names, types, shapes and places (what the export's quantiser,
search and size budget need), every length checked against the file: a header from elsewhere
is untrusted input.

Not gguf.GGUFReader (edgelora.gguf_info.read_gguf, which the doctor and the importance matrix
use): it builds an object for every item of every array first, 1.5 s for SmolLM2's 49,152-token
vocabulary against 0.01 s here, and the export opens a file's header some twenty times. Here an
array of more than ARRAY_ITEMS items (a vocabulary, its merges and scores) is skipped, its
length kept.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as T

from .errors import EdgeloraError

_SCALAR = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i", T.FLOAT32: "f",
           T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}  # struct codes
ARRAY_ITEMS = 1024  # an array longer than this is skipped (LongArray): a vocabulary, not a card's tags
_ALIGNMENT = "general.alignment"
# numpy's item type for the tensor types it has; every other type's data is its bytes, row by row (as gguf-py)
_NUMPY = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
          GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
          GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64}


class LongArray:
    """A metadata array too long to read here: its length only."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"LongArray({self.n})"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # llama.cpp's order: the row length first
    tensor_type: GGMLQuantizationType
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    layout: "GGUFLayout" = field(repr=False, compare=False)

    @property
    def data(self) -> np.ndarray:
        """The tensor's data mapped read-only, shaped as gguf-py's GGUFReader shapes it (numpy's
        order; a quantised type's rows as bytes)."""
        dims = tuple(reversed(self.shape))
        item = _NUMPY.get(self.tensor_type)
        if item is None:
            block, size = GGML_QUANT_SIZES[self.tensor_type]
            item, dims = np.uint8, (*dims[:-1], dims[-1] // block * size)
        count = self.n_bytes // np.dtype(item).itemsize
        return np.frombuffer(self.layout.mapped(), item, count, self.data_offset).reshape(dims)


@dataclass
class GGUFLayout:
    path: Path
    fields: dict  # key -> value: a number, a string, a list, or a LongArray
    tensors: list[TensorInfo]
    metadata_end: int = 0  # where the metadata ends and the tensor infos begin (byte offset)
    scalar_at: dict = field(default_factory=dict, repr=False)  # key of a number -> (its value type, its byte offset)
    _map: Optional[np.memmap] = field(default=None, repr=False)

    def mapped(self) -> np.memmap:
        if self._map is None:
            self._map = np.memmap(self.path, mode="r")
        return self._map


class _Cursor:
    """Reads a GGUF header from a mapped file, every length checked against what is left of it:
    a damaged or hostile header must not make this allocate gigabytes or loop for ever."""

    def __init__(self, buf, named: str):
        self.buf, self.at, self.named = buf, 0, named

    def fail(self, why: str = "") -> EdgeloraError:
        return EdgeloraError(f"{self.named}: truncated or corrupt GGUF header{why}")

    def read(self, fmt: str) -> tuple:
        fmt = "<" + fmt
        values = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return values

    def length(self, n: int, item_bytes: int = 1) -> int:
        if n * item_bytes > len(self.buf) - self.at:
            raise self.fail(f" (a length of {n:,} at byte {self.at:,} runs past the end of the "
                            f"{len(self.buf):,}-byte file)")
        return n

    def string(self) -> str:
        n = self.length(self.read("Q")[0])
        self.at += n
        return self.buf[self.at - n:self.at].decode("utf-8", "replace")

    def value(self, vtype: int):
        if vtype == T.STRING:
            return self.string()
        if vtype != T.ARRAY:
            return self.read(_SCALAR[vtype])[0]
        itype, n = self.read("IQ")
        if itype in _SCALAR:
            item = struct.calcsize(_SCALAR[itype])
            self.length(n, item)
            if n > ARRAY_ITEMS:
                self.at += n * item
                return LongArray(n)
            return list(self.read(f"{n}{_SCALAR[itype]}"))
        if n > ARRAY_ITEMS and itype == T.STRING:  # skipped: each item's length, then past it
            self.length(n, 8)
            buf, at, end = self.buf, self.at, len(self.buf)
            for _ in range(n):
                at += 8 + struct.unpack_from("<Q", buf, at)[0]
                if at > end:
                    raise self.fail(f" (an array {n:,} items long runs past the end of the {end:,}-byte file)")
            self.at = at
            return LongArray(n)
        return [self.value(itype) for _ in range(self.length(n, 8))]  # a string or array item takes 8 bytes at least


def _parse(path: str | Path, what: str, tensors: bool):
    p = Path(path).expanduser()
    named = f"{what} {p}" if what else str(p)  # what errors call it: "model x.gguf", "LoRA x.gguf"
    if not p.is_file():
        raise EdgeloraError(f"{named}: no such file")
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise EdgeloraError(f"{named}: not a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, named)
            try:
                c.at = 4
                version, n_tensors, n_kv = c.read("IQQ")
                if version not in (2, 3):
                    raise EdgeloraError(f"{named}: GGUF version {version} is not supported (2 or 3)")
                fields, scalar_at = {}, {}
                for _ in range(c.length(n_kv, 12)):  # key length + type
                    key, (vtype,) = c.string(), c.read("I")
                    if vtype in _SCALAR:
                        scalar_at[key] = (T(vtype), c.at)
                    fields[key] = c.value(vtype)
                metadata_end = c.at
                infos = [_tensor_info(c) for _ in range(c.length(n_tensors, 24))] if tensors else []
            except (struct.error, KeyError, ValueError):  # short reads, unknown value or tensor types
                raise c.fail() from None
            size, start = len(buf), c.at
    if not tensors:
        return fields
    alignment = fields.get(_ALIGNMENT, 32)
    if not isinstance(alignment, int) or alignment < 1:
        raise c.fail(f" ({_ALIGNMENT} is {alignment!r})")
    start += -start % alignment
    layout = GGUFLayout(p, fields, [], metadata_end, scalar_at)
    seen = set()
    for name, shape, qtype, offset in infos:
        n_elements = int(np.prod(shape, dtype=object))
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_bytes = n_elements // block * type_size
        if name in seen:
            why = "twice"
        elif not shape or shape[0] % block:
            why = f"with rows of {shape[0] if shape else 0} values, not whole {qtype.name} blocks"
        elif start + offset + n_bytes > size:
            why = "past the end of the file"
        else:
            seen.add(name)
            layout.tensors.append(TensorInfo(name, shape, qtype, n_elements, n_bytes, start + offset, layout))
            continue
        raise EdgeloraError(f"{named}: truncated or corrupt GGUF (tensor {name} {why})")
    return layout


def _tensor_info(c: _Cursor) -> tuple:
    name = c.string()
    (n_dims,) = c.read("I")
    if n_dims > 8:
        raise c.fail(f" (tensor {name} has {n_dims} dimensions)")
    shape = tuple(c.read(f"{n_dims}Q"))
    qtype, offset = c.read("IQ")
    return name, shape, GGMLQuantizationType(qtype), offset


def gguf_metadata(path: str | Path, what: str = "model") -> dict:
    """The metadata of a GGUF file (arrays of more than ARRAY_ITEMS items as LongArray), read
    before llama.cpp sees the file; a one-line EdgeloraError naming it if it is missing, not
    GGUF, or has a cut-off header."""
    return _parse(path, what, tensors=False)


def gguf_layout(path: str | Path, what: str = "") -> GGUFLayout:
    """gguf_metadata and every tensor's name, type, shape and place, checked to lie within the file;
    errors name the file (after `what`, if given)."""
    return _parse(path, what, tensors=True)


def later_layers_header(layout: GGUFLayout, first: int) -> tuple[bytes, list[TensorInfo]]:
    """The header of the model made of `layout`'s blocks from layer `first` on, renumbered from 0,
    and every tensor outside the blocks: the same metadata with the block count lowered to match;
    and the tensors whose data follow it, in the order written (each padded to the alignment).
    llama.cpp runs it as the rest of the whole model's forward pass, given the input of layer
    `first` as embeddings."""
    arch = layout.fields.get("general.architecture")
    count = f"{arch}.block_count"
    n_layers = layout.fields.get(count)
    if count not in layout.scalar_at or not isinstance(n_layers, int) or not 0 < first < n_layers:
        raise EdgeloraError(f"{layout.path.name}: no layers from {first} on to keep ({count} is {n_layers!r})")
    with open(layout.path, "rb") as f:
        head = bytearray(f.read(layout.metadata_end))
    kept = []  # (tensor, its name in the smaller model)
    for t in layout.tensors:
        parts = t.name.split(".", 2)
        if parts[0] != "blk":
            kept.append((t, t.name))
        elif int(parts[1]) >= first:
            kept.append((t, f"blk.{int(parts[1]) - first}.{parts[2]}"))
    vtype, at = layout.scalar_at[count]
    struct.pack_into("<Q", head, 8, len(kept))  # after the magic and the version: the tensor count
    struct.pack_into("<" + _SCALAR[vtype], head, at, n_layers - first)
    alignment, offset = layout.fields.get(_ALIGNMENT, 32), 0
    for t, name in kept:
        encoded = name.encode()
        head += struct.pack(f"<Q{len(encoded)}sI{len(t.shape)}QIQ", len(encoded), encoded, len(t.shape), *t.shape,
                            int(t.tensor_type), offset)
        offset += t.n_bytes + -t.n_bytes % alignment
    head += bytes(-len(head) % alignment)
    return bytes(head), [t for t, _ in kept]
