"""What a quantised file costs, measured with llama.cpp on both sides: KLProbe reads a few held-out
training sequences through the f16 GGUF once, then any other GGUF of the same model at the same
answer positions (mean KL, per sequence, or only until the sign of a difference is settled), and
how many of the prompts' greedy answers it gives as the f16 does. The export's search, the size
budget, verification and doctor all measure with it."""
from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Optional

import numpy as np

from .data import IGNORE, answer_limit
from .errors import EdgeloraError
from .logprobs import kl_top1, log_softmax

SETTLED_Z = 3.0  # KLProbe.compare stops reading once a difference is this many standard errors from zero


class KLProbe:
    """Mean KL(f16 || variant) of the next-token distributions at the answer positions of a few
    held-out training sequences, llama.cpp on both sides: what a set of weight types costs."""

    def __init__(self, f16: Path, sequences: list[tuple[list[int], list[int]]], scratch: Path,
                 max_positions: int = 512, loras=()):
        """`sequences`: (token ids, labels) as training tokenised them (labels -100 = not an answer);
        `loras`: (LoRA GGUF, scale) pairs applied to the reference."""
        from .runtime import CTX_STEP, PACKED_CTX

        self.f16, self.scratch, self.rows = f16, scratch, []
        row_of: list[Optional[int]] = []  # per sequence: its index in self.rows (None: no rows read)
        budget = max_positions
        for ids, labels in sequences:
            rows = [j for j in range(len(ids) - 1) if labels[j + 1] != IGNORE][:max(budget, 0)]
            row_of.append(len(self.rows) if rows else None)
            if rows:
                self.rows.append((ids, rows))
                budget -= len(rows)
        if not self.rows:
            raise EdgeloraError("no answer tokens in the calibration examples to measure KL divergence on")
        prompts = [(p, i) for (ids, labels), i in zip(sequences, row_of) if (p := _first_prompt(ids, labels))]
        self.prompts = [p for p, _ in prompts]
        self._row_of_prompt = [i for _, i in prompts]  # each prompt's sequence in self.rows, or None
        longest = max([len(ids) for ids, _ in self.rows] + [len(p) + limit for p, limit in self.prompts])
        self.n_ctx = max(-(-longest // CTX_STEP) * CTX_STEP, PACKED_CTX)
        self.loras = loras
        self.reference = self.logprobs(f16, loras)

    def __call__(self, types: dict[str, str]) -> float:
        """KL of the f16 model with the weights in `types` quantised as given (the rest kept f16)."""
        from .files import temp_name
        from .quantize import quantize

        path = self.scratch / f"{temp_name(Path('probe'))}gguf.tmp"
        preset = {"name": "probe", "llama_ftype": "MOSTLY_Q8_0",
                  "overrides": {**{re.escape(n): t for n, t in types.items()}, ".*": "F16"}}
        try:
            quantize(self.f16, path, preset)
            return self.measure(path)
        finally:
            path.unlink(missing_ok=True)

    def measure(self, path: Path) -> float:
        """Mean KL(f16 || the GGUF at `path`) over the probe's positions."""
        return float(np.concatenate(self.kl_rows(path)).mean())

    def kl_rows(self, path: Path) -> list[np.ndarray]:
        """KL(f16 || the GGUF at `path`) at each of the probe's positions, per sequence (each
        sequence's log-probabilities made, in float64, only while its KL is taken)."""
        return self._kl_rows(self._logits(path))

    def kl_rows_and_answers(self, path: Path, keep=None) -> tuple[list[np.ndarray], Optional[int]]:
        """(kl_rows, answers kept) of the GGUF at `path`, loaded once. Answers kept: how many of the
        probe's prompts (the sequences' first turns, up to their answer) the file answers greedily
        exactly as the reference does, token for token and ending where it ends: what a task scored
        on greedy answers sees, where mean KL may not (a file can be closer on average and still
        flip the one uncertain token a field hangs on); None: no prompts (text data). A greedy
        answer is the same exactly when the file ranks the reference's token first at every
        position of it: a prompt whose reference answer is its sequence's own (as a trained model's
        mostly is), at positions the KL reads, is judged from that read's logits; only the others
        are read again, prompt + the reference's answer. `keep`: a llamacpp.LayerInputs that keeps
        the inputs of its layers in the read of the probe's sequences (for compare's `inputs`)."""
        if not self.prompts:
            return self._kl_rows(self._logits(path, keep=keep)), None
        answers = self.reference_answers
        with self._load(path, keep=keep) as rt:
            logits = self._read(rt, keep)
            followed = {k: _followed(logits[i][at:at + len(answers[k])].argmax(-1), answers[k])
                        for k, (i, at) in self._answers_in_rows.items()}
            rest = [k for k in range(len(self.prompts)) if k not in followed]
            followed.update(zip(rest, _follows(rt, [self.prompts[k][0] for k in rest], [answers[k] for k in rest])))
        return self._kl_rows(logits), sum(followed[k] == len(answer) for k, answer in enumerate(answers))

    def compare(self, path: Path, base: list[np.ndarray], z: Optional[float] = None, parts: int = 4,
                inputs=None) -> tuple[float, int]:
        """(mean KL(f16 || the GGUF at `path`) minus that of the file whose kl_rows are `base`, positions read):
        the sequences read one after the other in one pass (the tokens they all begin with read once), the
        difference checked after each quarter of them and the reading stopped once it is `z` standard
        errors from zero (a sequence's positions taken together: they are not independent).
        Only the sign is settled early; z = inf reads every sequence and gives the exact difference
        (default: SETTLED_Z). `inputs`: the file is a model of later layers only, read from these
        inputs (LayerInputs.at, kept in a read of the same sequences)."""
        from .llamacpp import batched_logits

        z = SETTLED_Z if z is None else z
        step = -(-len(self.rows) // parts)
        sums, counts = [], []  # per sequence read: the sum of the differences at its positions, their number
        parts_of: list[np.ndarray] = []  # the sequence being read: its logits so far (a long one comes in parts)
        with self._load(path) as rt:  # one read: the tokens the sequences share stay in the cache throughout
            for i, _, lg in batched_logits(rt.llm, [ids for ids, _ in self.rows], [rows for _, rows in self.rows],
                                           inputs=inputs):
                parts_of.append(lg)
                if sum(map(len, parts_of)) < len(self.rows[i][1]):
                    continue
                lg, parts_of = np.concatenate(parts_of), []
                sums.append(float((self._kl(log_softmax(lg), i) - base[i]).sum()))
                counts.append(len(lg))
                if len(sums) % step and len(sums) < len(self.rows):
                    continue
                d, n = np.asarray(sums), np.asarray(counts, dtype=float)
                mean = d.sum() / n.sum()
                error = np.sqrt(((d - mean * n) ** 2).sum()) / n.sum()
                if len(sums) < len(self.rows) and abs(mean) > z * error:
                    break
        return float(mean), int(n.sum())

    def _kl_rows(self, logits: list[np.ndarray]) -> list[np.ndarray]:
        """Per sequence, KL(f16 || the logits read at its rows) at each row."""
        return [self._kl(log_softmax(lg), i) for i, lg in enumerate(logits)]

    def _kl(self, q: np.ndarray, i: int) -> np.ndarray:
        p = self.reference[i].astype(np.float64)
        return (np.exp(p) * (p - q)).sum(-1)

    @cached_property
    def reference_answers(self) -> list[list[int]]:
        """The reference's greedy answers to the prompts (made on first use), each cut where reading
        it whole ranks another token first (a near-tie that batched and one-token-at-a-time
        evaluation break differently), so that the reference keeps all of its own."""
        from .runtime import greedy_answers

        if not self.prompts:
            return []
        prompts, limits = [p for p, _ in self.prompts], [limit for _, limit in self.prompts]
        answers = greedy_answers(self.f16, prompts, limits, self.loras, self.n_ctx)
        with self._load(self.f16, self.loras) as rt:
            return [answer[:n] for answer, n in zip(answers, _follows(rt, prompts, answers))]

    @cached_property
    def _answers_in_rows(self) -> dict[int, tuple[int, int]]:
        """{prompt: (its sequence in self.rows, where that sequence's rows reach its reference
        answer)} for each nonempty reference answer its sequence holds at rows the probe reads."""
        found = {}
        for k, ((prompt, _), answer) in enumerate(zip(self.prompts, self.reference_answers)):
            i = self._row_of_prompt[k]
            if i is None or not answer:
                continue
            ids, rows = self.rows[i]
            wanted = list(range(len(prompt) - 1, len(prompt) - 1 + len(answer)))
            at = rows.index(wanted[0]) if wanted[0] in rows else -1
            holds = list(ids[len(prompt):len(prompt) + len(answer)]) == answer
            if at >= 0 and rows[at:at + len(answer)] == wanted and holds:
                found[k] = (i, at)
        return found

    def logprobs(self, path: Path, loras=()) -> list[np.ndarray]:
        """The GGUF at `path` (with `loras`: (file, scale) pairs)'s log-probabilities at the probe's
        positions, per sequence (computed in float64, kept in float32: half the memory)."""
        return [log_softmax(lg).astype(np.float32) for lg in self._logits(path, loras)]

    def _logits(self, path: Path, loras=(), keep=None) -> list[np.ndarray]:
        with self._load(path, loras, keep) as rt:
            return self._read(rt, keep)

    def _read(self, rt, keep=None) -> list[np.ndarray]:
        """The logits of the model in `rt` at the probe's positions, per sequence (`keep`: see
        kl_rows_and_answers; `rt` loaded to observe with it)."""
        from .llamacpp import logits_at

        logits = logits_at(rt.llm, [ids for ids, _ in self.rows], [rows for _, rows in self.rows],
                           before=keep.before if keep else None)
        if keep:
            keep.stop()
        return logits

    def _load(self, path: Path, loras=(), keep=None):
        """The GGUF at `path`, to read the probe's sequences several to a batch."""
        from .runtime import load, reading_sequences

        return load(path, loras=loras, n_ctx=self.n_ctx, sequences=reading_sequences(), observe=keep)

    def against(self, logprobs: list[np.ndarray]) -> tuple[float, float]:
        """kl_top1 of the f16 and `logprobs` at the probe's positions, from any model with the same vocabulary."""
        return kl_top1(self.reference, logprobs)


def _first_prompt(ids: list[int], labels: list[int]) -> Optional[tuple[list[int], int]]:
    """(the tokens before a sequence's first answer, the most tokens a greedy answer to them may
    take: data.answer_limit of that answer), None where the sequence has no prompt (text data)."""
    start = next((j for j in range(1, len(ids)) if labels[j] != IGNORE), None)
    if start is None or labels[start - 1] != IGNORE:
        return None
    end = next((j for j in range(start, len(ids)) if labels[j] == IGNORE), len(ids))
    return list(ids[:start]), answer_limit(end - start)


def _followed(top: np.ndarray, answer: list[int]) -> int:
    """How many of `answer`'s first tokens are the model's top tokens `top` at their positions."""
    same = np.asarray(top, dtype=int) == np.asarray(answer, dtype=int)
    return len(answer) if same.all() else int(same.argmin())


def _follows(rt, prompts: list[list[int]], answers: list[list[int]]) -> list[int]:
    """For each prompt and answer: how many of the answer's first tokens the model in `rt` ranks
    first after the prompt (and the answer's tokens before each). One read of prompt + answer,
    each batch's logits kept only as their top tokens (all of them: 4 bytes x vocabulary x answer
    token, 440 MB for 32 answers of 70 tokens with a 49k vocabulary)."""
    from .llamacpp import batched_logits

    top: list[list[np.ndarray]] = [[] for _ in prompts]
    for i, _, lg in batched_logits(rt.llm, [p + a for p, a in zip(prompts, answers)],
                                   [range(len(p) - 1, len(p) + len(a) - 1) for p, a in zip(prompts, answers)]):
        top[i].append(lg.argmax(-1))
    return [_followed(np.concatenate(parts), answer) for answer, parts in zip(answers, top)]
