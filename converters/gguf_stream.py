"""Write a GGUF file tensor by tensor, atomically.

gguf-py's GGUFWriter normally holds every tensor until `write_tensors_to_file`. Here the
header, the metadata and the tensor infos (names, shapes, types: all known before any data
is read) go out first, then each tensor is produced, written and dropped in turn.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from edgelora.io import atomic_path

from . import ConvertError

QType = gguf.GGMLQuantizationType

# qtype -> (bytes per element, how a float tensor becomes the numpy array written)
_ENCODINGS: dict[QType, tuple[int, Callable[[torch.Tensor], np.ndarray]]] = {
    QType.F32: (4, lambda t: t.to(torch.float32).numpy()),
    QType.F16: (2, lambda t: t.to(torch.float16).numpy()),
    QType.BF16: (2, lambda t: t.to(torch.bfloat16).view(torch.int16).numpy()),
}

# Room for the metadata (vocabulary, merges, chat template) on top of the tensor data.
METADATA_ALLOWANCE = 64 << 20


@dataclass
class TensorJob:
    """One output tensor: its GGUF name, shape (HF/torch order) and type, and how to make it."""

    name: str
    shape: tuple[int, ...]
    qtype: QType
    make: Callable[[], torch.Tensor]

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
    check_free_space(out_path, total + METADATA_ALLOWANCE)
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
                tensor = job.make()
                if tuple(tensor.shape) != job.shape:
                    raise ConvertError(f"tensor {job.name}: shape {list(tensor.shape)} is not the announced "
                                       f"{list(job.shape)}")
                writer.write_tensor_data(_ENCODINGS[job.qtype][1](tensor.contiguous()))
                del tensor
                done += job.nbytes
                if progress is not None:
                    progress(done, total)
        finally:
            writer.close()
    return {"tensors": len(jobs), "bytes": out_path.stat().st_size, "arch": arch_name}


def check_free_space(out_path: Path, needed: int) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_path.parent).free
    if free < needed:
        raise ConvertError(f"{out_path}: not enough disk space ({free >> 20} MiB free, "
                           f"about {needed >> 20} MiB needed)")
