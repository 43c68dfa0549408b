"""The model as trained (HF base + PEFT adapter, float32, in torch), run one decoder layer at a time.

Export and doctor compare llama.cpp's files with what the run's model computes in torch, the
reference that does not share llama.cpp's code. Loading that model whole costs 4 bytes a parameter
(6.6 GB at 1B, more than a 16 GB laptop has at 4B); here the model is built without weights
(accelerate's init_empty_weights) and each decoder layer's weights are read from the checkpoint
just before the layer runs and dropped after it, so memory holds one layer, the embedding while it
runs and the examples' hidden states. The adapter is PEFT's own, loaded whole (it is small): the
LoRA, rsLoRA or DoRA arithmetic is PEFT's, not the converter's that the comparison checks.

The model's own forward runs (its masks, rotary embeddings, sliding windows); the examples go
through it together, right-padded, a few thousand tokens a pass, so the checkpoint is read once
per pass. Only the rows asked for go through the output head.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .machine import release_memory

TOKENS_PER_PASS = 4096  # padded tokens run together, each pass reading every layer's weights once


def answer_logprobs(hf_dir: Path, adapter_dir: Optional[Path], rows: Sequence,
                    adapter: Sequence[bool] = (True,)) -> list[list[np.ndarray]]:
    """Log-probabilities of the next token at `rows` ((token ids, positions) pairs) from the model
    in `hf_dir` with the adapter in `adapter_dir`: one list per entry of `adapter` (True: with the
    adapter, False: the base alone), each an array (positions x vocabulary) per row."""
    import torch

    model, weights = _empty_model(hf_dir, adapter_dir)
    decoder = model.get_base_model().model if adapter_dir is not None else model.model
    hidden = []
    with _streamed(decoder.layers, weights), _streamed([decoder.embed_tokens], weights), torch.no_grad():
        for with_adapter in adapter:
            with contextlib.nullcontext() if with_adapter or adapter_dir is None else model.disable_adapter():
                hidden.append(_hidden_at(decoder, rows))
        logprobs = _output_head(model, weights)(torch.cat([h for run in hidden for h in run]))
    sizes = [len(h) for run in hidden for h in run]
    parts = iter(np.split(logprobs, np.cumsum(sizes)[:-1]))
    out = [[next(parts) for _ in run] for run in hidden]
    del model, weights, hidden
    release_memory()  # what torch freed, back to the system before llama.cpp maps a model beside it
    return out


def _empty_model(hf_dir: Path, adapter_dir: Optional[Path]):
    """(the model without weights but its buffers, with the adapter loaded; its Checkpoint)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(model, adapter_dir, low_cpu_mem_usage=True)
        _load_adapter(model, adapter_dir)
    model.eval()
    weights = Checkpoint(hf_dir, model)
    for name, p in model.named_parameters():  # the small ones (final norm, ...) stay loaded
        if p.is_meta and not any(part in name for part in (".layers.", "embed_tokens", "lm_head")):
            weights.load(name)
    return model, weights


def _load_adapter(model, adapter_dir: Path) -> None:
    """The adapter's tensors into the PEFT model's (left without weights, as the base is): the file
    names them without PEFT's adapter name ("lora_A.weight" for "lora_A.default.weight")."""
    from accelerate.utils import set_module_tensor_to_device
    from peft.utils import load_peft_weights

    from .errors import EdgeloraError

    saved = load_peft_weights(str(adapter_dir), device="cpu")
    for name, p in model.named_parameters():
        if "lora_" in name and p.is_meta:
            key = name.replace(".default", "")
            value = saved.get(key, saved.get(key.removesuffix(".weight")))
            if value is None:
                raise EdgeloraError(f"{adapter_dir}: the adapter holds no {key}")
            set_module_tensor_to_device(model, name, "cpu", value=value.float())


def checkpoint_name(name: str) -> str:
    """The HF checkpoint's name of a parameter of the (PEFT-wrapped) model: PEFT's wrapping taken off."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


class Checkpoint:
    """The base's safetensors, read by parameter name of the (PEFT-wrapped) model being run."""

    def __init__(self, hf_dir: Path, owner):
        from .converters.tensor_index import TensorIndex, model_weight_files

        self.index = TensorIndex(model_weight_files(Path(hf_dir)))
        self.owner = owner  # the model whose parameter names are asked for

    def __contains__(self, name: str) -> bool:
        return checkpoint_name(name) in self.index

    def tensor(self, name: str):
        import torch

        return self.index.load(checkpoint_name(name)).to(torch.float32)

    def load(self, name: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        set_module_tensor_to_device(self.owner, name, "cpu", value=self.tensor(name))

    def drop(self, name: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        set_module_tensor_to_device(self.owner, name, "meta")


@contextlib.contextmanager
def _streamed(modules, weights: Checkpoint):
    """Each of `modules` has its weights read just before it runs and dropped after."""
    names = {id(m): n for n, m in weights.owner.named_modules()}
    handles = []

    def own(module):  # its parameters that the checkpoint holds (an adapter's are loaded already)
        prefix = names[id(module)]
        return [f"{prefix}.{n}" for n, p in module.named_parameters() if "lora_" not in n]

    def read(module, _args) -> None:
        for name in own(module):
            weights.load(name)

    def drop(module, _args, _out) -> None:
        for name in own(module):
            weights.drop(name)

    for module in modules:
        handles += [module.register_forward_pre_hook(read), module.register_forward_hook(drop)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _hidden_at(decoder, rows: Sequence):
    """The decoder's last hidden states at each row's positions, the rows run a pass at a time."""
    import torch

    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    found: dict[int, object] = {}
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(rows[order[end]][0]) <= TOKENS_PER_PASS:
            end += 1
        chunk = order[start:end]
        width = len(rows[chunk[-1]][0])
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for k, i in enumerate(chunk):
            ids[k, :len(rows[i][0])] = torch.tensor(rows[i][0])
            mask[k, :len(rows[i][0])] = 1
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        for k, i in enumerate(chunk):
            found[i] = hidden[k, torch.as_tensor(rows[i][1])]
        start = end
    return [found[i] for i in range(len(rows))]


def _output_head(model, weights: Checkpoint):
    """rows of hidden states -> log-probabilities (numpy): the output weights (the embedding's
    where they are tied) read for the call, the final logit soft-capping where the model has it."""
    import torch

    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    head = next(n for n in names if n.endswith("lm_head.weight"))
    tied = next(n for n in names if n.endswith("embed_tokens.weight"))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)

    def apply(hidden):
        logits = hidden @ weights.tensor(head if head in weights else tied).T
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1).numpy()

    return apply
