"""Scoring: the eval set, the task score of generated answers (exact, contains, regex, JSON
fields), and the next-token comparison with the reference (perplexity, KL, top-1)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..data import REASONING, last_answer, read_jsonl
from ..errors import EdgeloraError
from ..logprobs import log_softmax


SCORES = ("auto", "exact", "contains", "regex", "json")


def read_eval(path: str, limit: Optional[int] = None) -> list[dict]:
    """Eval examples as {"messages": prompt turns, "answer": the last assistant turn, "reasoning":
    its reasoning_content, or ""}."""
    examples, shape = read_jsonl(path)
    if shape == "text":
        raise EdgeloraError(f"{path}: bench needs chat or instruction examples (a prompt and its answer), not text")
    rows = []
    for ex in examples:
        msgs = ex.messages
        last = last_answer(msgs)
        rows.append({"source": ex.source, "messages": msgs[:last], "answer": msgs[last]["content"],
                     "reasoning": msgs[last].get(REASONING, "")})
    return rows[:limit] if limit else rows


def final_answer(text: str) -> str:
    """What a reasoning model answers after its <think> ... </think> block; the text itself otherwise."""
    return text.rpartition("</think>")[2].lstrip() if "</think>" in text else text


def make_scorer(mode: str = "exact", pattern: Optional[str] = None) -> Callable[[str, str], float]:
    """(generated, reference) -> score in [0, 1]. exact: equal after stripping whitespace;
    contains: the reference occurs in the output; regex: PATTERN's first match (group 1 if it has
    groups) is found in both and is the same; json: the share of the reference's fields (leaf
    values, by path) the output has, equal in type and value (json_fields)."""
    if mode not in SCORES or mode == "auto":
        raise EdgeloraError(f"unknown score '{mode}' (choose from {', '.join(SCORES)})")
    if mode == "exact":
        return lambda out, ref: float(out.strip() == ref.strip())
    if mode == "contains":
        return lambda out, ref: float(ref.strip() in out)
    if mode == "json":
        return lambda out, ref: json_fields(out, ref)[2]
    if not pattern:
        raise EdgeloraError("--score regex needs --pattern")
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise EdgeloraError(f"--pattern {pattern!r}: {e}") from None

    def key(text: str):
        m = rx.search(text)
        return None if m is None else m.group(1 if rx.groups else 0)

    return lambda out, ref: float((k := key(out)) is not None and k == key(ref))


def pick_score(score: str, rows: list[dict]) -> str:
    """--score auto: json when every reference answer is a JSON object or array, else exact;
    --score json: every reference answer must be JSON (the first that is not is named)."""
    if score not in ("auto", "json"):
        return score
    for r in rows:
        if not isinstance(_json_or_none(r["answer"]), (dict, list)):
            if score == "auto":
                return "exact"
            raise EdgeloraError(f"--score json: the reference answer at {r['source']} is not a JSON object or array")
    return "json"


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _leaves(value, path: tuple = ()) -> Iterator[tuple[tuple, object]]:
    """(path, value) of every leaf: scalars, and empty objects / arrays."""
    if not isinstance(value, (dict, list)) or not value:
        yield path, value
        return
    for key, child in value.items() if isinstance(value, dict) else enumerate(value):
        yield from _leaves(child, (*path, key))


def _same(a, b) -> bool:
    """JSON equality by type: 1952 != "1952", true != 1; 2 == 2.0 (both numbers)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def json_fields(out: str, ref: str) -> tuple[bool, bool, float]:
    """(the output is valid JSON, it equals the reference structurally, the share of the
    reference's leaf fields it has with the same type and value)."""
    parsed = _json_or_none(out.strip())
    if parsed is None and out.strip() != "null":
        return False, False, 0.0
    want, got = dict(_leaves(json.loads(ref))), dict(_leaves(parsed))
    right = sum(1 for path, value in want.items() if path in got and _same(got[path], value))
    return True, right == len(want) == len(got), right / len(want)


def task_result(mode: str, pattern: Optional[str], answers: list[str], rows: list[dict]) -> dict:
    """The task score of `answers` against the rows' references (the mean of make_scorer's); for
    json also the shares of valid JSON and of exact structural matches."""
    answers = [final_answer(a) for a in answers]
    if mode == "json":
        valid, exact, fields = zip(*(json_fields(a, r["answer"]) for a, r in zip(answers, rows)))
        return {"task_score": sum(fields) / len(rows), "json_valid": sum(valid) / len(rows),
                "json_exact": sum(exact) / len(rows)}
    score = make_scorer(mode, pattern)
    return {"task_score": sum(score(a, r["answer"]) for a, r in zip(answers, rows)) / len(rows)}


class Compare:
    """Scores next-token logits at every answer position: the answers' negative log-likelihood
    (-> perplexity), and against the reference, whose log-probabilities it writes to a scratch
    file that the others read: mean KL(ref || model) and top-1 agreement."""

    def __init__(self, scratch: Path, reference: bool, n_positions: int, n_vocab: int):
        import numpy as np

        self.np, self.reference, self.row = np, reference, 0
        shape = (n_positions, n_vocab)
        path = scratch / "ref-logprobs.f32"
        if not reference and not path.is_file():
            raise EdgeloraError("the reference model's log-probabilities are missing")
        self.ref = np.lib.format.open_memmap(path, mode="w+" if reference else "r", dtype=np.float32, shape=shape)
        if self.ref.shape != shape:
            raise EdgeloraError(f"answer positions x vocabulary {shape} differ from the reference's {self.ref.shape}")
        self.nll, self.kl_sum, self.agree = 0.0, 0.0, 0

    def add(self, logits, answer: list[int]) -> None:
        """`logits`: one row per answer token, each predicting that token."""
        np = self.np
        logprobs = log_softmax(logits)
        self.nll -= float(logprobs[np.arange(len(answer)), answer].sum())
        rows = slice(self.row, self.row + len(logprobs))
        if self.reference:
            self.ref[rows] = logprobs
        else:  # both sides rounded to the float32 the reference is stored in: a file against its copy gives 0
            ref = np.asarray(self.ref[rows], dtype=np.float64)
            logprobs = logprobs.astype(np.float32).astype(np.float64)
            self.kl_sum += float((np.exp(ref) * (ref - logprobs)).sum())
            self.agree += int((ref.argmax(-1) == logprobs.argmax(-1)).sum())
        self.row += len(logprobs)

    def result(self) -> dict:
        """perplexity, kl and top1 over all the answer tokens added."""
        perplexity = capped_exp(self.nll / self.row)
        if self.reference:
            self.ref.flush()
            return dict(perplexity=perplexity, kl=0.0, top1=1.0)
        return dict(perplexity=perplexity, kl=self.kl_sum / self.row, top1=self.agree / self.row)


def capped_exp(x: float) -> float:
    import math

    return math.exp(min(x, 700.0))


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds else 0.0
