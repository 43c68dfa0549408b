"""`edgelora doctor FILE.gguf`: the export's checks (edgelora.verify) for any GGUF, edgelora's or not.

Always, from the file alone:
    tokenizer       tokenizer.ggml.model and, for a BPE vocabulary, the pre-tokenizer are given
    special_tokens  every special token id (bos, eos, eot, ...) is inside the vocabulary
    loads           the installed llama.cpp loads it (architecture known, tensors as it expects),
                    with the LoRA if one is given
    chat_template   present, and renders a conversation (a base model without one: plain
                    completion only, which is said, not failed)
    lora_base       (--lora) the LoRA was made for this base: the base sha256 it records
                    (edgelora.base_model.sha256) is this file's, or the one this base conversion records
    stops           a greedy answer to a greeting ends by itself (without --data)

With --data FILE.jsonl (chat examples; the first 8 are used): end_of_turn, bos and stops on them,
and with --base (the HF model or edgelora run the file came from) template (its tokenizer's ids
against the GGUF's, token for token) and logits (against the model in torch; a run: with its
adapter, and `adapter`, that the file is the fine-tune and not the base; and `refit`, for a --lora
that export --refit fitted to this very file: llama.cpp runs the pair as torch runs the refit
model made from the two files).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import card as C
from . import verify as V
from .errors import EdgeloraError

SPECIAL = ("bos", "eos", "eot", "eom", "pad", "unk", "sep", "mask")  # tokenizer.ggml.<x>_token_id
GREETING = [{"role": "user", "content": "Hello! Who are you?"}]
GREETING_TOKENS = 128
QUANTISED_KL, QUANTISED_TOP1 = 0.1, 0.8  # logits bounds for a file under 8 bits per weight


@dataclass
class Diagnosis:
    info: dict  # edgelora.gguf_info's summary of the file
    checks: list[V.Check]

    @property
    def healthy(self) -> bool:
        return all(c.passed for c in self.checks)

    def as_dict(self) -> dict:
        return {"file": self.info["path"], "arch": self.info["arch"], "name": self.info["name"],
                "card": self.info["card"], "healthy": self.healthy, "checks": [c.as_dict() for c in self.checks]}


def diagnose(path: Path, *, lora: Optional[Path] = None, data: Optional[Path] = None,
             base: Optional[Path] = None) -> Diagnosis:
    """Every check that applies to `path` (with `lora` applied) and the given data and base."""
    from .gguf_info import inspect_gguf, read_gguf
    from .runtime import load

    info = inspect_gguf(path)
    if info["type"] == "adapter":
        raise EdgeloraError(f"{path} is a LoRA adapter: run doctor on its base, with --lora {path}")
    if base is not None and data is None:
        raise EdgeloraError("--base compares on examples: give --data FILE.jsonl too")
    reader = read_gguf(path)
    checks = [_tokenizer(reader), _special_tokens(reader, info["vocab_size"])]
    if lora is not None:
        checks += _lora_base(path, info, lora)
    try:
        rt = load(path, loras=[(lora, 1.0)] if lora else (), device="cpu", sequences=V.EXAMPLES)  # stops: together
    except EdgeloraError as e:
        return Diagnosis(info, checks + [V.Check("loads", False, str(e))])
    import llama_cpp

    checks.append(V.Check("loads", True, f"llama.cpp {llama_cpp.__version__} loads it: {info['arch']}, "
                                         f"{rt.llm.n_vocab()} tokens" + (f", LoRA {lora.name} applied" if lora else "")))
    checks.append(_chat_template(rt))
    if not checks[-1].passed:  # every check after this one renders a conversation
        return Diagnosis(info, checks)
    if data is None:
        if rt.chat_template is not None:
            text, finish = rt.chat_finish(GREETING, max_tokens=GREETING_TOKENS)
            checks.append(V.Check("stops", finish == "stop", f"a greedy answer to {GREETING[0]['content']!r} "
                                  + ("ends by itself" if finish == "stop" else f"runs to the limit of {GREETING_TOKENS}"
                                     f" tokens: {text[:60]!r}...")))
        return Diagnosis(info, checks)
    return Diagnosis(info, checks + _on_data(rt, path, info, lora, data, base))


def _on_data(rt, path: Path, info: dict, lora: Optional[Path], data: Path, base: Optional[Path]) -> list[V.Check]:
    """end_of_turn, bos, stops on the first examples of `data`; template and logits with `base`."""
    from . import data as D
    from .klprobe import KLProbe

    examples = [ex for ex in D.read_jsonl(data)[0] if ex.messages][:V.EXAMPLES]
    if not examples:
        raise EdgeloraError(f"{data}: no chat or instruction examples to check the template on")
    if rt.chat_template is None:
        return V.token_checks(rt, examples, [None] * len(examples), None)  # the one check: no template
    hf_dir, adapter = _base_model(base) if base is not None else (None, None)
    if hf_dir is not None:  # the ids training made: the HF tokenizer and its chat template
        from .hf_model import load_tokenizer

        tok = load_tokenizer(adapter or hf_dir)
        D.ensure_chat_template(tok)
        trained = [D.tokenize_example(tok, ex) for ex in examples]
    else:  # the GGUF's own rendering: no template comparison, but its end of turn, BOS and stopping
        trained = [_as_trained(rt, ex) for ex in examples]
    checks = V.token_checks(rt, examples, trained, None)
    if hf_dir is None:
        checks = [c for c in checks if c.name != "template"]
        return checks + [V.stop_check(rt, examples, trained, None)]
    with tempfile.TemporaryDirectory() as scratch:
        probe = KLProbe(path, [(t.input_ids, t.labels) for t in trained], Path(scratch), max_positions=V.POSITIONS,
                        loras=[(lora, 1.0)] if lora else ())
    reference = V.trained_model(hf_dir, adapter, probe.rows, trained)
    bounds = {} if info["bpw"] >= 8 else {"kl_max": QUANTISED_KL, "top1_min": QUANTISED_TOP1}
    checks += [V.stop_check(rt, examples, trained, reference.stopped)] + V.logits_checks(probe, reference, **bounds)
    from .gguf_info import inspect_gguf

    if lora is not None and adapter is not None and C.REFIT_QUANT in inspect_gguf(lora)["card"]:
        checks.append(_refit(probe, path, lora, hf_dir, adapter))
    return checks


def _refit(probe, path: Path, lora: Path, hf_dir: Path, adapter: Path) -> V.Check:
    """`refit`: a LoRA refitted against this quantised base (export --refit), run by llama.cpp, against
    the refit model in torch made from the two files alone: this file's weights as ggml reads them
    and the LoRA's A and B, with the run's adapter config (edgelora.refit)."""
    from . import refit as R
    from .layerwise import answer_logprobs

    with tempfile.TemporaryDirectory() as scratch:
        base = R.dequantised_folder(path, hf_dir, adapter, Path(scratch) / "base")
        refitted = R.adapter_from_gguf(lora, hf_dir, adapter, Path(scratch) / "adapter")
        [in_torch] = answer_logprobs(base, refitted, probe.rows)
    return V.refit_check(probe, in_torch, path, lora)


def _as_trained(rt, ex):
    """A data.Tokenized of `ex` as the GGUF renders it: the last answer labelled."""
    from . import data as D

    last = D.last_answer(ex.messages)
    prompt, answer = rt.chat_tokens(ex.messages[:last], ex.messages[last]["content"])
    return D.Tokenized(prompt + answer, [D.IGNORE] * len(prompt) + answer)


def _base_model(base: Path) -> tuple[Path, Optional[Path]]:
    """(HF folder, adapter folder or None) of --base: an HF model folder or an edgelora run."""
    from .bases import base_hash, materialise, resolve_base
    from .handoff import RunSummary, finished_run

    if finished_run(base):
        resolved = resolve_base(RunSummary.read(base).base)
        return materialise(resolved, base_hash(resolved)), base / "adapter"
    if not (base / "config.json").is_file():
        raise EdgeloraError(f"--base {base}: neither an HF model folder (config.json) nor a finished edgelora run (adapter/, summary.json)")
    return base, None


def _tokenizer(reader) -> V.Check:
    import gguf

    from .gguf_info import field_value

    model, pre = field_value(reader, gguf.Keys.Tokenizer.MODEL), field_value(reader, gguf.Keys.Tokenizer.PRE)
    if model is None:
        return V.Check("tokenizer", False, "no tokenizer.ggml.model: llama.cpp cannot tokenise with this file")
    if model == "gpt2" and pre in (None, "default"):
        return V.Check("tokenizer", False, f"BPE vocabulary without a pre-tokenizer (tokenizer.ggml.pre is {pre!r}): "
                                           "llama.cpp splits text its default way, unlike the model's own tokenizer")
    return V.Check("tokenizer", True, f"{model}" + (f", pre-tokenizer {pre}" if pre else ""))


def _special_tokens(reader, n_vocab: Optional[int]) -> V.Check:
    from .gguf_info import field_value

    ids = {name: field_value(reader, f"tokenizer.ggml.{name}_token_id") for name in SPECIAL}
    found = {name: int(token) for name, token in ids.items() if token is not None}
    for name, token in found.items():
        if n_vocab is None or not 0 <= token < n_vocab:
            return V.Check("special_tokens", False, f"tokenizer.ggml.{name}_token_id {token} is outside the "
                                                    f"vocabulary of {n_vocab} tokens")
    if "eos" not in found:
        return V.Check("special_tokens", False, "no tokenizer.ggml.eos_token_id")
    return V.Check("special_tokens", True, ", ".join(f"{k} {v}" for k, v in found.items()))


def _chat_template(rt) -> V.Check:
    """Renders a conversation with a system message, or (a template may refuse those) without one;
    a template that fails (edgelora.templates: sandboxed, bounded) is a failed check, not an error."""
    from .templates import TemplateError

    if rt.chat_template is None:
        return V.Check("chat_template", True, "none: plain completion only (chat in Ollama or LM Studio needs a template)")
    try:
        rt.chat_text([{"role": "system", "content": "S"}, *GREETING])
        return V.Check("chat_template", True, "renders a conversation")
    except TemplateError as e:
        if not e.refused:
            return V.Check("chat_template", False, f"cannot render a conversation: {e}")
        refusal = e
    try:
        rt.chat_text(GREETING)
    except TemplateError as e:
        return V.Check("chat_template", False, f"cannot render a conversation: {e}")
    return V.Check("chat_template", True, f"renders a conversation without a system message ({refusal})")


def _lora_base(path: Path, info: dict, lora: Path) -> list[V.Check]:
    """lora_base where the LoRA records its base's sha256 (edgelora writes it); nothing otherwise."""
    from .gguf_info import inspect_gguf
    from .bases import file_sha256

    wanted = inspect_gguf(lora)["card"].get(C.BASE_SHA256)
    if wanted is None:
        return []
    own, recorded = file_sha256(path), info["card"].get(C.BASE_SHA256)
    if wanted == own or (wanted == recorded and not info["card"].get(C.K.FINETUNE)):
        return [V.Check("lora_base", True, f"the LoRA was made for this base (sha256 {wanted[:12]})")]
    origin = "" if recorded is None else f", {'a fine-tune' if info['card'].get(C.K.FINETUNE) else 'a conversion'} " \
                                         f"of {recorded[:12]}"
    return [V.Check("lora_base", False, f"the LoRA was made for the base with sha256 {wanted[:12]}; {path.name} is "
                                        f"{own[:12]}{origin}")]
