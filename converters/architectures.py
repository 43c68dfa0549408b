"""What differs between the supported HF architectures: a table, not a class hierarchy.

To add one (e.g. qwen3, gemma3): add a row to ARCHITECTURES with its gguf.MODEL_ARCH, the
HF config keys of each hyper-parameter if they differ from COMMON_HPARAMS, and whether
llama.cpp wants Q/K re-permuted; tensor names come from gguf-py's TensorNameMap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import gguf
import numpy as np
import torch

from . import ConvertError

# GGUFWriter.add_<name> -> HF config keys to try, in order.
COMMON_HPARAMS: dict[str, tuple[str, ...]] = {
    "context_length": ("max_position_embeddings",),
    "embedding_length": ("hidden_size",),
    "block_count": ("num_hidden_layers",),
    "feed_forward_length": ("intermediate_size",),
    "head_count": ("num_attention_heads",),
    "head_count_kv": ("num_key_value_heads", "num_attention_heads"),
    "layer_norm_rms_eps": ("rms_norm_eps",),
}


@dataclass(frozen=True)
class Arch:
    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's llama graph applies RoPE to interleaved pairs, HF to rotated halves:
    # the Q/K rows (of the weights, biases and LoRA B matrices) must be re-ordered.
    permute_qk: bool = False
    hparams: dict[str, tuple[str, ...]] = field(default_factory=lambda: COMMON_HPARAMS)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2),
}


def arch_for(config: dict, source: str) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConvertError(f"{source}: unsupported model_type {model_type!r}; supported: {supported}")
    return ARCHITECTURES[model_type]


def hparam(config: dict, keys: tuple[str, ...], source: str):
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    raise ConvertError(f"{source}: missing hyper-parameter {keys[0]!r}")


def head_dim(config: dict, source: str) -> int:
    n_head = hparam(config, ("num_attention_heads",), source)
    return config.get("head_dim") or hparam(config, ("hidden_size",), source) // n_head


def permute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotate-half layout to llama.cpp's interleaved pairs."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def add_hparams(writer: gguf.GGUFWriter, config: dict, arch: Arch, n_vocab: int, source: str) -> None:
    for name, keys in arch.hparams.items():
        getattr(writer, f"add_{name}")(hparam(config, keys, source))
    dim = head_dim(config, source)
    writer.add_rope_dimension_count(dim)
    writer.add_key_length(dim)
    writer.add_value_length(dim)
    writer.add_vocab_size(n_vocab)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    kind = rope_type(rope)
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        original = rope.get("original_max_position_embeddings", config["max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(int(original))


def rope_parameters(config: dict) -> dict:
    """transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
    legacy = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
    return {**legacy, **(config.get("rope_parameters") or {})}


def rope_type(rope: dict) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def extra_tensors(config: dict, arch: Arch, source: str) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint does not hold (llama3 RoPE frequency factors)."""
    rope = rope_parameters(config)
    kind = rope_type(rope)
    if kind in ("default", "linear", "yarn"):
        return {}
    if kind == "llama3" and gguf.MODEL_TENSOR.ROPE_FREQS in gguf.MODEL_TENSORS[arch.gguf_arch]:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return {name: llama3_rope_factors(rope, head_dim(config, source))}
    raise ConvertError(f"{source}: unsupported RoPE scaling {kind!r} for {arch.name}")


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Per-frequency divisors reproducing HF's llama3 RoPE scaling (llama.cpp's rope_freqs)."""
    factor = rope["factor"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    theta = float(rope.get("rope_theta", 10000.0))
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
