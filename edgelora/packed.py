"""A frozen base held as the quantised GGUF holds it, for a refit (edgelora.refit) on the CPU.

A refit trains the adapter against the exact weights of the shipped quantised file. Dequantised
to float32 they take 4 bytes a weight (4.3 GB at 1B parameters); held as the file's own blocks,
what the file takes (q4_k_m: about 0.6 bytes a weight). Each `PackedLinear` keeps one weight's
bytes, its rows in HF's order, and makes the float32 matrix with ggml's own to_float
(edgelora.ggml_quant.dequantize) each time the layer runs, forward and backward, then lets it go:
the values of the dequantised base bit for bit, one layer's float copy at a time, for one
dequantisation of every layer per pass (benchmarks/README.md has what it saves and costs).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EdgeloraError

UNPACKED = frozenset({"F32"})  # kept as they are loaded: ggml's float32 has nothing to unpack


class _Dequantised(torch.autograd.Function):
    """F.linear(x, W, bias) for the packed layer's W, keeping nothing but the layer for backward:
    the input's gradient is grad @ W with W made again (the weight and bias are frozen)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return F.linear(x, layer.dequantised(), layer.bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantised(), None


class PackedLinear(torch.nn.Linear):
    """A frozen linear layer whose weight is a quantised GGUF tensor's bytes, (out_features, bytes
    a row), dequantised whenever it runs. `weight` is an empty float32 placeholder: PEFT reads the
    base layer's device and dtype from it; the bias (if any) is the loaded layer's, frozen."""

    def __init__(self, linear: torch.nn.Linear, rows: np.ndarray, qtype: str):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows, self.qtype = rows, qtype
        self.weight = torch.nn.Parameter(torch.empty(0, dtype=torch.float32), requires_grad=False)
        self.register_parameter("bias", linear.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def dequantised(self) -> torch.Tensor:
        from .ggml_quant import dequantize

        return torch.from_numpy(dequantize(self.rows, self.qtype, (self.out_features, self.in_features),
                                           threads=torch.get_num_threads()))

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Dequantised.apply(x, self)
        return F.linear(x, self.dequantised(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.qtype}"


def pack_linears(model, quantised: Path, hf_dir: Path) -> dict[str, int]:
    """Swap, in place, every linear layer of the decoder blocks of `model` (the model in `hf_dir`,
    or a PEFT model of it: a LoRA layer's base layer is swapped) for a PackedLinear of the GGUF
    `quantised`'s tensor, where that tensor is quantised. Returns {ggml type: layers packed}."""
    from .converters.hf_to_gguf import HFModel
    from .gguf_header import gguf_layout
    from .layerwise import checkpoint_name
    from .machine import release_memory

    hf = HFModel(hf_dir)
    held = {t.name: t for t in gguf_layout(quantised).tensors}
    packed: dict[str, int] = {}
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        hf_name = checkpoint_name(f"{name}.weight")
        gguf_name = hf.gguf_names.get(hf_name, "")
        tensor = held.get(gguf_name) if gguf_name.startswith("blk.") else None
        if tensor is None or tensor.tensor_type.name in UNPACKED:
            continue
        shape = [int(d) for d in reversed(tensor.shape)]
        if shape != [module.out_features, module.in_features]:
            raise EdgeloraError(f"{quantised}: {gguf_name} is {shape}, the model's {hf_name} "
                                f"{[module.out_features, module.in_features]} (another model?)")
        rows = tensor.data.reshape(module.out_features, -1)  # each row's blocks, in llama.cpp's row order
        # llama.cpp's layout differs from HF's by a permutation of rows (Q/K): applied to row numbers, it names them
        order = hf.from_gguf_layout(hf_name, torch.arange(module.out_features).reshape(-1, 1)).flatten().numpy()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, PackedLinear(module, np.ascontiguousarray(rows[order]),
                                                                tensor.tensor_type.name))
        packed[tensor.tensor_type.name] = packed.get(tensor.tensor_type.name, 0) + 1
    del held
    release_memory()  # the file's mapping (its tensors and header refer to each other) and the float32 layers
    return packed
