"""HF model folder (+ optional PEFT LoRA adapter) -> GGUF, streamed one tensor at a time.

    convert(model_dir, out_path, adapter_dir=None, outtype="f16")  # merged model
    convert_lora(model_dir, adapter_dir, out_path)                 # llama.cpp LoRA adapter
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional

import gguf
import torch

from . import ConvertError, read_json
from .adapter import Adapter
from .architectures import Arch, add_hparams, arch_for, extra_tensors, hparam, permute_qk, unpermute_qk
from .gguf_stream import CHUNK_BYTES, QType, TensorJob, write_gguf
from .tensor_index import TensorIndex, model_weight_files
from .vocab import add_vocab, chat_template, llama_cpp_name, read_tokenizer

OUTTYPES: dict[str, tuple[QType, gguf.LlamaFileType]] = {
    "f32": (QType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (QType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}

# Checkpoint tensors llama.cpp recomputes itself.
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFModel:
    """An HF model folder: config, architecture, and its tensors indexed by GGUF name."""

    def __init__(self, model_dir: Path | str):
        self.dir = Path(model_dir)
        config_path = self.dir / "config.json"
        config = read_json(config_path, f"{self.dir}: no config.json (not a HF model folder)")
        self.source = str(config_path)
        self.arch: Arch = arch_for(config, self.source)
        self.config: dict = {**self.arch.defaults, **config}
        self.n_head = hparam(self.config, ("num_attention_heads",), self.source)
        self.n_head_kv = hparam(self.config, self.arch.hparams["head_count_kv"], self.source)
        self.tied = bool(self.config.get("tie_word_embeddings", False))
        self.index = TensorIndex(model_weight_files(self.dir))
        self.gguf_names = self._map_names()
        embed = [hf for hf, g in self.gguf_names.items() if g == "token_embd.weight"]
        if not embed:
            raise ConvertError(f"{self.dir}: no token embedding tensor")
        self.n_vocab = self.index.shape(embed[0])[0]

    def _map_names(self) -> dict[str, str]:
        """{HF tensor name: GGUF tensor name} for every tensor that goes into the file."""
        n_block = hparam(self.config, ("num_hidden_layers",), self.source)
        name_map = gguf.get_tensor_name_map(self.arch.gguf_arch, n_block)
        names = {}
        for hf_name in self.index.names():
            if hf_name.endswith(_SKIPPED_SUFFIXES) or (self.tied and hf_name == "lm_head.weight"):
                continue
            gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ConvertError(f"{self.dir}: tensor {hf_name} has no GGUF equivalent for {self.arch.name}")
            names[hf_name] = gguf_name
        return names

    def _permuted_heads(self, hf_name: str) -> int | None:
        """The number of heads whose rows are reordered for llama.cpp, or None if none are."""
        if self.arch.permute_qk:
            module = hf_name.rsplit(".", 1)[0]
            if module.endswith("self_attn.q_proj"):
                return self.n_head
            if module.endswith("self_attn.k_proj"):
                return self.n_head_kv
        return None

    def row_unit(self, hf_name: str) -> int:
        """Row blocks of the tensor must hold a multiple of this many rows (whole heads if permuted)."""
        heads = self._permuted_heads(hf_name)
        return 1 if heads is None else self.index.shape(hf_name)[0] // heads

    def to_gguf_layout(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """Row order llama.cpp expects (Q/K permutation), for a weight, bias or LoRA B,
        or a block of whole heads' rows of one."""
        heads = self._permuted_heads(hf_name)
        if heads is None:
            return t
        return permute_qk(t, t.shape[0] // self.row_unit(hf_name))

    def from_gguf_layout(self, hf_name: str, t: torch.Tensor) -> torch.Tensor:
        """to_gguf_layout undone: a whole weight as a GGUF holds it, in HF's row order."""
        heads = self._permuted_heads(hf_name)
        return t if heads is None else unpermute_qk(t, heads)

    def check_adapter(self, adapter: Adapter) -> None:
        adapter.check_base(self.index)
        dropped = sorted(set(adapter.modules) - set(self.gguf_names))
        if dropped:
            raise ConvertError(f"adapter targets {dropped[0]}, which is not written to the GGUF (tied embeddings)")

    def add_model_metadata(self, writer: gguf.GGUFWriter, card: Mapping[str, object]) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        add_card(writer, card)
        add_hparams(writer, self.config, self.arch, self.n_vocab, self.source)


def add_card(writer: gguf.GGUFWriter, card: Mapping[str, object]) -> None:
    """Model-card keys (general.name, general.base_model.0.name, ...), each value written as the
    GGUF type its Python type maps to (str, bool, int, float, or a list of one of those)."""
    for key, value in card.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            (writer.add_uint32 if value >= 0 else writer.add_int32)(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            raise ConvertError(f"model card key {key}: {type(value).__name__} is not a GGUF value")


def convert(
    model_dir: Path | str,
    out_path: Path | str,
    *,
    adapter_dir: Path | str | None = None,
    outtype: str = "f16",
    progress: Callable[[int, int], None] | None = None,
    card: Optional[Mapping[str, object]] = None,
) -> dict:
    """Write the model (with the adapter merged in, if given) as a GGUF of float type `outtype`.

    `card`: general.* keys to write (see add_card); general.name defaults to the folder's name.

    `progress(bytes_done, bytes_total)` is called after each tensor. Returns
    {"tensors": n, "bytes": file size, "arch": GGUF architecture}.
    """
    if outtype not in OUTTYPES:
        raise ConvertError(f"outtype {outtype!r} not supported; choose one of {', '.join(OUTTYPES)}")
    qtype, file_type = OUTTYPES[outtype]
    model = HFModel(model_dir)
    adapter = Adapter(adapter_dir) if adapter_dir is not None else None
    if adapter is not None:
        model.check_adapter(adapter)

    def finish(hf_name: str, t: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        if adapter is not None and hf_name in adapter.modules:
            t = adapter.merge(hf_name, t, rows)
        if model.arch.adjust is not None:
            t = model.arch.adjust(hf_name, t, model.config)
        return model.to_gguf_layout(hf_name, t)

    def make(hf_name: str) -> Callable[[], torch.Tensor | Iterator[torch.Tensor]]:
        shape = model.index.shape(hf_name)
        if len(shape) < 2 or math.prod(shape) * 4 <= CHUNK_BYTES:
            return lambda: finish(hf_name, model.index.load(hf_name))

        # Large tensors go in row blocks of whole heads, each (as f32) about CHUNK_BYTES: read
        # from the file, merged, adjusted, reordered and written one block at a time.
        unit = model.row_unit(hf_name)
        step = max(1, CHUNK_BYTES // (math.prod(shape[1:]) * 4 * unit)) * unit

        def blocks() -> Iterator[torch.Tensor]:
            for start in range(0, shape[0], step):
                rows = slice(start, min(start + step, shape[0]))
                yield finish(hf_name, model.index.load_rows(hf_name, rows.start, rows.stop), rows)
        return blocks

    jobs = []
    for hf, gguf_name in model.gguf_names.items():
        shape = model.index.shape(hf)  # norms and biases stay f32, as llama.cpp expects
        jobs.append(TensorJob(gguf_name, shape, QType.F32 if len(shape) == 1 else qtype, make(hf)))
    for name, array in extra_tensors(model.config, model.arch, model.source).items():
        jobs.append(TensorJob(name, array.shape, QType.F32, lambda a=array: torch.from_numpy(a)))

    tokenizer = read_tokenizer(model.dir)
    card = {gguf.Keys.General.NAME: Path(adapter_dir or model_dir).name, **(card or {})}
    card[gguf.Keys.General.NAME] = llama_cpp_name(tokenizer, str(card[gguf.Keys.General.NAME]))

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        model.add_model_metadata(writer, card)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(writer, model.dir, tokenizer, model.n_vocab, name=str(card[gguf.Keys.General.NAME]),
                  template_dir=adapter.dir if adapter is not None else None)

    return write_gguf(Path(out_path), model.arch.name, add_metadata, jobs, progress)


def convert_lora(
    model_dir: Path | str,
    adapter_dir: Path | str,
    out_path: Path | str,
    *,
    outtype: str = "f16",
    card: Optional[Mapping[str, object]] = None,
) -> dict:
    """Write the adapter as a llama.cpp LoRA GGUF (`<tensor>.lora_a` / `.lora_b` pairs), with the
    general.* keys of `card` (general.name defaults to the adapter folder's name).

    llama.cpp scales each pair by adapter.lora.alpha / rank. rsLoRA's alpha / sqrt(r) is
    written as alpha * sqrt(r) for the adapter's rank r; a module whose scale still differs
    (alpha_pattern, or rank_pattern under rsLoRA) has the ratio folded into its lora_b.
    """
    if outtype not in ("f32", "f16"):
        raise ConvertError(f"LoRA outtype {outtype!r} not supported; choose f32 or f16")
    qtype = OUTTYPES[outtype][0]
    model = HFModel(model_dir)
    adapter = Adapter(adapter_dir)
    if adapter.dora:
        raise ConvertError(f"{adapter.dir}: a DoRA adapter cannot be written as a llama.cpp LoRA; "
                           "export the merged model instead (convert(..., adapter_dir=...))")
    model.check_adapter(adapter)
    ranks = {name: adapter.index.shape(m.a)[0] for name, m in adapter.modules.items()}
    alpha = adapter.alpha * math.sqrt(adapter.rank) if adapter.rslora else adapter.alpha

    def make_b(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            b = adapter.index.load(adapter.modules[name].b).float()
            correction = adapter.scale(name, ranks[name]) / (alpha / ranks[name])
            if not math.isclose(correction, 1.0):
                b = b * correction
            return model.to_gguf_layout(name, b)
        return load

    jobs = []
    for name in (hf for hf in model.gguf_names if hf in adapter.modules):
        key_a, key_b = adapter.modules[name].a, adapter.modules[name].b
        base = model.gguf_names[name]
        jobs.append(TensorJob(base + ".lora_a", adapter.index.shape(key_a), qtype,
                              lambda k=key_a: adapter.index.load(k)))
        jobs.append(TensorJob(base + ".lora_b", adapter.index.shape(key_b), qtype, make_b(name)))

    def add_metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        add_card(writer, {gguf.Keys.General.NAME: adapter.dir.name, **(card or {})})
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        template = chat_template(adapter.dir)
        if template:  # llama.cpp ignores it; edgelora's runtime uses it when the base GGUF has none
            writer.add_chat_template(template)

    return write_gguf(Path(out_path), model.arch.name, add_metadata, jobs)
