"""Does an exported GGUF read the user's own examples the way training did? (issue #13)

The failures llama.cpp, Ollama and LM Studio users meet most with a fine-tuned GGUF raise no
error: a chat template that renders differently from training (gibberish), an end-of-turn token
the runtime does not stop on (answers that never end), a doubled BOS. Each check here runs a few
of the run's training examples through llama.cpp's tokenizer and the GGUF's own template, as
`edgelora run` and llama-cpp-python apply it, and compares with the token ids training used:

    template     prompt + answer, rendered from the GGUF and tokenised by llama.cpp, equal the
                 training ids token for token
    end_of_turn  the token training taught the model to end its answer with is in llama.cpp's
                 end-of-generation set, and in the Modelfile's stop list
    bos          the prompt does not start with two BOS tokens
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from .errors import EdgeloraError

EXAMPLES = 8  # training examples checked: the first ones in the training order
NAMES = ("template", "end_of_turn", "bos")


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
        return [Check(name, True, "not applicable: text data has no chat template") for name in NAMES]
    if rt.chat_template is None:
        return [Check("template", False, "the GGUF has no chat template (tokenizer.chat_template)")]
    bos = rt.llm.token_bos()

    def piece(token: int) -> str:
        return rt.llm.detokenize([token], special=True).decode("utf-8", "replace")

    template = Check("template", True, f"{len(pairs)} training examples render to their training token ids")
    doubled = Check("bos", True, "no doubled BOS")
    ends = set()
    for ex, t in pairs:
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        prompt, answer = rt.chat_tokens(ex.messages[:last], ex.messages[last]["content"])
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
        labelled = [i for i, label in enumerate(t.labels) if label != -100 and piece(want[i]).strip()]
        if labelled:  # the answer's last token that is not the newline after it
            ends.add(want[labelled[-1]])
    return [template, _end_of_turn(sorted(ends), piece, rt.llm._model.vocab, stops), doubled]



def _end_of_turn(ends: list[int], piece, vocab, stops: Optional[list[str]]) -> Check:
    import llama_cpp

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
