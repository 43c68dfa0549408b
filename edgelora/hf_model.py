"""The HF model in torch, as training and the bench's torch row load it: device, compute dtype,
NF4 4-bit (QLoRA) or float weights, and the fast tokenizer answer-only masking needs.

Devices are named as everywhere in edgelora (machine.DEVICES); torch's own name comes back.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

import torch

from .errors import EdgeloraError
from .machine import torch_device

log = logging.getLogger("edgelora")


def pick_device(want: str) -> str:
    """torch's device for one of machine.DEVICES (auto: CUDA, else Apple's GPU, else the CPU)."""
    if want == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise EdgeloraError("--device cuda: no CUDA GPU is visible to torch")
    if want == "metal" and not _mps_available():
        raise EdgeloraError("--device metal: Apple's GPU (torch's MPS) is not available")
    return torch_device(want)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def bnb_usable(device: str) -> bool:
    """bitsandbytes >= 0.48 runs NF4 on CPU as well as CUDA; not on MPS."""
    if device not in ("cuda", "cpu"):
        return False
    try:
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def pick_method(want: str, device: str) -> str:
    if want == "lora":
        return "lora"
    if bnb_usable(device):
        return "qlora"
    if want == "qlora":
        raise EdgeloraError(f"--method qlora needs bitsandbytes on cuda or cpu (device is {device}); use --method lora")
    log.warning("bitsandbytes is not usable on %s: training plain LoRA instead of QLoRA", device)
    return "lora"


def compute_dtype(device: str) -> torch.dtype:
    # bf16 where the hardware does it fast; on CPU bf16 matmuls are ~7x slower than fp32 (measured).
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(hf_dir: Path, method: str, device: str, dtype: torch.dtype, training: bool = True):
    """The HF model in `hf_dir` on `device`: NF4 4-bit (bitsandbytes) for qlora, else in `dtype`;
    without a KV cache when `training`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(hf_dir, **kwargs)
    except (ValueError, OSError, KeyError) as e:
        raise EdgeloraError(f"{hf_dir}: cannot load model ({str(e).splitlines()[0]})") from None
    model.config.use_cache = not training  # no KV cache while training (and none with checkpointing)
    for module in model.modules():
        # bitsandbytes repacks NF4 weights for a fast CPU inference kernel the first time a
        # layer runs in eval mode; that kernel has no backward, so training after an eval
        # pass would silently lose the gradient through every frozen layer. Keep one layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if method == "qlora":
        _leave_the_file(model)
    return model



def load_with_adapter(hf_dir: Path, adapter_dir: Optional[Path], device: str = "cpu",
                      dtype: torch.dtype = torch.float32, merged: bool = False):
    """The HF base in `dtype` with the PEFT adapter in `adapter_dir` on it (none: the base alone),
    for inference: the model the GGUFs are checked against (verify), measured on (the importance
    matrix in torch: `merged`, the weights a merged GGUF holds) and benched beside (bench's torch row)."""
    model = load_model(hf_dir, "lora", device, dtype, training=False)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir).to(device)
        if merged:
            model = model.merge_and_unload()
    return model.eval()

def _leave_the_file(model) -> None:
    """Copy the CPU tensors bitsandbytes leaves unquantized (embeddings, norms) out of the
    checkpoint they were loaded as views of. Else those few keep the whole safetensors file
    mapped, every page read while loading still resident (SmolLM2: +415 MB of RSS for a
    108 MB embedding) for as long as training runs. Float models keep the mapping: it holds
    their weights, and copying them would double the peak."""
    from bitsandbytes.nn import Params4bit

    for p in model.parameters():
        if p.device.type == "cpu" and not isinstance(p, Params4bit):
            p.data = p.data.clone()


def load_tokenizer(path: Path):
    """The fast tokenizer saved in `path`, with a pad token (its end-of-sequence token where it has none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise EdgeloraError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if not getattr(tok, "is_fast", False):
        raise EdgeloraError(f"{path}: edgelora needs a fast (tokenizer.json) tokenizer for answer-only masking")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
