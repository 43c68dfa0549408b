"""HF checkpoint (+ PEFT LoRA adapter) -> GGUF export, streamed one tensor at a time.

The entry points live in `edgelora.converters.hf_to_gguf` (`convert`, `convert_lora`); they
import torch, so this package file stays light: the error type and a JSON reader.
"""
import json
from pathlib import Path

from edgelora.errors import EdgeloraError


class ConvertError(EdgeloraError):
    """An input the converter cannot use; the one-line message names the file or tensor at fault."""


def read_json(path: Path, missing: str) -> dict:
    """A JSON config file; ConvertError(`missing`) when absent, naming the file when malformed."""
    if not path.is_file():
        raise ConvertError(missing)
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
