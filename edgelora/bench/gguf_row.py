"""A GGUF's row, in llama.cpp: load it, generate the answers, score the answer positions."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import EdgeloraError
from ..machine import peak_rss_mb
from .candidates import Candidate, Settings
from .scoring import Compare, rate, task_result


def measure_gguf(c: Candidate, rows: list[dict], s: Settings, scratch: Path, tick) -> dict:
    from ..runtime import load

    t0 = time.perf_counter()
    rt = load(c.model, loras=[(p, 1.0) for p in c.loras], device=s.device, threads=s.threads)
    load_s = time.perf_counter() - t0
    tokens = [rt.chat_tokens(r["messages"], r["answer"]) for r in rows]
    if c.reference:
        (scratch / "tokens.json").write_text(json.dumps(tokens))
    elif json.loads((scratch / "tokens.json").read_text()) != [list(map(list, t)) for t in tokens]:
        raise EdgeloraError(f"{c.model}: tokenises the eval set differently from the reference (another vocabulary?)")

    answers, totals = [], dict.fromkeys(("prompt_tokens", "prompt_s", "gen_tokens", "gen_s"), 0)
    for r in rows:
        answers.append(rt.chat(r["messages"], max_tokens=s.max_tokens, temperature=0.0, json_schema=c.json_schema))
        t = rt.timings()
        for key in totals:
            totals[key] += t[key]
        tick()
    peak = peak_rss_mb()  # before the scoring pass: its float64 scratch is bench's, not the model's
    measured = dict(load_s=load_s, peak_rss_mb=peak, answers=answers, **task_result(s.score, s.pattern, answers, rows),
                    prompt_tok_s=rate(totals["prompt_tokens"], totals["prompt_s"]),
                    gen_tok_s=rate(totals["gen_tokens"], totals["gen_s"]), device=rt.device)
    if c.json_schema is not None:  # a grammar changes what is generated, not the model: see _measure_all
        return measured
    cmp = Compare(scratch, c.reference, sum(len(a) for _, a in tokens), rt.llm.n_vocab())
    for prompt, answer in tokens:
        cmp.add(rt.logits(prompt + answer)[len(prompt) - 1:-1], answer)
        tick()
    return {**measured, **cmp.result()}
