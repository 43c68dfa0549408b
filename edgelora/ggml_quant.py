"""What one llama.cpp quantisation type does to one weight tensor, measured with llama.cpp's own code.

Choosing per-tensor types under a size budget needs each candidate's size and error. Both come
from the ggml library that llama-cpp-python ships (ggml_quantize_chunk, the type traits' to_float),
so the numbers are those of the file llama.cpp will write and read, and no torch is needed.
"""

import ctypes
import functools

import gguf
import numpy as np

from .errors import EdgeloraError
from .llamacpp import NEEDS_PIN

# The types ggml_quantize_chunk (ggml/src/ggml.c) quantises; any other makes it abort the process.
QUANTIZABLE = ("F32", "F16", "BF16", "Q1_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "NVFP4",
               "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0", "IQ1_S", "IQ1_M", "IQ2_XXS",
               "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS")
_CHUNK = 1 << 22  # elements quantised at a time by quantization_error: bounds its memory
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _Traits(ctypes.Structure):
    """struct ggml_type_traits, ggml/include/ggml.h of the pinned llama-cpp-python (vendor/llama.cpp)."""
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", _TO_FLOAT), ("from_float_ref", ctypes.c_void_p)]


@functools.cache
def _ggml():
    """libggml-base's quantisation API, bound once per process, its struct layout checked first:
    a mismatch would otherwise read garbage or crash instead of failing."""
    from .llamacpp import shared_library

    lib = shared_library("ggml-base")
    i64, sz, ptr = ctypes.c_int64, ctypes.c_size_t, ctypes.c_void_p
    for name, restype, argtypes in (
            ("ggml_quantize_chunk", sz, [ctypes.c_int, ptr, ptr, i64, i64, i64, ptr]),
            ("ggml_quantize_requires_imatrix", ctypes.c_bool, [ctypes.c_int]),
            ("ggml_row_size", sz, [ctypes.c_int, i64]),
            ("ggml_blck_size", i64, [ctypes.c_int]),
            ("ggml_get_type_traits", ctypes.POINTER(_Traits), [ctypes.c_int])):
        fn = getattr(lib, name, None)
        if fn is None:
            raise EdgeloraError(f"the installed llama-cpp-python's ggml has no {name}; {NEEDS_PIN}")
        fn.restype, fn.argtypes = restype, argtypes
    for qt, want in ((gguf.GGMLQuantizationType.Q8_0, (b"q8_0", 32, 34)),
                     (gguf.GGMLQuantizationType.Q4_K, (b"q4_K", 256, 144))):
        t = lib.ggml_get_type_traits(qt).contents
        got = (t.type_name, t.blck_size, t.type_size)
        if got != want or not t.is_quantized or not t.to_float or lib.ggml_blck_size(qt) != want[1]:
            raise EdgeloraError(f"the installed llama-cpp-python's ggml type traits changed "
                                f"({want[0].decode()} reads as {got}); {NEEDS_PIN}")
    return lib


def _type(qtype: str) -> gguf.GGMLQuantizationType:
    """The ggml type id of a name such as "Q4_K" or "q4_k" (gguf-py's enum mirrors ggml's)."""
    name = str(qtype).upper()
    if name not in QUANTIZABLE:
        raise EdgeloraError(f"unknown quantisation type '{qtype}' (choose from {', '.join(QUANTIZABLE)})")
    return gguf.GGMLQuantizationType[name]


def fits(qtype: str, n_per_row: int) -> bool:
    """Whether rows of n_per_row elements take qtype as they are: llama.cpp quantises whole
    blocks only, and falls back to another type for a tensor whose rows do not fill them."""
    return n_per_row > 0 and n_per_row % _ggml().ggml_blck_size(_type(qtype)) == 0


def quantize_rows(weights: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """The bytes llama.cpp writes for a (rows, n_per_row) float matrix as qtype, as uint8.

    imatrix, one non-negative weight per column, steers the quantiser toward the columns the
    activations make matter (most types use it; the IQ1_S / IQ2_XXS / IQ2_XS quantisers need it).
    Inputs are checked here because ggml aborts the whole process on bad ones."""
    lib, qt = _ggml(), _type(qtype)
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2 or w.size == 0:
        raise EdgeloraError(f"{qt.name}: weights must be a non-empty 2-D matrix, not shape {w.shape}")
    rows, n = w.shape
    if not fits(qt.name, n):
        raise EdgeloraError(f"{qt.name}: a row of {n} elements is not a multiple of the type's "
                            f"block of {lib.ggml_blck_size(qt)}")
    if not np.isfinite(w).all():
        raise EdgeloraError(f"{qt.name}: the weights contain NaN or infinity")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (n,) or not np.isfinite(imatrix).all() or (imatrix < 0).any():
            raise EdgeloraError(f"{qt.name}: the importance vector must hold {n} finite values >= 0 "
                                f"(got shape {imatrix.shape})")
    elif lib.ggml_quantize_requires_imatrix(qt):
        raise EdgeloraError(f"{qt.name} needs an importance matrix (imatrix) to quantise")
    out = np.empty(rows * lib.ggml_row_size(qt, n), dtype=np.uint8)
    done = lib.ggml_quantize_chunk(qt, w.ctypes.data, out.ctypes.data, 0, rows, n,
                                   None if imatrix is None else imatrix.ctypes.data)
    assert done == out.size, (done, out.size)
    return out


def dequantize(buffer, qtype: str, shape: tuple[int, int], threads: int = 1) -> np.ndarray:
    """The float32 (rows, n_per_row) matrix llama.cpp reads back from qtype's bytes (its to_float),
    its rows split between `threads` threads (ctypes lets go of the GIL while ggml runs)."""
    lib, qt = _ggml(), _type(qtype)
    rows, n = shape
    data = np.ascontiguousarray(np.frombuffer(buffer, dtype=np.uint8))
    row_bytes = lib.ggml_row_size(qt, n)
    if not fits(qt.name, n) or data.size != rows * row_bytes:
        raise EdgeloraError(f"{qt.name}: {data.size} bytes do not hold a {rows} x {n} tensor")
    if qt == gguf.GGMLQuantizationType.F32:  # ggml has no to_float for its own float type
        return data.view(np.float32).reshape(rows, n).copy()
    out = np.empty((rows, n), dtype=np.float32)
    to_float = lib.ggml_get_type_traits(qt).contents.to_float

    def part(first: int, last: int) -> None:
        to_float(data.ctypes.data + first * row_bytes, out.ctypes.data + first * n * 4, (last - first) * n)

    bounds = np.linspace(0, rows, min(threads, rows) + 1).astype(int).tolist()
    if len(bounds) > 2:
        list(_pool(len(bounds) - 1).map(part, bounds[:-1], bounds[1:]))
    else:
        part(0, rows)
    return out


@functools.cache
def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(threads, thread_name_prefix="dequantize")


def quantization_error(weights: np.ndarray, qtype: str, imatrix: np.ndarray | None = None) -> tuple[int, float]:
    """(bytes of the quantised tensor, sum_ij imatrix_j * (w_ij - w_hat_ij)^2), imatrix_j = 1 without one.

    The two numbers a per-tensor type choice under a size budget trades off. The same imatrix
    is given to the quantiser, as llama-quantize does. Rows go ~4M elements at a time so the
    float64 scratch stays bounded for the largest tensors."""
    w = np.asarray(weights, dtype=np.float32)
    if w.ndim != 2 or w.size == 0:
        raise EdgeloraError(f"{qtype}: weights must be a non-empty 2-D matrix, not shape {w.shape}")
    step = max(1, _CHUNK // w.shape[1])
    size, err = 0, 0.0
    for r in range(0, w.shape[0], step):
        block = w[r:r + step]
        q = quantize_rows(block, qtype, imatrix)
        sq = np.square(block.astype(np.float64) - dequantize(q, qtype, block.shape))
        size += q.size
        err += float(sq.sum() if imatrix is None else sq.sum(axis=0) @ np.asarray(imatrix, np.float64))
    return size, err
