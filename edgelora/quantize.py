"""f16/f32 GGUF -> quantised GGUF through llama.cpp's own quantiser (llama-cpp-python); no torch."""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import gguf
import llama_cpp

from . import quant_presets
from .errors import EdgeloraError
from .imatrix import IMatrix, quantizer_array
from .imatrix import check as check_imatrix
from .gguf_header import gguf_layout, later_layers_header
from .gguf_info import inspect_gguf
from . import files
from .files import atomic_path
from .llamacpp import captured_log, log_reason

_FLOAT_TYPES = {"F32", "F16", "BF16"}
_SUMMARY = ("path", "file_type", "size_bytes", "n_params", "bpw", "tensor_types", "class_types")


def quantize(src: Path | str, dst: Path | str, preset: str | dict, *, imatrix: IMatrix | None = None,
             threads: int = 0, verbose: bool = False) -> dict:
    """Quantise the float GGUF `src` into `dst` with `preset` (a name such as "q4_k_m", or a preset dict).

    `dst` appears only when complete (temporary name, then rename); an existing `dst` is
    replaced. The f16 preset goes through the quantiser too: f16 tensors are copied as they are,
    f32/bf16 ones converted, and the file type recorded by llama.cpp. Returns inspect_gguf's
    summary of `dst` plus the preset name, the seconds taken and `fallbacks` (see `fallbacks`).
    llama.cpp's log is shown only if `verbose`; `threads` 0 means all cores. An importance matrix
    (edgelora.imatrix) is checked against the source's weights first, then given to the quantiser.
    """
    src, dst = Path(src), Path(dst)
    preset = _load_preset(preset)
    main = main_type(preset["llama_ftype"])
    source = inspect_gguf(src)
    _check_source(source)
    overrides = _overrides(preset.get("overrides") or {}, main, source)
    if imatrix is not None:
        check_imatrix(imatrix, source)
    most_bits = preset.get("expected_bpw", [0, 16])[1]
    files.check_free_space(dst, int(source["n_params"] * most_bits / 8) + source["size_bytes"] - source["tensor_bytes"])
    start = time.perf_counter()
    refit = _refit_fallbacks(src, preset, overrides, imatrix, threads, verbose)
    with atomic_path(dst, suffix=".gguf") as tmp:
        _llama_quantize(src, tmp, preset, {**overrides, **refit}, imatrix, threads, verbose, dst)
    info = inspect_gguf(dst)
    return {**{k: info[k] for k in _SUMMARY}, "preset": preset["name"],
            "seconds": round(time.perf_counter() - start, 3), "fallbacks": fallbacks(info, main, overrides)}


def _llama_quantize(src: Path, out: Optional[Path], preset: dict, overrides: dict[str, str],
                    imatrix: Optional[IMatrix], threads: int, verbose: bool, dst: Path) -> list[tuple[int, str]]:
    """One llama_model_quantize call (a dry run, writing nothing, when `out` is None); its log.
    `dst`: the file an error names."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_" + preset["llama_ftype"])
    params.nthread = threads
    params.dry_run = out is None
    patterns = _tensor_overrides(overrides)  # referenced until the call returns
    params.tt_overrides = ctypes.cast(patterns, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix is not None:
        importance, _buffers = quantizer_array(imatrix)  # referenced until the call returns
        params.imatrix = ctypes.cast(importance, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with captured_log(verbose) as log:
        if llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(out or os.devnull), ctypes.byref(params)):
            reason = ("No space left on device" if files.disk_full(dst.parent)  # llama.cpp gives no errno
                      else log_reason(log, last=True).split("failed to quantize: ")[-1])
            raise EdgeloraError(f"{dst}: llama.cpp could not quantise {src.name} to {preset['name']}: {reason}")
    return log


# llama.cpp's line for a weight whose rows do not take the type its preset wants (llama-quant.cpp)
_FALLBACK_LINE = re.compile(r"(\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\w+)\)")


def _refit_fallbacks(src: Path, preset: dict, overrides: dict[str, str], imatrix: Optional[IMatrix],
                     threads: int, verbose: bool) -> dict[str, str]:
    """{exact tensor name: type} for the weights whose rows do not take the type the preset wants
    and whose fallback the preset chooses itself (its `fallback` table, e.g. Q2_K -> IQ4_NL where
    llama.cpp would take Q4_0): read from a dry run of the quantiser, which writes nothing."""
    table = {str(k).upper(): str(v).upper() for k, v in (preset.get("fallback") or {}).items()}
    if not table:
        return {}
    log = _llama_quantize(src, None, preset, overrides, imatrix, threads, verbose, src)
    wanted = _FALLBACK_LINE.findall("".join(text for _, text in log))
    return {re.escape(name): table[want.upper()] for name, want in wanted if want.upper() in table}


def _load_preset(preset: str | dict) -> dict:
    if isinstance(preset, dict):
        missing = {"name", "llama_ftype"} - set(preset)
        if missing:
            raise EdgeloraError(f"quant preset lacks {', '.join(sorted(missing))}")
        return preset
    try:
        return quant_presets.load(preset)
    except KeyError as e:
        raise EdgeloraError(e.args[0]) from None


def main_type(llama_ftype: str) -> str:
    """The ggml type most weights get under a llama.cpp ftype: MOSTLY_Q4_K_M -> Q4_K, MOSTLY_Q8_0 -> Q8_0."""
    if not hasattr(llama_cpp, "LLAMA_FTYPE_" + llama_ftype):
        raise EdgeloraError(f"llama.cpp has no file type {llama_ftype}")
    name = llama_ftype.removeprefix("MOSTLY_").removeprefix("ALL_")
    while name and name not in gguf.GGMLQuantizationType.__members__:
        name = name.rpartition("_")[0]  # drop a mix suffix such as _M or _S
    if not name:
        raise EdgeloraError(f"cannot tell the main tensor type of {llama_ftype}")
    return name


def _check_source(source: dict) -> None:
    if source["type"] != "model":
        raise EdgeloraError(f"{source['path']}: is a LoRA adapter GGUF; quantise the model GGUF instead")
    quantised = sorted(set(source["tensor_types"]) - _FLOAT_TYPES)
    if quantised:
        raise EdgeloraError(f"{source['path']}: already quantised ({', '.join(quantised)}); "
                            "quantise from the f16 or f32 GGUF")


def _overrides(overrides: dict, main: str, source: dict) -> dict[str, str]:
    """{pattern: ggml type name}; each pattern must match whole tensor names of the source."""
    if overrides and main in _FLOAT_TYPES:
        raise EdgeloraError(f"tensor overrides need a quantised preset, not {main}")
    checked = {}
    names = [t["name"] for t in source["tensors"] if len(t["shape"]) >= 2]
    for pattern, qtype in overrides.items():
        qtype = str(qtype).upper()
        if qtype not in gguf.GGMLQuantizationType.__members__:
            raise EdgeloraError(f"override {pattern}: unknown tensor type {qtype!r} (e.g. Q8_0, Q6_K, F16)")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise EdgeloraError(f"override {pattern!r}: bad pattern: {e}") from None
        if not any(regex.fullmatch(n) for n in names):
            raise EdgeloraError(f"override {pattern!r} matches no weight tensor of {source['path']}")
        checked[pattern] = qtype
    return checked


def _tensor_overrides(overrides: dict[str, str]) -> ctypes.Array:
    """A NULL-terminated llama_model_tensor_override array; patterns are anchored to whole names."""
    entries = [llama_cpp.llama_model_tensor_override(f"^(?:{p})$".encode(), gguf.GGMLQuantizationType[t].value)
               for p, t in overrides.items()]
    entries.append(llama_cpp.llama_model_tensor_override(None, 0))
    return (llama_cpp.llama_model_tensor_override * len(entries))(*entries)


def fallbacks(info: dict, main: str, overrides: dict[str, str] | None = None) -> dict:
    """Weight tensors not of their wanted type because their row length is not a multiple of its block.

    The wanted type is the first override whose pattern matches the whole name, else `main`.
    """
    names, by_type = [], Counter()
    for t in info["tensors"]:
        want = next((q for p, q in (overrides or {}).items() if re.fullmatch(p, t["name"])), main)
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]][0]
        if len(t["shape"]) >= 2 and t["type"] != want and t["shape"][0] % block:
            names.append(t["name"])
            by_type[t["type"]] += 1
    return {"count": len(names), "by_type": dict(by_type.most_common()), "tensors": names}


class TensorSwap:
    """Files made of two quantisations of one model to one preset, tensor by tensor.

    For a file with and one without an importance matrix: llama.cpp quantises each tensor on its
    own, so `write(names, dst)` (`base` with the data of `names` taken from `donor`) is the file
    llama.cpp would make with the matrix for `names` alone, at the cost of a file copy. Every
    tensor must sit at the same offset with the same type and size in both files."""

    def __init__(self, base: Path | str, donor: Path | str):
        self.base, self.donor = Path(base), Path(donor)
        self.layout = gguf_layout(self.base)
        ours = {t.name: t for t in self.layout.tensors}
        theirs = {t.name: t for t in gguf_layout(self.donor).tensors}
        for name in ours.keys() ^ theirs.keys():
            raise EdgeloraError(f"{(self.base if name in theirs else self.donor).name}: has no tensor {name}")
        self.spans = {}
        for name, a in ours.items():
            b = theirs[name]
            if (a.tensor_type, a.data_offset, a.n_bytes) != (b.tensor_type, b.data_offset, b.n_bytes):
                raise EdgeloraError(f"{self.donor.name}: tensor {name} is laid out differently from {self.base.name} "
                                    f"({b.tensor_type.name} at byte {b.data_offset} vs {a.tensor_type.name} "
                                    f"at byte {a.data_offset})")
            self.spans[name] = (int(a.data_offset), int(a.n_bytes))

    def write(self, names, dst: Path | str, from_layer: int = 0) -> None:
        """`from_layer` > 0: only the layers from that one on (and every tensor outside the layers),
        renumbered from 0 (gguf_header.later_layers_header): what the file computes after the
        input of that layer, which is the base's where `names` are all in later layers."""
        spans = []
        for name in names:
            if name not in self.spans:
                raise EdgeloraError(f"{self.base.name}: has no tensor {name}")
            spans.append(self.spans[name])
        if from_layer:
            self._write_later_layers(set(names), Path(dst), from_layer)
            return
        with atomic_path(Path(dst), suffix=".gguf") as tmp:
            shutil.copyfile(self.base, tmp)
            with open(tmp, "r+b") as out, open(self.donor, "rb") as src:
                for offset, size in spans:
                    src.seek(offset)
                    out.seek(offset)
                    out.write(src.read(size))

    def _write_later_layers(self, names: set, dst: Path, first: int) -> None:
        header, tensors = later_layers_header(self.layout, first)
        alignment = self.layout.fields.get("general.alignment", 32)
        with atomic_path(dst, suffix=".gguf") as tmp, open(tmp, "wb") as out, \
                open(self.base, "rb") as base, open(self.donor, "rb") as donor:
            out.write(header)
            for t in tensors:
                src = donor if t.name in names else base
                src.seek(t.data_offset)
                out.write(src.read(t.n_bytes))
                out.write(bytes(-t.n_bytes % alignment))
