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

# The llama-cpp-python whose private handles, ggml structs and quantiser parameters edgelora reads
# (pyproject.toml pins it too).
PINNED = "0.3.36"
NEEDS_PIN = f"edgelora needs llama-cpp-python=={PINNED}"


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


def load_llama(path: str | Path, *, observe: "WeightInputs | LayerInputs | None" = None, sequences: int = 1,
               **kwargs):
    """`llama_cpp.Llama(model_path=path, **kwargs)` under the policy above, grammars guarded, chat
    templates rendered by edgelora.templates;
    `observe`: the weights' or the layers' inputs go to it as llama.cpp computes them (WeightInputs,
    LayerInputs); `sequences`:
    how many sequences one batch may hold (batched_logits), sharing one KV cache."""
    from llama_cpp import Llama

    from llama_cpp import llama_chat_format

    from .templates import chat_formatter

    guard_grammar_samplers()
    fields = {"n_seq_max": sequences, "kv_unified": True} if sequences > 1 else {}
    if observe:
        fields.update(cb_eval=observe.callback, cb_eval_user_data=None)
    # Llama() builds a formatter for each chat template in the file: ours renders bounded (edgelora.templates),
    # and a template that does not parse fails when it is used, naming the file, not here
    formatter, llama_chat_format.Jinja2ChatFormatter = llama_chat_format.Jinja2ChatFormatter, chat_formatter(str(path))
    try:
        with model_params_policy(), _context_params(fields):
            llm = Llama(model_path=str(path), **kwargs)
    finally:
        llama_chat_format.Jinja2ChatFormatter = formatter
    if observe:
        llm._edgelora_eval_callback = observe.callback  # llama.cpp calls it for the context's whole life
    return llm


@contextlib.contextmanager
def _context_params(fields: dict):
    """Within the block, contexts llama-cpp-python creates get these llama_context_params fields
    (it sets the rest itself from Llama's arguments)."""
    import llama_cpp.llama_cpp as C

    if not fields:
        yield
        return
    default = C.llama_context_default_params

    def params():
        p = default()
        for name, value in fields.items():
            setattr(p, name, value)
        return p

    C.llama_context_default_params = params
    try:
        yield
    finally:
        C.llama_context_default_params = default


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


def log_reason(lines: list[tuple[int, str]], last: bool = False) -> str:
    """Why llama.cpp says a call failed: the first error line of its log (`last`: the last one)."""
    errors = log_errors(lines)
    return errors[-1 if last else 0] if errors else "llama.cpp gave no reason (its log: verbose=True, edgelora -v)"


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
                            f"{NEEDS_PIN}") from None


def token_text(llm, token: int) -> str:
    """The text of `token` as llama.cpp stores it (special tokens included), '' for -1 (none)."""
    handles(llm)
    return llm._model.token_get_text(token) if token != -1 else ""


def all_logits(llm, tokens):
    """Next-token logits (float32, one row per token) for `tokens` read from position 0: the whole
    sequence through llama.cpp in batches with every row's logits kept (Llama.eval keeps them only
    for logits_all models, whose buffer is n_ctx x n_vocab for the model's whole life). Clears the
    KV cache: the next generation re-evaluates its prompt."""
    return logits_at(llm, [tokens])[0]


def shared_prefix(sequences, first_wanted) -> int:
    """How many first tokens all `sequences` have in common that can be read once for all of them:
    their longest common prefix, stopping before each one's first position whose logits are wanted
    (`first_wanted`, per sequence) and before its last token. 0 for fewer than two sequences."""
    if len(sequences) < 2:
        return 0
    limit = min(min(int(f), len(ids) - 1) for ids, f in zip(sequences, first_wanted))
    first = sequences[0]
    n = 0
    while n < limit and all(ids[n] == first[n] for ids in sequences):
        n += 1
    return n


def _decode(llm, entries, embeddings=None):
    """One llama_decode of `entries` ((sequence slot, token, position, wants logits) each): the
    logits rows asked for (float32, in order). `embeddings`: a (tokens, n_embd) array read in
    the tokens' place (the input of the model's first layer)."""
    import llama_cpp
    import numpy as np

    _, ctx, _, batch = handles(llm)
    b = batch.batch if embeddings is None else _embeddings_batch(llm).batch
    b.n_tokens = len(entries)
    for k, (slot, token, pos, wants) in enumerate(entries):
        if embeddings is None:
            b.token[k] = token
        b.pos[k], b.n_seq_id[k], b.logits[k] = pos, 1, wants
        b.seq_id[k][0] = slot
    if embeddings is not None:
        rows = np.ascontiguousarray(embeddings, dtype=np.float32)
        if rows.shape != (len(entries), llm.n_embd()):
            raise EdgeloraError(f"{rows.shape[0]} rows of {rows.shape[-1]} inputs for {len(entries)} tokens "
                                f"of a model {llm.n_embd()} wide")
        ctypes.memmove(b.embd, rows.ctypes.data, rows.nbytes)
    if llama_cpp.llama_decode(ctx, b) != 0:
        raise EdgeloraError(f"llama.cpp could not evaluate a batch of {len(entries)} tokens")
    n = sum(1 for e in entries if e[3])
    if not n:
        return np.empty((0, llm.n_vocab()), np.float32)
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(n, llm.n_vocab())).copy()


class _EmbeddingsBatch:
    """A llama_batch that holds input embeddings instead of tokens, freed with its Llama."""

    def __init__(self, llm):
        import llama_cpp

        self._free = llama_cpp.llama_batch_free
        self.batch = llama_cpp.llama_batch_init(llm.n_batch, llm.n_embd(), max(1, int(llm.context_params.n_seq_max)))

    def __del__(self):
        self._free(self.batch)


def _embeddings_batch(llm) -> _EmbeddingsBatch:
    if getattr(llm, "_edgelora_embeddings_batch", None) is None:
        llm._edgelora_embeddings_batch = _EmbeddingsBatch(llm)
    return llm._edgelora_embeddings_batch


def _read_prefix(llm, tokens, slots: int, read=None) -> None:
    """`tokens` into the KV cache from position 0 (a batch at a time: `read(first position, tokens)`;
    default: no logits), then shared by sequence slots 1..slots-1 (the cache is unified: the cells
    are shared, not copied)."""
    for first in range(0, len(tokens), llm.n_batch):
        part = list(tokens[first:first + llm.n_batch])
        if read:
            read(first, part)
        else:
            _decode(llm, [(0, t, first + j, False) for j, t in enumerate(part)])
    for slot in range(1, slots):
        llm._ctx.kv_cache_seq_cp(0, slot, -1, -1)


def batched_logits(llm, sequences, rows=None, before=None, share: bool = True, every_output: bool = False,
                   inputs=None):
    """For each token sequence (read from position 0), its next-token logits (float32) at its
    `rows` (positions; None: every position), yielded as (sequence index, first position of the
    part, logits at the part's rows) after each batch, and kept nowhere: only the rows asked for
    go through the output head (`every_output`: every row does, so that llama.cpp's last layer
    sees every token -- it skips the rows whose output nobody reads). With `share`, the first
    tokens all sequences have in common (a system prompt, an instruction: shared_prefix, up to the
    first row asked for) are read once and stay in the KV cache while each sequence's rest is read
    after them. Sequences are packed into batches of up to n_batch tokens, each its own sequence
    in the KV cache, as many as the Llama was loaded for (load_llama(sequences=N)); one longer than
    a batch is read on its own, in parts. `before(parts)`: called before each batch with what it
    holds, in order: (sequence index, first position, tokens) per part, the index None for the
    shared tokens (read once for every sequence). `inputs(index, first position, tokens)`: the
    input embeddings of a part's tokens, read in their place (a model of a whole model's later
    layers: LayerInputs). Clears the KV cache."""
    import numpy as np

    room, slots = llm.n_batch, max(1, int(llm.context_params.n_seq_max))
    wanted = [np.arange(len(ids)) if r is None else np.asarray(r, dtype=int)
              for ids, r in zip(sequences, rows or [None] * len(sequences))]
    first_wanted = [w.min() if len(w) else len(ids) for ids, w in zip(sequences, wanted)]
    shared = shared_prefix(sequences, first_wanted) if share else 0
    none = np.zeros(0, dtype=int)

    def read(parts):  # parts: (index, first position, tokens), one sequence slot each
        entries, takes = [], []  # takes: per part, which of its rows are asked for
        for slot, (i, first, tokens) in enumerate(parts):
            w = none if i is None else wanted[i]
            take = np.isin(np.arange(first, first + len(tokens)), w)
            entries += [(slot, token, first + j, bool(every_output or take[j])) for j, token in enumerate(tokens)]
            takes.append(take)
        if before:
            before([(i, first, len(tokens)) for i, first, tokens in parts])
        embeddings = None if inputs is None else np.concatenate([inputs(i, first, len(t)) for i, first, t in parts])
        got, at = _decode(llm, entries, embeddings), 0
        for (i, first, _), take in zip(parts, takes):
            n = len(take) if every_output else int(take.sum())  # the rows this part has in `got`
            yield i, first, got[at:at + n][take] if every_output else got[at:at + n]
            at += n

    def forget(n_slots: int) -> None:  # the cache back to the shared prefix alone
        for slot in range(n_slots):
            llm._ctx.kv_cache_seq_rm(slot, shared, -1)

    llm.reset()
    llm._ctx.kv_cache_clear()
    if shared:
        _read_prefix(llm, sequences[0][:shared], slots, lambda first, part: list(read([(None, first, part)])))
    pending, used = [], shared
    for i, ids in enumerate(sequences):
        if len(ids) - shared > room:  # alone, in parts
            for first in range(shared, len(ids), room):
                yield from read([(i, first, list(ids[first:first + room]))])
            forget(1)
            continue
        if pending and (used + len(ids) - shared > room or len(pending) == slots):
            yield from read(pending)
            forget(len(pending))
            pending, used = [], shared
        pending.append((i, shared, list(ids[shared:])))
        used += len(ids) - shared
    if pending:
        yield from read(pending)
    llm._ctx.kv_cache_clear()


def logits_at(llm, sequences, rows=None, share: bool = True, before=None) -> list:
    """batched_logits gathered: per sequence, its logits at its rows, one array."""
    import numpy as np

    out: list[list] = [[] for _ in sequences]
    for i, _, logits in batched_logits(llm, sequences, rows, before=before, share=share):
        out[i].append(logits)
    return [np.concatenate(parts) for parts in out]


def greedy_many(llm, prompts, limits, *, read=None, on_read=None, grammar: str | None = None) -> list[list[int]]:
    """Greedy answers to many prompts at once: llama.cpp's top token one at a time, no sampler, no
    penalties (what temperature 0 answers), at most `limits` tokens each, ending with the first
    end-of-generation token if one comes. Each prompt is its own sequence in the KV cache (a Llama
    loaded with load_llama(sequences=N)), their next tokens decoded together, one batch a step, so
    that a step reads the weights once for all of them (what makes CPU generation slow is reading
    them). As many prompts at a time as the Llama has sequences and its context cells hold (prompt
    + limit each); the first tokens a group's prompts share (shared_prefix) are read once for all.
    `read`: per prompt, tokens to read after it first (a reference answer, to score it), the
    next-token logits at the last prompt token and at each of them but the last going to
    `on_read(index, logits)` in the prompts' order. They are also the answer's draft (speculative
    decoding): as far as the greedy answer would begin with them, read with the prompt in one
    batch, they are taken as they stand and generation goes on after them; the rest leave the
    cache. A model that gives the reference answer is not asked for it again a token a step.
    `grammar` (GBNF): each answer's top token among those llama.cpp's grammar sampler allows, as
    temperature-0 generation held to it picks. Clears the KV cache."""
    import llama_cpp
    import numpy as np

    _, _, vocab, _ = handles(llm)
    n_vocab, room, slots, cells = llm.n_vocab(), llm.n_batch, max(1, int(llm.context_params.n_seq_max)), llm.n_ctx()
    read = read or [[] for _ in prompts]
    out: list[list[int]] = [[] for _ in prompts]

    def answer(group: list[int]) -> None:
        llm.reset()
        llm._ctx.kv_cache_clear()
        shared = shared_prefix([prompts[i] for i in group], [len(prompts[i]) - 1 for i in group])
        _read_prefix(llm, prompts[group[0]][:shared], len(group))
        entries = [(slot, t, pos, len(prompts[i]) - 1 <= pos < len(prompts[i]) - 1 + max(1, len(read[i])))
                   for slot, i in enumerate(group) for pos, t in enumerate([*prompts[i], *read[i]]) if pos >= shared]
        rows: dict[int, list[np.ndarray]] = {slot: [] for slot in range(len(group))}
        for start in range(0, len(entries), room):  # prompt and read tokens, a batch at a time
            chunk = entries[start:start + room]
            for slot, logits in zip([slot for slot, _, _, wants in chunk if wants], _decode(llm, chunk)):
                rows[slot].append(logits)
        for slot, i in enumerate(group):
            if on_read is not None and read[i]:
                on_read(i, np.stack(rows[slot]))
        held = {slot: grammar_sampler(vocab, grammar) for slot in rows} if grammar is not None else {}
        try:
            nexts = {slot: drafted(slot, i, held.get(slot), rows[slot]) for slot, i in enumerate(group)}
            live = [(slot, i) for slot, i in enumerate(group) if limits[i] > 0]
            while live:
                for slot, i in live:
                    out[i].append(nexts[slot])
                live = [(slot, i) for slot, i in live
                        if len(out[i]) < limits[i] and not llama_cpp.llama_vocab_is_eog(vocab, out[i][-1])]
                if live:
                    top = _decode(llm, [(slot, out[i][-1], len(prompts[i]) + len(out[i]) - 1, True)
                                        for slot, i in live])
                    nexts = {slot: pick(held.get(slot), logits) for (slot, _), logits in zip(live, top)}
        finally:
            for sampler in held.values():
                llama_cpp.llama_sampler_free(sampler)

    candidates = (llama_cpp.llama_token_data * (n_vocab if grammar is not None else 1))()  # what a grammar filters
    view = np.ctypeslib.as_array(candidates)

    def apply_grammar(sampler, n: int) -> None:  # -inf for each of the first n candidates the grammar rejects
        array = llama_cpp.llama_token_data_array(data=candidates, size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))

    def pick(sampler, logits: np.ndarray) -> int:
        """The top token of a logits row; with a grammar sampler, among those it allows (and it accepts
        it): the top token itself where the grammar allows it, else the top of what it allows (as
        llama.cpp's own sampler checks the sampled token before filtering the vocabulary)."""
        token = int(logits.argmax())
        if sampler is None:
            return token
        view[0] = (token, logits[token], 0.0)
        apply_grammar(sampler, 1)
        if not view[0]["logit"] > -np.inf:
            view["id"], view["logit"], view["p"] = np.arange(n_vocab), logits, 0.0
            apply_grammar(sampler, n_vocab)
            token = int(view["id"][int(view["logit"].argmax())])
        llama_cpp.llama_sampler_accept(sampler, token)
        return token

    def drafted(slot: int, i: int, sampler, logits: list[np.ndarray]) -> int:
        """The greedy answer's first tokens that are read[i]'s (in out[i]; the rest of the read
        leaves the cache), and the token after them: `logits` are the rows read at the prompt's
        last token and at each read token but the last. Stops before an end of generation (the
        answer ends there) and a token short of the limit (the loop appends the next one)."""
        draft, taken = read[i], 0
        token = pick(sampler, logits[0])
        while taken < min(len(draft), limits[i]) - 1 and token == draft[taken] \
                and not llama_cpp.llama_vocab_is_eog(vocab, token):
            taken += 1
            token = pick(sampler, logits[taken])
        out[i] = list(draft[:taken])
        if draft:
            llm._ctx.kv_cache_seq_rm(slot, len(prompts[i]) + taken, -1)
        return token

    group, used = [], 0
    for i in range(len(prompts)):
        need = len(prompts[i]) + max(limits[i], len(read[i]))
        if group and (len(group) == slots or used + need > cells):
            answer(group)
            group, used = [], 0
        group.append(i)
        used += need
    if group:
        answer(group)
    llm._ctx.kv_cache_clear()
    return out


# ---------------------------------------------------------------- the inputs of a model's weights

class _GGMLTensor(ctypes.Structure):
    """ggml.h's struct ggml_tensor (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64); checked against ggml's own accessors on the first tensor read."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]


_GGML_TYPE_F32 = 0


@lru_cache(maxsize=1)
def shared_library(name: str) -> ctypes.CDLL:
    """A ggml library ("ggml", "ggml-base") of llama-cpp-python's, the one libllama already loaded."""
    import llama_cpp.llama_cpp as C
    from llama_cpp._ctypes_extensions import load_shared_library

    return load_shared_library(name, C._base_path)


def ggml_library():
    """libggml-base as llama_cpp loaded it, with the few functions edgelora calls bound."""
    base = shared_library("ggml-base")
    for name, restype, argtypes in (
            ("ggml_get_name", ctypes.c_char_p, [ctypes.c_void_p]),
            ("ggml_nelements", ctypes.c_int64, [ctypes.c_void_p]),
            ("ggml_nbytes", ctypes.c_size_t, [ctypes.c_void_p]),
            ("ggml_is_contiguous", ctypes.c_bool, [ctypes.c_void_p]),
            ("ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
            ("ggml_backend_buffer_is_host", ctypes.c_bool, [ctypes.c_void_p]),
            ("ggml_backend_tensor_get", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t])):
        fn = getattr(base, name)
        fn.restype, fn.argtypes = restype, argtypes
    return base


@lru_cache(maxsize=1)
def _mul_mat_op() -> int:
    """enum ggml_op's value for MUL_MAT, read from ggml's own names (the enum moves between versions)."""
    ggml = ggml_library()
    for op in range(256):
        name = ggml.ggml_op_name(op)
        if name == b"MUL_MAT":
            return op
    raise EdgeloraError("this llama.cpp build has no MUL_MAT operation to observe")


class _EvalObserver:
    """A llama.cpp eval callback (`callback`, for load_llama's `observe`) that calls `_observe(address,
    ask)` and keeps what it raised for `raise_error`: an exception cannot cross llama.cpp's C frames."""

    def __init__(self):
        import llama_cpp.llama_cpp as C

        self.error: BaseException | None = None
        self.callback = C.ggml_backend_sched_eval_callback(self._called)

    def _called(self, address, ask, _user_data) -> bool:
        try:
            return self._observe(address, ask)
        except BaseException as e:  # noqa: BLE001 - an exception cannot cross llama.cpp's C frames
            self.error = e
            return False

    def _observe(self, address, ask: bool) -> bool:
        raise NotImplementedError

    def raise_error(self) -> None:
        """Raise what went wrong inside the callback, if anything did (llama.cpp cannot carry it)."""
        error, self.error = self.error, None
        if error is not None:
            raise error


class WeightInputs(_EvalObserver):
    """What each weight of a model multiplies, as llama.cpp computes it: load a model with
    `load_llama(..., observe=this)` (or runtime.load) and, while `active`, every matrix
    multiplication by a weight `wanted(name)` accepts calls `on_input(name, x)`, x the float32
    activations it multiplied, one row per token (in the order the batch holds them); weights that
    multiply the same input one after another (q, k, v) are given the same array object. Through
    llama.cpp's eval callback, the hook llama-imatrix collects its statistics with."""

    def __init__(self, wanted, on_input):
        super().__init__()
        self.wanted, self.on_input, self.active = wanted, on_input, False
        self._checked = False
        self._last = None  # ((input tensor, its data), its rows) of the last multiplication read

    def new_batch(self) -> None:
        """Forget the last input read: llama.cpp may reuse a graph, its tensors and buffers, for the next batch."""
        self._last = None

    def _observe(self, address, ask: bool) -> bool:
        if not self.active or self.error is not None:
            return False
        t = _GGMLTensor.from_address(address)
        if not self._checked:
            self._check_layout(address, t)
        if t.op != _mul_mat_op() or not t.src[0] or not t.src[1]:
            return False
        weight, x = _GGMLTensor.from_address(t.src[0]), _GGMLTensor.from_address(t.src[1])
        name = weight.name.decode("utf-8", "replace")
        name = name.split("#")[1] if name.count("#") == 2 else name  # CUDA0#blk.0.attn_q.weight#0: a copy's name
        if x.type != _GGML_TYPE_F32 or not self.wanted(name):
            return False
        if not ask:
            source = (t.src[1], x.data)
            if self._last is None or self._last[0] != source:  # q, k and v multiply one input: read it once
                self._last = (source, _rows(t.src[1], x))
            self.on_input(name, self._last[1])
        return True

    def _check_layout(self, address, t: _GGMLTensor) -> None:
        ggml = ggml_library()
        n = 1
        for d in t.ne:
            n *= d
        if ggml.ggml_get_name(address) != t.name or ggml.ggml_nelements(address) != n:
            import llama_cpp

            raise EdgeloraError(f"llama-cpp-python {llama_cpp.__version__}'s ggml lays out its tensors differently "
                                f"from the one edgelora reads ({PINNED}): export with --imatrix none; {NEEDS_PIN}")
        self._checked = True


class LayerInputs(_EvalObserver):
    """The input of each of `layers` (the output of the layer before it) at every token of one
    batched_logits read, as llama.cpp computes it: load the model with `observe=this`, read with
    `before=this.before`, then `stop()`. `at(layer)` gives them back as batched_logits' `inputs`
    for the same read of a file of that layer and the ones after it (TensorSwap.write's
    from_layer): its logits are then the whole file's, bit for bit, for the cost of its layers."""

    def __init__(self, layers):
        super().__init__()
        self.names = {f"l_out-{k - 1}".encode(): k for k in layers}
        self.kept: dict[int, dict] = {k: {} for k in layers}  # layer -> {(sequence index, first position): inputs}
        self._parts: list | None = None  # the batch being read: (sequence index, first position, tokens) per part
        self._got: dict[int, list] = {k: [] for k in layers}

    def before(self, parts) -> None:
        self._parts = parts

    def stop(self) -> None:
        """Keep nothing more (the model may read other things after the one read)."""
        self._parts = None
        self.raise_error()

    def at(self, layer: int):
        kept = self.kept[layer]
        return lambda i, first, n: kept[(i, first)]

    def _observe(self, address, ask: bool) -> bool:
        if self._parts is None or self.error is not None:
            return False
        t = _GGMLTensor.from_address(address)
        layer = self.names.get(t.name)
        if layer is None:
            return False
        if not ask:
            import numpy as np

            got = self._got[layer]
            got.append(_rows(address, t))
            if sum(map(len, got)) == sum(n for _, _, n in self._parts):  # the batch's last part is in
                rows, at = np.concatenate(got), 0
                for i, first, n in self._parts:
                    self.kept[layer][(i, first)] = rows[at:at + n]
                    at += n
                got.clear()
        return True


def _rows(address, t: _GGMLTensor):
    """A float32 tensor's values as a (rows, ne[0]) array, copied out of ggml's buffer."""
    import numpy as np

    ggml = ggml_library()
    shape = tuple(int(d) for d in reversed(t.ne))
    if t.buffer and ggml.ggml_backend_buffer_is_host(t.buffer) and t.data:
        span = (sum((int(n) - 1) * int(s) for n, s in zip(t.ne, t.nb)) + 4) // 4
        flat = np.ctypeslib.as_array((ctypes.c_float * span).from_address(t.data))
        values = np.lib.stride_tricks.as_strided(flat, shape=shape,
                                                 strides=tuple(int(s) for s in reversed(t.nb)))
        return np.array(values, dtype=np.float32).reshape(-1, shape[-1])
    if not ggml.ggml_is_contiguous(address):
        raise EdgeloraError(f"{t.name.decode()}: a non-contiguous tensor outside host memory cannot be read")
    out = np.empty(shape, dtype=np.float32)
    ggml.ggml_backend_tensor_get(address, out.ctypes.data, 0, ggml.ggml_nbytes(address))
    return out.reshape(-1, shape[-1])
