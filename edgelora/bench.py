"""`edgelora bench`: what each quantisation level costs on your own eval set.

For every file of an export (or any GGUF files) and, where torch is installed, the unquantised
HF base + adapter, on the same held-out examples:
  quality  perplexity of the reference answers; mean KL divergence and top-1 agreement of the
           next-token distributions against the f16 GGUF at every answer position; the task
           score of greedy answers generated through the chat template (exact / contains / regex);
  cost     file size, bits per weight, load time, prompt and generation tokens/s, peak RSS.
Each model is measured in its own process (spawned, one after the other), so peak RSS is its
own and one model's memory never counts against the next. The reference (f16) runs first and
leaves its log-probabilities in a memory-mapped scratch file, which the others are compared
with position by position. Reports: report.json, report.md and ladder.png, written by
edgelora.report, with the recommendation: the smallest file whose task score stays within
the threshold of the reference's.

The GGUF side needs llama-cpp-python only; the HF reference row (edgelora.bench_torch) needs the
`train` extra.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing as mp
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import gguf

from .data import REASONING, last_answer, read_jsonl
from .errors import EdgeloraError
from .files import output_folder, refuse_overwrite
from .machine import peak_rss_mb
from .gguf_header import gguf_metadata
from .handoff import BASE, LORA, MANIFEST_FILE, MERGED, REPORT_FILE, Role, outputs_by_role, read_manifest

SCORES = ("auto", "exact", "contains", "regex", "json")


@dataclass
class Candidate:
    """One row of the ladder: a GGUF (plus LoRA GGUFs), or the HF base + adapter."""

    label: str
    route: str  # merged (quantised merged file), lora (base GGUF + LoRA GGUF), file (a GGUF given by name), hf
    model: str  # GGUF path; for hf, the base spec
    loras: list[str] = field(default_factory=list)  # LoRA GGUFs; for hf, the PEFT adapter dir
    size_bytes: int = 0
    bpw: Optional[float] = None
    reference: bool = False
    notes: list[str] = field(default_factory=list)  # what the file really is, where its name says otherwise
    json_schema: Optional[dict] = None  # answers generated under this schema's grammar


@dataclass
class Settings:
    score: str = "exact"  # never "auto": bench() resolves it
    pattern: Optional[str] = None
    max_tokens: int = 0  # bench() makes 0 the longest reference answer's bytes + 16
    device: str = "auto"
    threads: Optional[int] = None


# ---------------------------------------------------------------- what to measure

def discover(inputs: list[str], quants: Optional[list[str]] = None, hf: Optional[bool] = None) -> list[Candidate]:
    """Candidates from an export folder (its manifest.json: merged quants, the LoRA route, the
    HF reference) or from GGUF files; the f16 merged file (else the most bits per weight) is
    the reference, first in the list."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise EdgeloraError("bench needs an export folder or GGUF files")
    if len(paths) == 1 and paths[0].is_dir():
        cands = _from_export(paths[0], quants, hf)
    else:
        cands = [_from_file(p) for p in paths]
    ggufs = [c for c in cands if c.route != "hf"]
    if not ggufs:
        raise EdgeloraError(f"{inputs[0]}: no GGUF model to bench")
    ref = next((c for c in ggufs if c.label == "f16"), None) or max(ggufs, key=lambda c: c.bpw or 0)
    ref.reference = True
    return [ref] + [c for c in cands if c is not ref]


def _from_file(path: Path) -> Candidate:
    from .gguf_info import inspect_gguf

    if path.is_dir():
        raise EdgeloraError(f"{path}: give one export folder, or GGUF files")
    if gguf_metadata(path).get("general.type") == "adapter":
        raise EdgeloraError(f"{path} is a LoRA adapter: bench its export folder, which pairs it with its base")
    info = inspect_gguf(path)
    return Candidate(path.stem, "file", str(path), size_bytes=info["size_bytes"], bpw=info["bpw"],
                     notes=honest_notes(info))


def honest_notes(info: dict, imatrix: Optional[bool] = None) -> list[str]:
    """What a quantised GGUF really is: the weights that could not take its file type's main type
    (rows not a multiple of its block: llama.cpp fell back), so that a name like q2_k is not taken
    at its word; and whether an importance matrix guided it, where the export says."""
    from .gguf_info import quantisable
    from .quantize import fallbacks, main_type

    notes = []
    ftype = (info.get("file_type") or "").upper()
    main = main_type(ftype) if ftype.startswith("MOSTLY_") else None
    if main:
        fell = fallbacks(info, main)
        n = sum(1 for t in info["tensors"] if quantisable(t["name"], t["shape"]))
        if fell["count"]:
            block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[main]][0]
            kinds = ", ".join(f"{t} x{k}" for t, k in fell["by_type"].items())
            notes.append(f"nominal: {fell['count']} of {n} weights could not take {main} (rows not a multiple of "
                         f"{block}) and fell back ({kinds}); real {info['bpw']:.2f} bits/weight")
    if imatrix is not None:
        notes.append("quantised with the task importance matrix" if imatrix else "no importance matrix")
    return notes


def _from_export(folder: Path, quants: Optional[list[str]], hf: Optional[bool]) -> list[Candidate]:
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        files = sorted(folder.glob("*.gguf"))
        models = [p for p in files if gguf_metadata(p).get("general.type") != "adapter"]
        if not models:
            raise EdgeloraError(f"{folder}: no {MANIFEST_FILE} and no GGUF model files")
        return [_from_file(p) for p in models]
    manifest = read_manifest(folder)
    try:
        return _manifest_candidates(folder, manifest, quants, hf)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a field missing or of the wrong kind
        raise EdgeloraError(f"{manifest_path}: damaged export manifest ({type(e).__name__}: {e})") from None


def _manifest_candidates(folder: Path, manifest: dict, quants: Optional[list[str]], hf: Optional[bool]):
    from .gguf_info import inspect_gguf

    outputs = outputs_by_role(manifest)
    have = [role.quant for role in outputs if role.kind == MERGED]
    missing = [q for q in quants or [] if q not in have]
    if missing:
        raise EdgeloraError(f"{folder}: {', '.join(missing)} not in the export (it has {', '.join(have)})")
    wanted = set(quants or []) | {"f16"}
    cands = []
    for role, o in outputs.items():
        if role.kind == MERGED and (not quants or role.quant in wanted):
            notes = honest_notes(inspect_gguf(folder / o["file"]), o.get("imatrix")) if role.quant != "f16" else []
            cands.append(Candidate(role.quant, "merged", str(folder / o["file"]), size_bytes=o["size_bytes"],
                                   bpw=o["bpw"], notes=notes))
    if Role(LORA) in outputs:
        lora = outputs[Role(LORA)]
        lora_info = inspect_gguf(folder / lora["file"])
        base = manifest["inputs"]["base"]
        if base["kind"] == "gguf":
            bases = [(None, Path(base["path"]))]  # the base GGUF itself: named by its file type below
        else:
            bases = [(role.quant, folder / o["file"]) for role, o in outputs.items() if role.kind == BASE
                     and (not quants or role.quant in wanted)]
        for quant, path in bases:
            info = inspect_gguf(path)
            quant = quant or _quant_name(info["file_type"])
            bits = (info["tensor_bytes"] + lora_info["tensor_bytes"]) * 8 / info["n_params"]
            cands.append(Candidate(f"{quant}+lora", "lora", str(path), [str(folder / lora["file"])],
                                   info["size_bytes"] + lora_info["size_bytes"], bits))
    adapter = manifest["inputs"].get("adapter")
    torch_ok = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
    if hf and not torch_ok:
        raise EdgeloraError("the HF reference needs torch, transformers and peft: pip install 'edgelora[train]'")
    if adapter and (hf or (hf is None and torch_ok)):
        cands.append(Candidate("hf", "hf", manifest["inputs"]["base"]["path"], [adapter["path"]]))
    return cands


def _quant_name(file_type: Optional[str]) -> str:
    """gguf's LlamaFileType name (MOSTLY_Q4_K_M) -> our quant name (q4_k_m)."""
    return (file_type or "base").removeprefix("MOSTLY_").lower().replace("all_f32", "f32")


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


# ---------------------------------------------------------------- one model, in its own process

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


def log_softmax(logits):
    import numpy as np

    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _measure_gguf(c: Candidate, rows: list[dict], s: Settings, scratch: Path, tick) -> dict:
    from .runtime import load

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


def capped_exp(x: float) -> float:
    import math

    return math.exp(min(x, 700.0))


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds else 0.0


def _worker(c: Candidate, rows: list[dict], s: Settings, scratch: str, queue) -> None:
    """Process entry point: measure one candidate, report ticks and the result (or the error) on `queue`."""
    from .llamacpp import captured_log

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)  # a fresh process: the CLI's filters are not here
    try:
        with captured_log():  # llama.cpp's own chatter stays out of the progress display
            if c.route == "hf":
                from .bench_torch import measure_hf as measure
            else:
                measure = _measure_gguf
            queue.put(("done", measure(c, rows, s, Path(scratch), lambda: queue.put(("tick", None)))))
    except EdgeloraError as e:
        queue.put(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - the parent reports it in one line, naming the model
        queue.put(("error", f"{type(e).__name__}: {e}"))


def _run_isolated(c: Candidate, rows: list[dict], s: Settings, scratch: Path, on_tick) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(c, rows, s, str(scratch), queue), daemon=True)
    proc.start()
    try:
        while True:
            try:
                kind, payload = queue.get(timeout=1.0)
            except Exception:  # queue.Empty: is the worker still alive?
                if not proc.is_alive():
                    raise EdgeloraError(f"{c.label}: the measuring process died (exit code {proc.exitcode})") from None
                continue
            if kind == "tick":
                on_tick()
            elif kind == "error":
                raise EdgeloraError(f"{c.label} ({c.model}): {payload}")
            else:
                return payload
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


# ---------------------------------------------------------------- the ladder

@dataclass
class BenchResult:
    out_dir: Path
    report: dict
    files: dict[str, Path]


def bench(inputs: list[str], eval_data: str, *, out: Optional[str] = None, quants: Optional[list[str]] = None,
          limit: Optional[int] = None, score: str = "auto", pattern: Optional[str] = None, threshold: float = 0.97,
          max_tokens: Optional[int] = None, device: str = "auto", threads: Optional[int] = None,
          hf: Optional[bool] = None, force: bool = False, progress: bool = True,
          json_schema: Optional[str] = None) -> BenchResult:
    """Measure every candidate (see discover) on eval_data; write report.json/.md and ladder.png.
    score "auto": json when every reference answer is JSON, else exact. json_schema ("auto": the
    schema.json beside the files, or a schema file): each GGUF is also measured with its answers
    held to the schema by a grammar, as a row of its own ("q2_k+grammar")."""
    from . import report as rep
    from .schema import resolve

    if score not in SCORES:
        raise EdgeloraError(f"unknown score '{score}' (choose from {', '.join(SCORES)})")
    if not 0 < threshold <= 1:
        raise EdgeloraError(f"--threshold {threshold}: must be in (0, 1]")
    if limit is not None and limit < 1:
        raise EdgeloraError(f"--limit {limit}: must be at least 1")
    rows = read_eval(eval_data, limit)
    score = pick_score(score, rows)
    make_scorer(score, pattern)  # bad options fail before any model loads
    cands = discover(inputs, quants, hf)
    schema = resolve(json_schema, *(c.model for c in cands if c.route != "hf"))
    if schema is not None:
        cands = [v for c in cands for v in (c, *([] if c.route == "hf" else [
            replace(c, label=f"{c.label}+grammar", reference=False, json_schema=schema, notes=[])]))]  # notes: the row above's
    out_dir = Path(out) if out else (Path(inputs[0]) / "bench" if Path(inputs[0]).is_dir() else Path("bench"))
    files = {"json": out_dir / REPORT_FILE, "md": out_dir / "report.md", "png": out_dir / "ladder.png"}
    output_folder(out_dir, "report folder")
    refuse_overwrite(files.values(), force)
    longest = max(len((r["reasoning"] + r["answer"]).encode()) + (32 if r["reasoning"] else 0)
                  for r in rows) + 16  # room for any reference answer (and its <think> block): a token >= 1 byte
    settings = Settings(score, pattern, max_tokens or longest, device, threads)
    results = _measure_all(cands, rows, settings, out_dir, progress)
    report = rep.build_report(cands, results, rows, eval_data=eval_data, threshold=threshold, settings=asdict(settings))
    rep.write_report(report, files)
    return BenchResult(out_dir, report, files)


def _measure_all(cands: list[Candidate], rows: list[dict], s: Settings, out_dir: Path, progress: bool) -> list[dict]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    scratch = out_dir / ".scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    results: list[dict] = []
    columns = (TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
            for c in cands:
                task = bar.add_task(c.label, total=(1 if c.json_schema else 2) * len(rows))
                result = _run_isolated(c, rows, s, scratch, lambda: bar.advance(task))
                if c.json_schema is not None:  # the same weights as the row before it: the same logits
                    result = {**{k: results[-1][k] for k in ("perplexity", "kl", "top1")}, **result}
                results.append(result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results
