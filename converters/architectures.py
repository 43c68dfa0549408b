"""What differs between the supported HF architectures: a table, not a class hierarchy.

To add one: add a row to ARCHITECTURES with its gguf.MODEL_ARCH, the HF config keys of each
hyper-parameter if they differ from COMMON_HPARAMS, whether llama.cpp wants Q/K re-permuted,
and, where needed, the config defaults HF leaves out, a hook for its own GGUF metadata and one
for weight values llama.cpp's graph wants differently; tensor names come from gguf-py's
TensorNameMap.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

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
    # The config key of the MLP's activation and the one llama.cpp's graph for it computes.
    activation: tuple[str, str] = ("hidden_act", "silu")
    # Whether llama.cpp's graph rotates only part of each head (partial_rotary_factor < 1).
    partial_rotary: bool = False
    # Whether the config may have sliding-window layers (add_metadata then writes or refuses them).
    sliding_window: bool = False
    # The MLP is down(act(gate(x)) * up(x)) with separate gate and up (edgelora.lean recomputes the
    # product); phi3's fused gate_up is not.
    gated_mlp: bool = True
    # The logits are the LM head of the last hidden state (soft-capped at most): training may run the
    # head at the target positions alone (edgelora.trainer.summed_loss).
    head_at_targets: bool = True
    hparams: dict[str, tuple[str, ...]] = field(default_factory=lambda: COMMON_HPARAMS)
    # Config values the HF config class supplies when config.json leaves them out.
    defaults: dict = field(default_factory=dict)
    # Writes the architecture's own metadata, refusing what llama.cpp's graph cannot express.
    add_metadata: Callable[[gguf.GGUFWriter, dict, str], None] | None = None
    # (HF name, tensor, config) -> the values llama.cpp's graph expects, for base (or merged)
    # weights; never applied to LoRA pairs, which only target linear layers. Must work row by
    # row: a large tensor is passed as consecutive blocks of its rows.
    adjust: Callable[[str, torch.Tensor, dict], torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# Gemma3TextConfig's defaults, for config.json files that leave some out (older hub ones do).
GEMMA3_DEFAULTS = {
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "sliding_window_pattern": 6, "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}


def gemma3_metadata(writer: gguf.GGUFWriter, config: dict, source: str) -> None:
    """Sliding-window layout, its RoPE base and the final logit soft-cap, as llama.cpp's gemma3 reads them."""
    for key in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if config.get(key):
            raise ConvertError(f"{source}: {key} is not supported by llama.cpp's gemma3")
    # What Gemma3 checkpoints use, and what is checked against transformers: linear scaling, global layers only.
    local, scaling = rope_parameters(config, "sliding_attention"), rope_type(rope_parameters(config))
    if scaling not in ("default", "linear") or rope_type(local) != "default":
        raise ConvertError(f"{source}: gemma3 RoPE scaling other than linear on the global layers is not supported")
    period = swa_period(config, source)
    if period > 1:  # all global: llama.cpp wants no sliding window at all
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern(period)
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))


def swa_period(config: dict, source: str) -> int:
    """llama.cpp's gemma3 has every period-th layer global (i % period == period - 1), the
    others sliding-window: the period reproducing HF's layer_types."""
    n_layer = config["num_hidden_layers"]
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % config["sliding_window_pattern"] == 0 else "sliding_attention"
        for i in range(n_layer)]
    for period in range(1, n_layer + 2):
        if all((kind == "sliding_attention") == (i % period < period - 1) for i, kind in enumerate(layer_types)):
            return period
    raise ConvertError(f"{source}: layer_types {layer_types} is not a repeating pattern of sliding-window layers "
                       "closed by a global one, which is all llama.cpp's gemma3 can express")


def gemma3_adjust(name: str, t: torch.Tensor, config: dict) -> torch.Tensor:
    """Gemma3's RMSNorms multiply by (1 + w), llama.cpp's by w.

    HF scales the attention scores by query_pre_attn_scalar ** -0.5; llama.cpp by
    1 / sqrt(head_dim), or 1 / sqrt(hidden_size / heads) for a 62-layer (27B) model, and reads
    no key to change that: the queries' RMSNorm weight (before RoPE, a rotation) makes up the
    difference.
    """
    if not name.endswith("norm.weight"):
        return t
    t = t.float() + 1
    if name.endswith("self_attn.q_norm.weight"):
        n_head = config["num_attention_heads"]
        scale_dim = config["hidden_size"] // n_head if config["num_hidden_layers"] == 62 else config["head_dim"]
        t = t * math.sqrt(scale_dim / config["query_pre_attn_scalar"])
    return t


def phi3_metadata(writer: gguf.GGUFWriter, config: dict, source: str) -> None:
    """Phi-3, Phi-3.5 and Phi-4-mini: the pre-training context, LongRoPE's attention factor (its
    per-frequency factors are tensors: extra_tensors) and the sliding window, 0 for none (what
    llama.cpp reads; it attends to the whole context either way, as HF does up to the window)."""
    rope = rope_parameters(config)
    kind = rope_type(rope)
    if kind not in ("default", "longrope"):
        raise ConvertError(f"{source}: phi3 RoPE scaling {kind!r} is not supported (default or longrope)")
    writer.add_rope_scaling_orig_ctx_len(original_context(config, rope))
    writer.add_sliding_window(int(config.get("sliding_window") or 0))
    if kind == "longrope":
        writer.add_rope_scaling_attn_factors(longrope_attention_factor(config, rope))


def smollm3_metadata(writer: gguf.GGUFWriter, config: dict, source: str) -> None:
    """SmolLM3 leaves RoPE out of every fourth layer; llama.cpp's smollm3 always so (layer i has
    RoPE unless (i + 1) % 4 == 0): HF's no_rope_layers (1: RoPE) must say the same."""
    n_layer = config["num_hidden_layers"]
    interval = config.get("no_rope_layer_interval", 4)
    layers = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(n_layer)]
    if list(layers) != [int((i + 1) % 4 != 0) for i in range(n_layer)]:
        raise ConvertError(f"{source}: no_rope_layers {layers} is not RoPE left out of every fourth layer, which is "
                           "all llama.cpp's smollm3 can express")


def original_context(config: dict, rope: dict) -> int:
    """The context the model was pre-trained with (HF: the config's, else the RoPE parameters', else the maximum)."""
    return int(config.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
               or config["max_position_embeddings"])


def longrope_attention_factor(config: dict, rope: dict) -> float:
    """HF's LongRoPE cos/sin scale: given, or sqrt(1 + ln(factor) / ln(original context)) with
    factor the given one or the ratio of the maximum to the original context."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    original = original_context(config, rope)
    factor = rope.get("factor") or config["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Arch(gguf.MODEL_ARCH.QWEN2),
    "qwen3": Arch(gguf.MODEL_ARCH.QWEN3),
    "gemma3_text": Arch(gguf.MODEL_ARCH.GEMMA3, activation=("hidden_activation", "gelu_pytorch_tanh"),
                        sliding_window=True, defaults=GEMMA3_DEFAULTS, add_metadata=gemma3_metadata,
                        adjust=gemma3_adjust),
    # qkv_proj and gate_up_proj stay fused: llama.cpp's phi3 reads them so (attn_qkv, ffn_up of 2 x n_ff)
    "phi3": Arch(gguf.MODEL_ARCH.PHI3, partial_rotary=True, sliding_window=True, gated_mlp=False,
                 add_metadata=phi3_metadata),
    "smollm3": Arch(gguf.MODEL_ARCH.SMOLLM3, permute_qk=True, add_metadata=smollm3_metadata),
}


# Model types refused with a reason of their own.
UNSUPPORTED = {
    "gemma3": "the multimodal Gemma3 (language model under text_config, with a vision tower) is not supported, "
              "only text-only gemma3_text checkpoints (Gemma3ForCausalLM)",
}


def arch_for(config: dict, source: str) -> Arch:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        reason = f" ({UNSUPPORTED[model_type]})" if model_type in UNSUPPORTED else ""
        raise ConvertError(f"{source}: unsupported model_type {model_type!r}{reason}; supported: {supported}")
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


def unpermute_qk(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """permute_qk undone: llama.cpp's interleaved pairs back to HF's rotate-half rows."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def rotary_dims(config: dict, arch: Arch, source: str) -> int:
    """How many dimensions of each head RoPE rotates (HF: head_dim x partial_rotary_factor)."""
    fraction = rope_parameters(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if fraction != 1.0 and not arch.partial_rotary:
        raise ConvertError(f"{source}: partial_rotary_factor {fraction} is not supported for {arch.name} "
                           "(llama.cpp's graph rotates whole heads)")
    return int(head_dim(config, source) * fraction)


def add_hparams(writer: gguf.GGUFWriter, config: dict, arch: Arch, n_vocab: int, source: str) -> None:
    key, computed = arch.activation
    if config.get(key, computed) != computed:
        raise ConvertError(f"{source}: {key} {config[key]!r} is not supported by llama.cpp's {arch.name} ({computed})")
    for name, keys in arch.hparams.items():
        getattr(writer, f"add_{name}")(hparam(config, keys, source))
    dim = head_dim(config, source)
    writer.add_rope_dimension_count(rotary_dims(config, arch, source))
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
    if not arch.sliding_window and ("sliding_attention" in (config.get("layer_types") or ())
                                    or config.get("use_sliding_window")):
        raise ConvertError(f"{source}: sliding-window attention layers are not supported for {arch.name}")
    if arch.add_metadata is not None:
        arch.add_metadata(writer, config, source)


def rope_parameters(config: dict, layer_type: str = "full_attention") -> dict:
    """transformers >= 5 writes `rope_parameters` (per layer type for gemma3); older configs
    `rope_theta` + `rope_scaling` (and gemma3 `rope_local_base_freq` for its sliding layers)."""
    if layer_type == "sliding_attention":
        legacy = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
    else:
        legacy = {"rope_theta": config.get("rope_theta", 10000.0), **(config.get("rope_scaling") or {})}
    params = config.get("rope_parameters") or {}
    return {**legacy, **params.get(layer_type, params)}


def rope_type(rope: dict) -> str:
    return rope.get("rope_type") or rope.get("type") or "default"


def extra_tensors(config: dict, arch: Arch, source: str) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint does not hold (llama3 RoPE frequency factors,
    LongRoPE's long and short factors)."""
    rope = rope_parameters(config)
    kind = rope_type(rope)
    if kind in ("default", "linear", "yarn"):
        return {}
    if kind == "llama3" and gguf.MODEL_TENSOR.ROPE_FREQS in gguf.MODEL_TENSORS[arch.gguf_arch]:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        return {name: llama3_rope_factors(rope, head_dim(config, source))}
    if kind == "longrope" and gguf.MODEL_TENSOR.ROPE_FACTORS_LONG in gguf.MODEL_TENSORS[arch.gguf_arch]:
        pairs = rotary_dims(config, arch, source) // 2
        tensors = {}
        for which, tensor in (("long", gguf.MODEL_TENSOR.ROPE_FACTORS_LONG),
                              ("short", gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT)):
            factors = rope.get(f"{which}_factor")
            if not isinstance(factors, list) or len(factors) != pairs:
                raise ConvertError(f"{source}: longrope {which}_factor must be a list of {pairs} numbers "
                                   "(one per rotated pair of dimensions)")
            tensors[gguf.TENSOR_NAMES[tensor] + ".weight"] = np.array(factors, dtype=np.float32)
        return tensors
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
