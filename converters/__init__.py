"""HF checkpoint (+ PEFT LoRA adapter) -> GGUF export, streamed one tensor at a time.

The entry points live in `edgelora.converters.hf_to_gguf` (`convert`, `convert_lora`); they
import torch, so this package file stays light and only defines the error type.
"""
from edgelora.errors import EdgeloraError


class ConvertError(EdgeloraError):
    """An input the converter cannot use; the one-line message names the file or tensor at fault."""
