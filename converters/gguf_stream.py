"""Write a GGUF file tensor by tensor, atomically.

gguf-py's GGUFWriter normally holds every tensor until `write_tensors_to_file`. Here the
header, the metadata and the tensor infos (names, shapes, types: all known before any data
is read) go out first, then each tensor is produced, written and dropped in turn.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable, Iterable

import gguf
import numpy as np
import torch

from edgelora import files
from edgelora.files import atomic_path

from . import ConvertError

QType = gguf.GGMLQuantizationType

# qtype -> (bytes per element, how a float tensor becomes the numpy array written)
_ENCODINGS: dict[QType, tuple[int, Callable[[torch.Tensor], np.ndarray]]] = {
    QType.F32: (4, lambda t: t.to(torch.float32).numpy()),
    QType.F16: (2, lambda t: t.to(torch.float16).numpy()),
    QType.BF16: (2, lambda t: t.to(torch.bfloat16).view(torch.int16).numpy()),
}

# 2-D tensors larger than this as f32 are produced as row blocks of about this size (as f32).
CHUNK_BYTES = 8 << 20

# Room for the metadata (vocabulary, merges, chat template) on top of the tensor data.
METADATA_ALLOWANCE = 64 << 20


@dataclass
class TensorJob:
    """One output tensor: its GGUF name, shape (HF/torch order) and type, and how to make it.

    `make` returns the whole tensor, or an iterable of consecutive row blocks (along dim 0)
    that together make it: each block is encoded and written before the next one is made.
    """

    name: str
    shape: tuple[int, ...]
    qtype: QType
    make: Callable[[], torch.Tensor | Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * _ENCODINGS[self.qtype][0]


def write_gguf(
    out_path: Path,
    arch_name: str,
    add_metadata: Callable[[gguf.GGUFWriter], None],
    jobs: list[TensorJob],
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write `jobs` to `out_path`; `progress(bytes_done, bytes_total)` after each tensor."""
    out_path = Path(out_path)
    if out_path.is_dir():
        raise ConvertError(f"{out_path}: is a directory; give the path of the .gguf file to write")
    total = sum(job.nbytes for job in jobs)
    files.check_free_space(out_path, total + METADATA_ALLOWANCE)
    with atomic_path(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        try:
            add_metadata(writer)
            for job in jobs:
                writer.add_tensor_info(job.name, job.shape, np.float32, job.nbytes, raw_dtype=job.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            done = 0
            for job in jobs:
                _write_job(writer, job)
                done += job.nbytes
                if progress is not None:
                    progress(done, total)
        finally:
            writer.close()
    return {"tensors": len(jobs), "bytes": out_path.stat().st_size, "arch": arch_name}


def writer_internals(writer: gguf.GGUFWriter):
    """(the open file, the tensor infos not yet written) of GGUFWriter: its public API writes a
    tensor from one array in memory, so the streaming write goes through these, and through
    write_padding and WriterState. Checked, so that a gguf-py which changes them stops with one
    clear line instead of a corrupt file (gguf 0.17 to 0.19 are known to work)."""
    try:
        fout, pending = writer.fout[0], writer.tensors[0]
        if not (hasattr(fout, "write") and hasattr(pending, "pop") and callable(writer.write_padding)
                and gguf.gguf_writer.WriterState.WEIGHTS):
            raise TypeError("not a file and a dict")
    except (AttributeError, TypeError, IndexError, KeyError) as e:
        raise ConvertError(f"gguf {_gguf_version()}: GGUFWriter's internals changed ({e}); edgelora's streaming "
                           "writer needs gguf 0.17 to 0.19 (pip install 'gguf<0.20')") from None
    return fout, pending


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _write_job(writer: gguf.GGUFWriter, job: TensorJob) -> None:
    """What GGUFWriter.write_tensor_data does (align, data, pad), one row block at a time."""
    made = job.make()
    blocks = [made] if isinstance(made, torch.Tensor) else made
    encode = _ENCODINGS[job.qtype][1]
    fout, pending = writer_internals(writer)
    info = pending.pop(next(iter(pending)))
    assert info.nbytes == job.nbytes
    writer.write_padding(fout, fout.tell())
    rows, written = 0, 0
    for block in blocks:
        n_rows = block.shape[0] if block.dim() else 1
        if tuple(block.shape[1:]) != job.shape[1:] or rows + n_rows > (job.shape[0] if job.shape else 1):
            raise ConvertError(f"tensor {job.name}: block of shape {list(block.shape)} does not fit the announced "
                               f"{list(job.shape)}")
        array = encode(block.contiguous())
        if sys.byteorder != "little":
            array = array.byteswap()  # GGUF files written here are little-endian
        fout.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        rows += n_rows
        written += array.nbytes
        del block, array
    if rows != (job.shape[0] if job.shape else 1) or written != job.nbytes:
        raise ConvertError(f"tensor {job.name}: made {rows} rows ({written} bytes), not the announced "
                           f"{list(job.shape)}")
    writer.write_padding(fout, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS
