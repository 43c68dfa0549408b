"""llama-cpp-python, in one place: loading GGUF files under one safety policy, llama.cpp's log,
grammar samplers, and the private handles of a Llama that edgelora needs (llama-cpp-python is
pinned; `handles` checks they are there). No torch.

AMX: llama.cpp's CPU backend puts quantised weights in "extra" buffer types (AMX tiles,
repacked layouts) when the CPU advertises them. Some virtual machines advertise Intel AMX
(`amx_int8` in /proc/cpuinfo) without enabling it, and the first AMX matmul then kills the
process (SIGSEGV on `ldtilecfg`); this project's CI machine is one. Laptops have no AMX, so
on CPUs that advertise it edgelora loads without the extra buffer types unless
EDGELORA_LLAMA_EXTRA_BUFTS=1 says the machine runs AMX fine.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from functools import lru_cache
from pathlib import Path

from .errors import EdgeloraError


@lru_cache(maxsize=1)
def cpu_advertises_amx() -> bool:
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def use_extra_bufts() -> bool:
    if os.environ.get("EDGELORA_LLAMA_EXTRA_BUFTS") in ("0", "1"):
        return os.environ["EDGELORA_LLAMA_EXTRA_BUFTS"] == "1"
    return not cpu_advertises_amx()


@contextlib.contextmanager
def model_params_policy():
    """Within the block, llama.cpp models load with edgelora's buffer-type policy."""
    import llama_cpp.llama_cpp as C

    if use_extra_bufts():
        yield
        return
    default = C.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    C.llama_model_default_params = params
    try:
        yield
    finally:
        C.llama_model_default_params = default


def load_llama(path: str | Path, **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` under the policy above, grammars guarded."""
    from llama_cpp import Llama

    guard_grammar_samplers()
    with model_params_policy():
        return Llama(model_path=str(path), **kwargs)


GGML_LOG_ERROR = 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT (llama-cpp-python's table is stale)


@contextlib.contextmanager
def captured_log(echo: bool = False):
    """llama.cpp's log lines as (level, text) while the block runs, echoed to stderr if `echo`;
    the previous log handler is restored afterwards."""
    import llama_cpp.llama_cpp as C

    lines: list[tuple[int, str]] = []

    @C.llama_log_callback
    def collect(level, text, _user_data):
        lines.append((level, text.decode("utf-8", "replace")))
        if echo:
            print(lines[-1][1], end="", file=sys.stderr, flush=True)

    old_cb, old_data = C.llama_log_callback(), ctypes.c_void_p()
    C.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_data))
    C.llama_log_set(collect, None)
    try:
        yield lines
    finally:
        C.llama_log_set(old_cb, old_data)


def log_errors(lines: list[tuple[int, str]]) -> list[str]:
    """The messages of the error lines, without llama.cpp's `function: ` prefix."""
    return [text.strip().split(": ", 1)[-1] for level, text in lines if level == GGML_LOG_ERROR and text.strip()]


_grammar_guard_installed = False


def grammar_sampler(vocab, text: str, root: str = "root"):
    """llama.cpp's grammar sampler for GBNF `text` on `vocab`; ValueError with llama.cpp's reason
    when it cannot parse the grammar. The caller owns the sampler (a chain frees what it holds)."""
    import llama_cpp.llama_cpp as C

    with captured_log() as log:
        sampler = C.llama_sampler_init_grammar(vocab, text.encode("utf-8"), root.encode("utf-8"))
    if not sampler:
        errors = log_errors(log)
        raise ValueError(f"invalid grammar: {errors[0] if errors else 'llama.cpp cannot parse it'}")
    return sampler


def guard_grammar_samplers() -> None:
    """Make a grammar llama.cpp cannot parse an error instead of a crash, process-wide.

    llama-cpp-python adds the sampler llama.cpp returns for a grammar to its chain without
    checking it: for a grammar llama.cpp rejects that is NULL, and the first token sampled kills
    the process (SIGSEGV). Grammars reach it from many request fields (grammar, response_format,
    tools / functions with tool_choice), so the check sits where they all meet: after this,
    LlamaSampler.add_grammar raises ValueError with llama.cpp's reason. Idempotent."""
    global _grammar_guard_installed
    if _grammar_guard_installed:
        return
    import llama_cpp.llama_cpp as C
    from llama_cpp._internals import LlamaSampler

    def add_grammar(self, model, grammar) -> None:
        C.llama_sampler_chain_add(self.sampler, grammar_sampler(model.vocab, grammar._grammar, grammar._root))

    LlamaSampler.add_grammar = add_grammar
    _grammar_guard_installed = True


# ---------------------------------------------------------------- a Llama's private handles

def handles(llm) -> tuple:
    """(llama_model *, llama_context *, llama_vocab *, the LlamaBatch) of `llm`: llama-cpp-python
    keeps them private, and LoRA switching, perf counters, grammar checks and all-position logits
    need them. A version that moved them gets one clear error here, not an AttributeError later."""
    try:
        return llm._model.model, llm._ctx.ctx, llm._model.vocab, llm._batch
    except AttributeError as e:
        import llama_cpp

        raise EdgeloraError(f"llama-cpp-python {llama_cpp.__version__} keeps a model's handles elsewhere ({e}); "
                            "edgelora needs llama-cpp-python==0.3.36") from None


def token_text(llm, token: int) -> str:
    """The text of `token` as llama.cpp stores it (special tokens included), '' for -1 (none)."""
    handles(llm)
    return llm._model.token_get_text(token) if token != -1 else ""


def all_logits(llm, tokens):
    """Next-token logits (float32, one row per token) for `tokens` read from position 0: the whole
    sequence through llama.cpp in batches with every row's logits kept (Llama.eval keeps them only
    for logits_all models, whose buffer is n_ctx x n_vocab for the model's whole life). Clears the
    KV cache: the next generation re-evaluates its prompt."""
    import numpy as np

    _, ctx, _, batch = handles(llm)
    n_vocab = llm.n_vocab()
    out = np.empty((len(tokens), n_vocab), dtype=np.float32)
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    for start in range(0, len(tokens), llm.n_batch):
        chunk = list(tokens[start:start + llm.n_batch])
        batch.set_batch(batch=chunk, n_past=start, logits_all=True)
        llm._ctx.decode(batch)
        out[start:start + len(chunk)] = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk), n_vocab))
    return out


def greedy(llm, prompt, limit: int) -> list[int]:
    """The greedy continuation of `prompt` (token ids, read from position 0): llama.cpp's top token
    one at a time, at most `limit`, ending with the first end-of-generation token if one comes.
    No sampler, no penalties: what temperature 0 answers. Clears the KV cache first."""
    import llama_cpp
    import numpy as np

    _, _, vocab, batch = handles(llm)
    n_vocab = llm.n_vocab()
    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    out: list[int] = []
    pending, n_past = list(prompt), 0
    while len(out) < limit:
        for start in range(0, len(pending), llm.n_batch):
            chunk = pending[start:start + llm.n_batch]
            batch.set_batch(batch=chunk, n_past=n_past + start, logits_all=False)  # logits of the last token only
            llm._ctx.decode(batch)
        n_past += len(pending)
        token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        pending = [token]
    return out
