"""Datasets: JSONL in three shapes (chat, instruction, text), validated line by line,
rendered through the base model's chat template and tokenised with completion-only labels.

No torch here: examples become lists of token ids and labels (-100 = not trained on).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import EdgeloraError

IGNORE = -100
SHAPES = ("chat", "instruction", "text")
ROLES = ("system", "user", "assistant")
REASONING = "reasoning_content"  # an assistant message's reasoning, as Qwen3's / DeepSeek-R1's templates read it

# Used when a base model's tokenizer has no chat template of its own (plain base models).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# For a base without a chat template, the first of these whose turn markers are single tokens of its
# vocabulary; the last (ChatML markup, each turn closed by the base's own EOS) fits any vocabulary.
# Either way a turn ends with a token llama.cpp treats as end of generation, so answers stop.
FALLBACK_TEMPLATES = {
    "ChatML": (("<|im_start|>", "<|im_end|>"), CHATML_TEMPLATE),
    "Gemma": (("<start_of_turn>", "<end_of_turn>"), (  # a system message opens the first user turn
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<start_of_turn>user\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' and loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' %}"
        "{{ message['content'] + '<end_of_turn>\n' }}"
        "{% else %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' "
        "+ message['content'] + '<end_of_turn>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")),
    "ChatML closed by EOS": ((), CHATML_TEMPLATE.replace("<|im_end|>", "{EOS}")),  # {EOS}: the base's EOS text
}


@dataclass
class Example:
    source: str  # "file:line", for error messages
    messages: list[dict] | None = None  # chat and instruction data
    text: str | None = None  # text data


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass
class TokenStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing left to train on after truncation
    tokens: int = 0
    target_tokens: int = 0
    dropped_sources: list[str] = field(default_factory=list)


def detect_shape(record: dict) -> str | None:
    if "messages" in record:
        return "chat"
    if "instruction" in record or "output" in record:
        return "instruction"
    if "text" in record:
        return "text"
    return None


def read_jsonl(path: str | Path, shape: str = "auto") -> tuple[list[Example], str]:
    """Read and validate a JSONL file; the shape is detected from its first record unless given."""
    path = Path(path)
    if not path.is_file():
        raise EdgeloraError(f"{path}: data file not found")
    examples: list[Example] = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named, not a traceback
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a leading BOM is fine
            except UnicodeDecodeError as e:
                raise EdgeloraError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgeloraError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise EdgeloraError(f"{where}: JSON nested too deeply") from None
            if not isinstance(record, dict):
                raise EdgeloraError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
            if shape == "auto":
                shape = detect_shape(record) or _unknown_shape(where, record)
            examples.append(_parse(record, shape, where))
    if not examples:
        raise EdgeloraError(f"{path}: empty data file (no JSON lines)")
    return examples, shape


def _unknown_shape(where: str, record: dict):
    keys = ", ".join(sorted(record)) or "none"
    raise EdgeloraError(
        f"{where}: cannot tell the data shape (keys: {keys}); expected 'messages' (chat), "
        "'instruction'/'output' (instruction) or 'text'"
    )


def _need_str(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if value is None:
        raise EdgeloraError(f"{where}: missing field '{key}'")
    if not isinstance(value, str):
        raise EdgeloraError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _parse(record: dict, shape: str, where: str) -> Example:
    if shape == "text":
        text = _need_str(record, "text", where)
        if not text.strip():
            raise EdgeloraError(f"{where}: field 'text' is empty")
        return Example(where, text=text)
    if shape == "instruction":
        instruction = _need_str(record, "instruction", where)
        extra = _need_str(record, "input", where, optional=True)
        output = _need_str(record, "output", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(where, messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise EdgeloraError(f"{where}: field 'messages' must be a non-empty list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise EdgeloraError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise EdgeloraError(f"{where}: messages[{i}] has role '{m['role']}'; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise EdgeloraError(f"{where}: messages[{i}].content must be a string")
        if m["role"] == "system" and i != 0:
            raise EdgeloraError(f"{where}: messages[{i}]: a system message may only come first")
        clean.append({"role": m["role"], "content": m["content"]})
        if m.get(REASONING) is not None:
            if m["role"] != "assistant" or not isinstance(m[REASONING], str):
                raise EdgeloraError(f"{where}: messages[{i}].{REASONING} must be a string on an assistant message")
            clean[-1][REASONING] = m[REASONING]
    if not any(m["role"] == "assistant" for m in clean):
        raise EdgeloraError(f"{where}: no assistant message to learn from")
    return Example(where, messages=clean)


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A fixed-seed held-out split; at least one example on each side."""
    if fraction <= 0:
        return examples, []
    if len(examples) < 2:
        raise EdgeloraError("eval split needs at least 2 examples")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def ensure_chat_template(tokenizer) -> Optional[str]:
    """Give a tokenizer without a chat template the first of FALLBACK_TEMPLATES its vocabulary
    holds the markers of as single tokens. Returns the name of the one added, None if it had one."""
    if getattr(tokenizer, "chat_template", None):
        return None
    for name, (markers, template) in FALLBACK_TEMPLATES.items():
        if all(_single_token(tokenizer, m) for m in markers):
            tokenizer.chat_template = template.replace("{EOS}", (tokenizer.eos_token or "").replace("'", "\\'"))
            return name
    raise AssertionError("the last fallback template needs no markers")


# Qwen3's and SmolLM3's templates switch the model's reasoning with `enable_thinking`: unset, the
# assistant turn is left open for a <think> block; false, it opens with an empty one (the no-think
# variant). Put in front of such a template, this makes no-think the default.
NO_THINK = "{%- if enable_thinking is not defined %}{%- set enable_thinking = false %}{%- endif %}"


def default_to_no_think(tokenizer, examples: list[Example]) -> bool:
    """For data without reasoning (no <think> in any answer, no reasoning_content), make a thinking
    template's default the no-think variant: training then renders the turns the model answers
    directly after, and the run's template, which the GGUF and Modelfile carry, renders the same
    prompt. Returns whether the template was changed."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or "enable_thinking" not in template or template.startswith(NO_THINK):
        return False
    if any(_reasoned(ex) for ex in examples):
        return False
    tokenizer.chat_template = NO_THINK + template
    return True


def last_answer(messages: list[dict]) -> int:
    """The index of the last assistant message (the answer scored, verified and checked)."""
    return max(i for i, m in enumerate(messages) if m["role"] == "assistant")


def answer_limit(trained_tokens: int) -> int:
    """The most tokens a greedy answer may take where the trained answer took `trained_tokens`:
    twice as many, + 16 (room to differ, and to show an answer that does not stop)."""
    return 2 * trained_tokens + 16


def _reasoned(ex: Example) -> bool:
    return any(REASONING in m or "<think>" in m["content"] for m in ex.messages or () if m["role"] == "assistant")


def _single_token(tokenizer, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return the character spans the model should learn.

    For each assistant turn i, the template rendered up to turn i with a generation prompt is
    a prefix of the rendering that includes turn i; the difference is the answer plus its
    end-of-turn marker. Templates that break that property fall back to locating the content.
    """
    full = _render(tokenizer, messages)
    spans = []
    search_from = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1])
        if upto.startswith(prompt) and full.startswith(upto):
            spans.append((len(prompt), len(upto)))
            search_from = len(upto)
        else:
            start = full.find(m["content"], search_from)
            if start < 0:
                raise EdgeloraError("the chat template does not reproduce assistant messages verbatim")
            spans.append((start, start + len(m["content"])))
            search_from = start + len(m["content"])
    return full, spans


def tokenize_example(tokenizer, ex: Example) -> Tokenized:
    if ex.text is not None:
        ids = tokenizer(ex.text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        return Tokenized(ids, list(ids))
    text, spans = assistant_spans(tokenizer, ex.messages)
    # The last answer's reasoning must be rendered, else it would be trained on without it (Qwen3's
    # template writes it as the answer's <think> block; earlier turns' it leaves out, by design).
    reasoning = ex.messages[last_answer(ex.messages)].get(REASONING, "")
    if reasoning.strip() and reasoning not in text:
        raise EdgeloraError(f"{ex.source}: has {REASONING}, which this base's chat template does not render; "
                            "put the reasoning in the answer (e.g. <think>...</think>) or drop the field")
    # The template writes any BOS itself; don't let the tokenizer add another.
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE] * len(ids)
    for j, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[j] = ids[j]
    return Tokenized(ids, labels)


def tokenize_all(tokenizer, examples: list[Example], seq_len: int, what: str = "data") -> tuple[list[Tokenized], TokenStats]:
    """Tokenise, truncate to seq_len (counted, never silent) and drop examples left with no targets."""
    out, stats = [], TokenStats(examples=len(examples))
    for ex in examples:
        t = tokenize_example(tokenizer, ex)
        if len(t.input_ids) > seq_len:
            stats.truncated += 1
            t = Tokenized(t.input_ids[:seq_len], t.labels[:seq_len])
        if t.n_targets < 1 or len(t.input_ids) < 2:
            stats.dropped += 1
            stats.dropped_sources.append(ex.source)
            continue
        stats.tokens += len(t.input_ids)
        stats.target_tokens += t.n_targets
        out.append(t)
    if not out:
        raise EdgeloraError(
            f"{what}: all {len(examples)} examples were truncated away at --seq-len {seq_len} "
            f"(no answer tokens left; first: {stats.dropped_sources[0]}); raise --seq-len"
        )
    return out, stats
