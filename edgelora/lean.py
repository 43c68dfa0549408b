"""Training layers that keep less for the backward pass, with the same math.

Without gradient checkpointing most of a LoRA run's memory is what autograd keeps between the
forward and the backward pass, and much of it is copies (measured on SmolLM2-135M, QLoRA, all
linear layers, dropout 0.05: 791 MiB for a micro-batch of 376 tokens, 438 MiB of it the LoRA
dropout's float noise and the dropped input each LoRA branch keeps):

  - LoRA dropout + lora_A: `lora_A(dropout(x))` keeps a float noise tensor and the dropped copy of
    x for every adapted layer (q, k and v each their own). `DropoutLinear` keeps x (shared by the
    layers that read it), a one-byte mask, and recomputes the dropped input in backward. Its masks
    are also cheaper to make: 16 random bits per element instead of a float, applied through uint8
    (a step ~20% faster on CPU than with torch.rand masks and bool arithmetic).
  - Gated MLPs `down(act(gate(x)) * up(x))`: autograd keeps gate(x), act(gate(x)) and up(x);
    `_GatedProduct` keeps gate(x) and up(x) and recomputes the activation (elementwise, cheap).
  - Inputs that are cheap functions of tensors kept anyway: the product above is down_proj's
    input, and each decoder layer's norm output is the input of q/k/v (or gate/up), and its
    LoRA branch kept them too. Such a tensor carries its recipe (`recomputable`: the function and
    the tensors it is made from), and `DropoutLinear` keeps those instead and makes the input
    again in backward, passing the gradient on to them.

Nothing is recomputed that costs a matrix multiply, so unlike gradient checkpointing this costs
no speed; `lean(model)` applies both to a PEFT model in place.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def mask_p(p: float) -> float:
    """The drop probability keep_mask applies for `p`: the nearest multiple of 1/65536."""
    return round(p * 2**16) / 2**16


def keep_mask(shape: torch.Size, p: float, device=None) -> torch.Tensor:
    """A dropout mask, True with probability 1 - mask_p(p): four 16-bit draws from each 64-bit
    random number of torch's generator (float masks draw one 32-bit number per element: ~3x slower
    on CPU, where drawing the masks was up to a fifth of a LoRA step)."""
    n = shape.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return (words.view(torch.int16)[:n] >= -2**15 + int(mask_p(p) * 2**16)).view(shape)


def _masked(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where keep, else 0. Through uint8: on CPU torch.where, x * keep and bool-to-float casts
    are not vectorised (~10x slower than a float multiply; measured on a 376 x 576 micro-batch)."""
    return x * keep.view(torch.uint8).to(x.dtype)


RECIPE = "_edgelora_recipe"  # a tensor's attribute: (fn, inputs) with fn(*inputs) == the tensor, elementwise


def recomputable(out: torch.Tensor, fn, *inputs: torch.Tensor) -> torch.Tensor:
    """Mark `out` as fn(*inputs), where `inputs` are kept for the backward pass anyway."""
    setattr(out, RECIPE, (fn, inputs))
    return out


def _itself(x: torch.Tensor) -> torch.Tensor:
    return x


class _DroppedMatmul(torch.autograd.Function):
    """F.linear(x * keep / (1 - p), weight) for x = fn(*inputs), keeping `inputs` and a bool mask,
    not the dropped copy (the scale goes on the small weight): x is made again in backward and its
    gradient passed on to the inputs (x itself gets none). Without a recipe, fn is _itself and
    the input is x."""

    @staticmethod
    def forward(ctx, x, weight, p, fn, *inputs):
        keep = keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep, weight, *inputs)
        ctx.fn, ctx.scale = fn, 1.0 / (1.0 - mask_p(p))
        return F.linear(_masked(x, keep), weight * ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        keep, weight, *inputs = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs)]
            x = ctx.fn(*leaves)
        grad_w = None
        if ctx.needs_input_grad[1]:
            dropped = _masked(x.detach(), keep).reshape(-1, x.shape[-1])
            grad_w = (grad.reshape(-1, grad.shape[-1]).t() @ dropped) * ctx.scale
        grads = [None] * len(inputs)
        if any(needs):
            wanted = [leaf for leaf, need in zip(leaves, needs) if need]
            found = iter(torch.autograd.grad(x, wanted, _masked(grad @ (weight * ctx.scale), keep)))
            grads = [next(found) if need else None for need in needs]
        return None, grad_w, None, None, *grads


class DropoutLinear(torch.nn.Linear):
    """lora_A with its dropout inside (no bias, like PEFT's lora_A): the same parameter, so the
    adapter's state dict, optimizer and saved files are unchanged."""

    def __init__(self, linear: torch.nn.Linear, p: float):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features, self.p = linear.in_features, linear.out_features, p
        self.weight = linear.weight
        self.register_parameter("bias", None)

    def forward(self, x):
        if self.training and self.p > 0:
            recipe = getattr(x, RECIPE, None) if torch.is_grad_enabled() else None
            fn, inputs = recipe or (_itself, (x,))
            return _DroppedMatmul.apply(x, self.weight, self.p, fn, *inputs)
        return F.linear(x, self.weight)


class _GatedProduct(torch.autograd.Function):
    """act(gate) * up keeping gate and up; act(gate) is recomputed in backward."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return act(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            g = gate.detach().requires_grad_(True)
            a = ctx.act(g)
            (grad_gate,) = torch.autograd.grad(a, g, grad * up)
        return grad_gate, grad * a.detach(), None


def _gated_mlp_forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    if torch.is_grad_enabled():
        product = recomputable(_GatedProduct.apply(gate, up, self.act_fn), self._product, gate, up)
        return self.down_proj(product)
    return self.down_proj(self.act_fn(gate) * up)


def _gated_product(self, gate, up):
    return self.act_fn(gate) * up


def _norm_recipe(norm, args, out):
    """A forward hook: the norm's output is norm(input), and the norm keeps its input anyway."""
    if torch.is_grad_enabled() and isinstance(out, torch.Tensor):
        recomputable(out, norm.forward, args[0])


def lean(model) -> None:
    """Swap the LoRA dropout + lora_A of every plain LoRA layer (not DoRA) for DropoutLinear and
    the MLP product of gated-MLP families (architectures.Arch.gated_mlp) for _GatedProduct, in place."""
    from .converters.architectures import ARCHITECTURES

    for module in list(model.modules()):
        dropouts, loras = getattr(module, "lora_dropout", None), getattr(module, "lora_A", None)
        if dropouts is None or loras is None:
            continue
        for name, drop in list(dropouts.items()):
            if (isinstance(drop, torch.nn.Dropout) and drop.p > 0 and name in loras
                    and name not in getattr(module, "lora_variant", {})):
                loras[name] = DropoutLinear(loras[name], drop.p)
                dropouts[name] = torch.nn.Identity()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        arch = ARCHITECTURES.get(base.config.model_type)
        if arch is not None and arch.gated_mlp:
            layer.mlp.forward = types.MethodType(_gated_mlp_forward, layer.mlp)
            layer.mlp._product = types.MethodType(_gated_product, layer.mlp)
        for name, module in layer.named_children():
            if name.endswith("layernorm"):  # input_layernorm, post_attention_layernorm, pre_feedforward_...
                module.register_forward_hook(_norm_recipe)
