"""Does an exported GGUF read the user's own examples the way training did? (issue #13)

The failures llama.cpp, Ollama and LM Studio users meet most with a fine-tuned GGUF raise no
error: a chat template that renders differently from training (gibberish), an end-of-turn token
the runtime does not stop on (answers that never end), a doubled BOS, a merge that lost the
fine-tune, a LoRA applied to the wrong base. Each check here runs a few of the run's training
examples through llama.cpp, as `edgelora run` and llama-cpp-python apply it, and compares with
what training used or the model it trained:

    template     prompt + answer, rendered from the GGUF and tokenised by llama.cpp, equal the
                 training ids token for token
    end_of_turn  the token training taught the model to end its answer with is in llama.cpp's
                 end-of-generation set, and in the Modelfile's stop list
    bos          the prompt does not start with two BOS tokens
    logits       the f16 GGUF's next-token distributions at the answers' positions match the HF
                 base + adapter in torch (KL and top-1 agreement)
    adapter      ... and the adapter moves them: the base without it is measurably further away
    lora_route   the base GGUF + LoRA GGUF is closer to the merged f16 than the base alone
    refit        a quantised base GGUF + the LoRA GGUF refitted against it (edgelora.refit) match
                 the refit model in torch (KL and top-1 agreement, as for the f16)
    stops        greedy answers of the file end with an end-of-generation token, not the length
                 limit, about as often as the model in torch stops (a model that never learnt to
                 stop is not the export's fault)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from .data import IGNORE, answer_limit, last_answer
from .errors import EdgeloraError
from .llamacpp import handles

EXAMPLES = 8  # training examples checked: the first ones in the training order
NAMES = ("template", "end_of_turn", "bos", "logits", "adapter", "lora_route", "refit", "stops")
POSITIONS = 512  # answer positions the logits checks compare, at most
KL_SAME = 0.01  # f16 GGUF vs the model in torch: f16 rounding alone gives ~1e-5 on SmolLM2
TOP1_SAME = 0.95
MOVED = 4.0  # the adapter must move the distributions this many times further than f16 rounding does
ROUTE_SHARE = 0.5  # the LoRA must close at least half the base file's distance to the merged f16
STOPPED_SHARE = 0.5  # a file must stop at least half as often as the model in torch


@dataclass
class Check:
    name: str
    passed: bool
    figure: str  # what was measured; on a failure, the example and what differed

    def as_dict(self) -> dict:
        return asdict(self)


def token_checks(rt, examples: Sequence, trained: Sequence, stops: Optional[list[str]]) -> list[Check]:
    """The three token checks of `rt` (an edgelora Runtime) on chat `examples` (data.Example) and
    the ids training made of them (data.Tokenized). `stops`: the Modelfile's stop strings (None:
    no Modelfile stop list to check)."""

    pairs = [(ex, t) for ex, t in zip(examples, trained) if ex.messages]
    if not pairs:
        return [Check(name, True, "not applicable: text data has no chat template")
                for name in ("template", "end_of_turn", "bos")]
    if rt.chat_template is None:
        return [Check("template", False, "the GGUF has no chat template (tokenizer.chat_template)")]
    bos = rt.llm.token_bos()

    def piece(token: int) -> str:
        return rt.llm.detokenize([token], special=True).decode("utf-8", "replace")

    template = Check("template", True, f"{len(pairs)} training examples render to their training token ids")
    doubled = Check("bos", True, "no doubled BOS")
    ends, inside = set(), {}  # the answers' end tokens; token -> an example it occurs in before the end
    for ex, t in pairs:
        last = last_answer(ex.messages)
        prompt, answer = rt.chat_tokens(ex.messages[:last], ex.messages[last])
        got, want = prompt + answer, list(t.input_ids)
        diff = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]),
                    None if len(got) <= len(want) else len(want))
        if template.passed and diff is not None:
            def shown(ids):
                return f"{piece(ids[diff])!r} ({ids[diff]})" if diff < len(ids) else "the end"
            template = Check("template", False, f"{ex.source}: token {diff} is {shown(got)} in the GGUF's rendering, "
                                                f"{shown(want)} in training")
        # llama.cpp's own tools (llama-server, llama-cli) tokenise the rendered prompt adding the BOS
        # the GGUF asks for (tokenizer.ggml.add_bos_token): doubled if the template writes one too
        as_served = rt.llm.tokenize(rt.chat_text(ex.messages[:last]).encode(), add_bos=True, special=True)
        if doubled.passed and bos != -1 and as_served[:2] == [bos, bos]:
            doubled = Check("bos", False, f"{ex.source}: the prompt starts with {piece(bos)!r} twice: the template "
                                          "writes it and the GGUF asks llama.cpp to add it (add_bos_token)")
        end = trained_end(t, piece)
        if end is not None:
            ends.add(end)
            answer = [want[i] for i, label in enumerate(t.labels) if label != IGNORE]
            for token in answer[:answer.index(end)]:
                inside.setdefault(token, ex.source)
    return [template, _end_of_turn(sorted(ends), inside, piece, handles(rt.llm)[2], stops), doubled]



@dataclass
class Trained:
    """What the model as trained (HF base + adapter in torch) does on the examples: the reference
    of the logits, adapter and stops checks."""

    tuned: list  # log-probabilities at the probe's answer positions, with the adapter
    base: Optional[list]  # ... without it (None: no adapter)
    stopped: list[bool]  # per chat example: its greedy answer ended with an end-of-turn token


def trained_model(hf_dir: Path, adapter_dir: Optional[Path], rows: Sequence, trained: Sequence,
                  f16: Optional[Path] = None) -> Trained:
    """What the HF model (float32, CPU, a decoder layer at a time: edgelora.layerwise) computes with
    and without the adapter at `rows`' positions ((token ids, positions) pairs), and whether its
    greedy answer to each `trained` example's prompt (data.Tokenized) ends, within answer_limit
    tokens, with a token the trained answers end with. Those answers are the `f16` GGUF's where it
    is given (this model to f16 rounding, which the logits check shows: no second model in memory),
    else generated in torch by the model loaded whole."""
    from .hf_model import load_tokenizer
    from .layerwise import answer_logprobs

    tuned, *base = answer_logprobs(hf_dir, adapter_dir, rows, adapter=(True, False) if adapter_dir else (True,))
    tok = load_tokenizer(adapter_dir or hf_dir)
    ends = sorted({e for t in trained if (e := trained_end(t, lambda i: tok.decode([i]))) is not None})
    starts = [(t, next((i for i, x in enumerate(t.labels) if x != IGNORE), 0)) for t in trained]
    answered = [(t.input_ids[:start], answer_limit(t.n_targets))  # chat only
                for t, start in starts if start > 0 and ends]
    if not answered:
        answers = []
    elif f16 is not None:
        from .runtime import greedy_answers

        answers = greedy_answers(f16, *map(list, zip(*answered)))
    else:
        answers = _torch_answers(hf_dir, adapter_dir, answered, ends)
    return Trained(tuned, base[0] if base else None, [bool(a) and a[-1] in ends for a in answers])


def _torch_answers(hf_dir: Path, adapter_dir: Optional[Path], answered: list, ends: list[int]) -> list[list[int]]:
    """Greedy answers of the HF model + adapter in torch to (prompt ids, limit) pairs."""
    import torch

    from .hf_model import load_with_adapter

    model = load_with_adapter(hf_dir, adapter_dir)
    out = []
    with torch.no_grad():
        for prompt, limit in answered:
            ids = torch.tensor([prompt])
            out.append(model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=limit,
                                      do_sample=False, eos_token_id=ends, pad_token_id=ends[0])[0, len(prompt):].tolist())
    return out


def trained_end(t, piece) -> Optional[int]:
    """The token a trained example (data.Tokenized)'s answer ends with: its last labelled token that
    is not the newline after it (`piece`: token id -> text)."""
    labelled = [i for i, label in enumerate(t.labels) if label != IGNORE and piece(t.input_ids[i]).strip()]
    return t.input_ids[labelled[-1]] if labelled else None


def logits_checks(probe, reference: Trained, kl_max: float = KL_SAME, top1_min: float = TOP1_SAME) -> list[Check]:
    """`logits` and `adapter`: `probe` (klprobe.KLProbe on the f16 GGUF over the examples' answer
    positions) against the model in torch, with the adapter and (for `adapter`) without it."""
    kl, top1 = probe.against(reference.tuned)
    where = f"{sum(len(rows) for _, rows in probe.rows)} answer positions of {len(probe.rows)} training examples"
    model = "the HF base + adapter" if reference.base is not None else "the HF model"
    checks = [_same("logits", kl, top1, f"with {model} in torch at {where}", kl_max, top1_min)]
    if reference.base is not None:
        kl_base, _ = probe.against(reference.base)
        moved = kl_base >= MOVED * kl and kl_base > 0
        checks.append(Check("adapter", moved, f"KL {kl_base:.2g} from the base without the adapter, {kl:.2g} with it"
                            + ("" if moved else ": the adapter changes next to nothing (zero, or lost in the merge)")))
    return checks


def refit_check(probe, in_torch: list, base_file: Path, lora: Path) -> Check:
    """`refit`: the base GGUF + refitted LoRA GGUF in llama.cpp against what they were fitted as, the
    refit model in torch (`in_torch`: its log-probabilities at `probe`'s answer positions;
    klprobe.KLProbe), with the f16 thresholds: what runs is what was trained, up to f16 rounding of
    the LoRA and llama.cpp's arithmetic."""
    from .logprobs import kl_top1

    kl, top1 = kl_top1(in_torch, probe.logprobs(base_file, loras=[(lora, 1.0)]))
    return _same("refit", kl, top1, f"of {base_file.name} + {lora.name} in llama.cpp with the refit model in torch")


def _same(name: str, kl: float, top1: float, what: str, kl_max: float = KL_SAME, top1_min: float = TOP1_SAME) -> Check:
    """Check `name`: two models' next-token distributions agree (KL at most kl_max, top-1 at least top1_min)."""
    same = kl <= kl_max and top1 >= top1_min
    return Check(name, same, f"KL {kl:.2g}, top-1 agreement {top1:.3f} {what}"
                 + ("" if same else f" (at most {kl_max} and at least {top1_min})"))


def lora_route_check(probe, base_file: Path, lora: Path) -> Check:
    """`lora_route`: `probe` (the merged f16) against the base file with the LoRA GGUF, and without."""
    kl, top1 = probe.against(probe.logprobs(base_file, loras=[(lora, 1.0)]))
    kl_base, _ = probe.against(probe.logprobs(base_file))
    closer = kl <= ROUTE_SHARE * kl_base
    return Check("lora_route", closer, f"KL {kl:.2g} (top-1 {top1:.3f}) from the merged f16 with the LoRA on "
                 f"{base_file.name}, {kl_base:.2g} without it" + ("" if closer else
                 ": the LoRA does not bring this base to the fine-tuned model (another base of the same shape?)"))


def stop_check(rt, examples: Sequence, trained: Sequence, stopped_in_torch: Optional[list[bool]]) -> Check:
    """`stops`: greedy answers to the examples' prompts (as `rt`'s chat template renders them) end
    with an end-of-generation token within answer_limit tokens at least STOPPED_SHARE times as often
    as the model in torch stops (None: no model in torch to compare with, so STOPPED_SHARE of the
    answers); where torch stops once, none is enough. The answers are generated together
    (llamacpp.greedy_many: as many at a time as `rt` was loaded with sequences), so a step reads
    the weights once for all of them."""
    import llama_cpp

    from .llamacpp import greedy_many

    pairs = [(ex, t) for ex, t in zip(examples, trained) if ex.messages]
    if not pairs:
        return Check("stops", True, "not applicable: text data has no end of turn")
    limits = [answer_limit(t.n_targets) for _, t in pairs]
    answers = greedy_many(rt.llm, [rt.chat_tokens(ex.messages[:last_answer(ex.messages)])[0] for ex, _ in pairs],
                          limits)
    vocab = handles(rt.llm)[2]
    ended = [bool(a) and llama_cpp.llama_vocab_is_eog(vocab, a[-1]) for a in answers]
    stopped = sum(ended)
    runaway = next((f"; {ex.source} ran to the limit of {limit} tokens"
                    for (ex, _), limit, end in zip(pairs, limits, ended) if not end), None)
    expected = len(pairs) if stopped_in_torch is None else sum(stopped_in_torch)
    # one answer's end is one greedy decision, which quantisation may flip: a single stop in torch
    # is not a share to keep
    passed = stopped >= min(STOPPED_SHARE * expected, expected - 1)
    never = " (the model as trained does not stop either: train longer)" if stopped_in_torch is not None and \
        expected == 0 and stopped < len(pairs) else ""
    return Check("stops", passed, f"{stopped} of {len(pairs)} greedy answers stop by themselves"
                 + ("" if stopped_in_torch is None else f", {expected} in torch") + never
                 + ("" if passed or runaway is None else runaway))


def _end_of_turn(ends: list[int], inside: dict[int, str], piece, vocab, stops: Optional[list[str]]) -> Check:
    import llama_cpp

    for token, source in inside.items():
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            return Check("end_of_turn", False, f"{source}: {piece(token)!r} ({token}) occurs inside the trained answer, "
                                               "and llama.cpp ends generation at it: answers would be cut short")

    for e in ends:
        if not llama_cpp.llama_vocab_is_eog(vocab, e):
            return Check("end_of_turn", False, f"training taught answers to end with {piece(e)!r} ({e}), which "
                                               "llama.cpp does not treat as end of generation: answers would not stop")
        if stops is not None and piece(e) not in stops:
            return Check("end_of_turn", False, f"training taught answers to end with {piece(e)!r} ({e}), which "
                                               "the Modelfile's stop list lacks")
    names = ", ".join(f"{piece(e)!r} ({e})" for e in ends) or "nothing"
    return Check("end_of_turn", True, f"answers end with {names}: end of generation in llama.cpp"
                                      + (" and a Modelfile stop" if stops else ""))


def failed(checks: Sequence[Check], where: Path | str) -> None:
    """EdgeloraError naming the first failed check, the file and what differed; nothing if all passed."""
    bad = [c for c in checks if not c.passed]
    if bad:
        raise EdgeloraError(f"{where}: verification failed: {bad[0].name}: {bad[0].figure}")
