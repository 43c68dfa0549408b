"""A GGUF's row, in llama.cpp: load it, generate the answers, score the answer positions.

Speeds are what one conversation at a time gets (a user's app): llama.cpp's counters over
SPEED_EXAMPLES answers through chat(), after a first one that warms the caches. The answers that
are scored, and the logits at the reference answers' positions, come from all the examples read
together (runtime.greedy_answers): each prompt read once, with its reference answer after it, and
its greedy answer generated from the prompt, the examples' next tokens decoded in one batch a
step; as far as the greedy answer is the reference's, its tokens are taken from that read, not
decoded again (held to the row's JSON schema, a row reads no reference: it is not scored against
one). They are chat()'s answers but where batched arithmetic breaks a near-tie the other way
(rare: tests/test_bench.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import EdgeloraError
from ..machine import peak_rss_mb
from .candidates import Candidate, Settings
from .scoring import Compare, rate, task_result

SPEED_EXAMPLES = 4  # answers timed per row: 8 gave the same rates, to the machine's noise, for a
# slower bench (benchmarks/README.md, "Bench: four answers timed")


def measure_gguf(c: Candidate, rows: list[dict], s: Settings, scratch: Path, tick) -> dict:
    from ..runtime import answer_text, greedy_answers, load

    loras = [(p, 1.0) for p in c.loras]
    t0 = time.perf_counter()
    rt = load(c.model, loras=loras, device=s.device, threads=s.threads)
    load_s = time.perf_counter() - t0
    tokens = [rt.chat_tokens(r["messages"], r["answer"]) for r in rows]
    if c.reference:
        (scratch / "tokens.json").write_text(json.dumps(tokens))
    elif json.loads((scratch / "tokens.json").read_text()) != [list(map(list, t)) for t in tokens]:
        raise EdgeloraError(f"{c.model}: tokenises the eval set differently from the reference (another vocabulary?)")

    one_at_a_time = rows[:SPEED_EXAMPLES + 1]
    totals = dict.fromkeys(("prompt_tokens", "prompt_s", "gen_tokens", "gen_s"), 0)
    for i, r in enumerate(one_at_a_time):
        rt.chat(r["messages"], max_tokens=s.max_tokens, temperature=0.0, json_schema=c.json_schema)
        t = rt.timings()
        for key in totals:  # the first answer warms the caches (the file's pages, the allocator): not counted
            totals[key] += t[key] if i or len(one_at_a_time) == 1 else 0
        tick()
    measured = dict(load_s=load_s, peak_rss_mb=peak_rss_mb(),  # one conversation's context, not the batched one below
                    prompt_tok_s=rate(totals["prompt_tokens"], totals["prompt_s"]),
                    gen_tok_s=rate(totals["gen_tokens"], totals["gen_s"]), device=rt.device)
    prompts = [p for p, _ in tokens]
    cmp = None
    if c.json_schema is None:  # a grammar changes what is generated, not the model: see _measure_all
        cmp = Compare(scratch, c.reference, sum(len(a) for _, a in tokens), rt.llm.n_vocab())

    def scored(i: int, logits) -> None:
        cmp.add(logits, tokens[i][1])
        tick()

    generated = greedy_answers(c.model, prompts, [s.max_tokens] * len(rows), loras, json_schema=c.json_schema,
                               read=None if cmp is None else [a for _, a in tokens], on_read=scored,
                               device=s.device, threads=s.threads)
    answers = [answer_text(rt, p, ids) for p, ids in zip(prompts, generated)]
    for _ in range(len(rows) - len(one_at_a_time) + (len(rows) if cmp is None else 0)):  # the bar counts 2 a row
        tick()
    return {**measured, "answers": answers, **task_result(s.score, s.pattern, answers, rows),
            **({} if cmp is None else cmp.result())}
