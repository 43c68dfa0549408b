"""Describe a GGUF file: architecture, tensor types, size and bits per weight (no torch)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf

from .errors import EdgeloraError

# Architecture hyper-parameters worth showing: report key -> GGUF key suffix after "{arch}.".
_HPARAMS = {
    "context_length": "context_length",
    "embedding_length": "embedding_length",
    "feed_forward_length": "feed_forward_length",
    "block_count": "block_count",
    "head_count": "attention.head_count",
    "head_count_kv": "attention.head_count_kv",
}

_NOT_CARD = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.TYPE, gguf.Keys.General.FILE_TYPE,
             gguf.Keys.General.QUANTIZATION_VERSION, gguf.Keys.General.ALIGNMENT}


def is_card_key(key: str) -> bool:
    """A key of the model card (edgelora.card writes them): who the model is, not how to run it."""
    return (key.startswith("general.") and key not in _NOT_CARD) or key.startswith("edgelora.")


def tensor_class(name: str) -> str:
    """blk.12.attn_q.weight -> attn_q; token_embd.weight -> token_embd."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 3 else parts[0]


def quantisable(name: str, shape) -> bool:
    """The weights llama.cpp's quantiser quantises (2-D+, named *weight, not a norm)."""
    return len(shape) >= 2 and name.endswith("weight") and "_norm." not in name and "ffn_gate_inp" not in name


def class_types(tensors: list[dict]) -> dict[str, dict[str, int]]:
    """{weight class: {type: how many}} over the quantisable weights: what each kind of weight got."""
    out: dict[str, dict[str, int]] = {}
    for t in tensors:
        if quantisable(t["name"], t["shape"]):
            per = out.setdefault(tensor_class(t["name"]), {})
            per[t["type"]] = per.get(t["type"], 0) + 1
    return out


def read_gguf(path: Path | str) -> gguf.GGUFReader:
    """A GGUFReader over `path`; EdgeloraError naming the file if it is missing, not GGUF or truncated."""
    path = Path(path)
    if not path.is_file():
        raise EdgeloraError(f"{path}: no such file")
    try:  # the reader maps every tensor, so cut-off data fails here too, in one of many ways
        return gguf.GGUFReader(path)
    except Exception as e:
        raise EdgeloraError(f"{path}: not a GGUF file, or truncated ({type(e).__name__}: {e})") from None


def field_value(reader: gguf.GGUFReader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def _file_type(value) -> str | None:
    try:
        return None if value is None else gguf.LlamaFileType(value).name
    except ValueError:
        return f"unknown ({value})"




def inspect_gguf(path: Path | str) -> dict:
    """Metadata and per-tensor types of a GGUF; shapes are in llama.cpp order (row length first)."""
    from .gguf_header import gguf_layout

    layout = gguf_layout(path)
    path, fields = layout.path, layout.fields
    arch = fields.get(gguf.Keys.General.ARCHITECTURE)
    tensors = [{"name": t.name, "type": t.tensor_type.name, "shape": list(t.shape),
                "n_elements": t.n_elements, "bytes": t.n_bytes} for t in layout.tensors]
    n_params = sum(t["n_elements"] for t in tensors)
    tensor_bytes = sum(t["bytes"] for t in tensors)
    info = {
        "path": str(path),
        "type": fields.get(gguf.Keys.General.TYPE) or "model",
        "arch": arch,
        "name": fields.get(gguf.Keys.General.NAME),
        "file_type": _file_type(fields.get(gguf.Keys.General.FILE_TYPE)),
        "size_bytes": path.stat().st_size,
        "n_params": n_params,
        "tensor_bytes": tensor_bytes,
        "bpw": tensor_bytes * 8 / n_params if n_params else 0.0,
        "tensor_types": dict(Counter(t["type"] for t in tensors).most_common()),
        "class_types": class_types(tensors),
        "vocab_size": len(fields[vocab]) if (vocab := gguf.Keys.Tokenizer.LIST) in fields else None,
    }
    info["card"] = {k: v for k, v in fields.items() if is_card_key(k)}
    info.update({k: fields.get(f"{arch}.{suffix}") for k, suffix in _HPARAMS.items()})
    if info["type"] == "adapter":
        info["lora_alpha"] = fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    info["tensors"] = tensors
    return info


def format_inspect(info: dict, tensors: bool = False) -> str:
    """A plain-text report of `inspect_gguf`'s result; `tensors` lists every tensor too."""
    rows = {
        "file type": info["file_type"] or "-",
        "size": f"{info['size_bytes'] / 2**20:.2f} MiB ({info['size_bytes']:,} bytes)",
        "parameters": f"{info['n_params']:,} ({info['bpw']:.2f} bits per weight)",
        **{k: info[k] for k in ("vocab_size", *_HPARAMS, "lora_alpha") if info.get(k) is not None},
        "tensor types": ", ".join(f"{t} x{n}" for t, n in info["tensor_types"].items()),
    }
    lines = [info["path"], f"  {info['type']} {info['arch'] or '?'} {info['name'] or ''}".rstrip()]
    for key, value in rows.items():
        lines.append(f"  {key.replace('_', ' '):<20} {f'{value:g}' if isinstance(value, float) else value}")
    if info["card"]:
        lines.append("  model card")
        for key, value in info["card"].items():
            shown = ", ".join(map(str, value)) if isinstance(value, list) else value
            lines.append(f"    {key.removeprefix('general.'):<18} {shown}")
    if info["class_types"]:
        lines.append("  weight types by class")
        for cls, types in info["class_types"].items():
            lines.append(f"    {cls:<18} {', '.join(f'{t} x{n}' for t, n in types.items())}")
    if tensors:
        width = max((len(t["name"]) for t in info["tensors"]), default=0)
        lines.append("")
        for t in info["tensors"]:
            shape = " x ".join(map(str, t["shape"]))
            lines.append(f"  {t['name']:<{width}}  {t['type']:<6} {shape:<16} {t['bytes']:>12,} B")
    return "\n".join(lines)
