"""The laptop runtime: a GGUF model (plus LoRA GGUFs) answering through llama-cpp-python.

Only llama_cpp and the standard library: no torch, no transformers, so `pip install edgelora`
is enough to run a fine-tuned model offline.

    rt = load("run/export/run-q4_k_m.gguf")
    print(rt.chat([{"role": "user", "content": "Hi"}]))
    for piece in rt.chat(messages, stream=True): ...

Chat prompts are built by the chat template stored in the GGUF (tokenizer.chat_template), or,
for a base GGUF without one, by the template a LoRA GGUF of edgelora's carries (the one the run
trained with), rendered by llama-cpp-python's Jinja2 formatter; generation stops at the model's
end-of-generation tokens. Temperature 0 (the default) is greedy and reproducible.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import gguf

from .errors import EdgeloraError
from .gguf_header import gguf_metadata
from .llamacpp import LayerInputs, WeightInputs, all_logits, captured_log, handles, load_llama, log_reason, token_text
from .machine import DEVICES

if TYPE_CHECKING:
    from llama_cpp import Llama

_GPU_BUILDS = {"cuda": ("CUDA", "-DGGML_CUDA=on"), "metal": ("Metal", "-DGGML_METAL=on")}  # label, CMake flag
# ggml backend registry names -> our device names (Metal's registry is "MTL" in newer ggml).
_REGISTRY_DEVICE = {"CUDA": "cuda", "Metal": "metal", "MTL": "metal"}
_GGML_GPU, _GGML_IGPU = 1, 2  # enum ggml_backend_dev_type: CPU, GPU, IGPU, ACCEL
CHAT_TEMPLATE = gguf.Keys.Tokenizer.CHAT_TEMPLATE
CTX_STEP = 256  # llama.cpp rounds a context up to a multiple of this; Llama's own buffers must agree
# Reading many short sequences (llamacpp.batched_logits): a batch's most sequences where llama.cpp runs
# on a GPU, and the least context to pack them into (Llama's default batch of 512 tokens). On the CPU
# one sequence a batch: packed 64 to a batch, 8k tokens of the demo's sequences read no faster there
# (19.8 vs 19.0 s on 2 cores).
PACKED_SEQUENCES, PACKED_CTX = 64, 512
# Greedy answers to many prompts generated together (greedy_answers): at most this many sequences and
# KV cells at a time. On 2 CPU cores, the bench's 60 prompts: 14.9 s 16 at a time, 16.7 s 32, 30.6 s 60
# (every step attends over every cell in use), 35 s one after the other.
GENERATION_SEQUENCES, GENERATION_CELLS = 16, 8192
NO_TEMPLATE = "this GGUF has no chat template (tokenizer.chat_template), nor does any LoRA applied to it"
logger = logging.getLogger("edgelora")


# ---------------------------------------------------------------- device

@lru_cache(maxsize=1)
def gpu_backends() -> tuple[str, ...]:
    """Backend names ("CUDA", "Metal", "Vulkan", ...) of the GPUs this llama.cpp build can use.

    Read from ggml's device registry, the list llama.cpp itself offloads to: a CUDA build on a
    machine without an NVIDIA GPU lists none, a CPU-only build never does.
    """
    from .llamacpp import shared_library

    ggml, base = shared_library("ggml"), shared_library("ggml-base")

    def bind(lib, name, restype, *argtypes):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
        return fn

    count = bind(ggml, "ggml_backend_dev_count", ctypes.c_size_t)
    get = bind(ggml, "ggml_backend_dev_get", ctypes.c_void_p, ctypes.c_size_t)
    dev_type = bind(base, "ggml_backend_dev_type", ctypes.c_int, ctypes.c_void_p)
    dev_reg = bind(base, "ggml_backend_dev_backend_reg", ctypes.c_void_p, ctypes.c_void_p)
    reg_name = bind(base, "ggml_backend_reg_name", ctypes.c_char_p, ctypes.c_void_p)
    devices = [get(i) for i in range(count())]
    return tuple(reg_name(dev_reg(d)).decode() for d in devices if dev_type(d) in (_GGML_GPU, _GGML_IGPU))


def pick_device(want: str = "auto") -> tuple[str, int]:
    """(device, n_gpu_layers): auto offloads every layer to the GPU llama.cpp offers, else CPU."""
    import llama_cpp

    if want not in DEVICES:
        raise EdgeloraError(f"unknown device '{want}' (choose from {', '.join(DEVICES)})")
    if want == "cpu":
        return "cpu", 0
    offload = llama_cpp.llama_supports_gpu_offload()
    found = [_REGISTRY_DEVICE.get(name, name.lower()) for name in gpu_backends()] if offload else []
    if want == "auto":
        return (found[0], -1) if found else ("cpu", 0)
    if want in found:
        return want, -1
    label, flag = _GPU_BUILDS[want]
    raise EdgeloraError(
        f"device {want}: llama.cpp finds no {label} GPU (this llama-cpp-python build offers: "
        f"{', '.join(found) or 'CPU only'}); install a {label} build with: CMAKE_ARGS=\"{flag}\" pip install "
        f"--force-reinstall --no-cache-dir llama-cpp-python=={llama_cpp.__version__}")


def reading_sequences(device: str = "auto") -> int:
    """How many sequences to read in one batch on `device` (see PACKED_SEQUENCES)."""
    return PACKED_SEQUENCES if pick_device(device)[0] != "cpu" else 1


# ---------------------------------------------------------------- GGUF files

# GGUF value types -> struct codes (8 = string and 9 = array are read apart).
# ---------------------------------------------------------------- loading

def load(model: str | Path, *, loras: Sequence[tuple[str | Path, float]] = (), device: str = "auto",
         n_ctx: int = 4096, seed: int = 0, threads: int | None = None, verbose: bool = False,
         observe: WeightInputs | LayerInputs | None = None, sequences: int = 1) -> Runtime:
    """Open a GGUF model, with LoRA GGUFs applied at the given scales, on `device`.

    n_ctx is capped to the context the model was trained with, and rounded up (with a warning) to
    the multiple of 256 llama.cpp allocates. `observe` and `sequences`: see llamacpp.load_llama.
    Every problem with the files (missing, not GGUF, an adapter made for another base) is a
    one-line EdgeloraError.
    """
    path = Path(model).expanduser()
    meta = gguf_metadata(path)
    if meta.get(gguf.Keys.General.TYPE) == "adapter":
        raise EdgeloraError(f"model {path} is a LoRA adapter: load its base model and pass this file as a LoRA")
    lora_paths = [(lora_file(p), float(scale)) for p, scale in loras]
    lora_templates = [lora_template(p) for p, _ in lora_paths]
    device, n_gpu_layers = pick_device(device)
    if n_ctx < 1:
        raise EdgeloraError(f"context length must be at least 1 token, not {n_ctx}")
    trained = meta.get(f"{meta.get('general.architecture')}.context_length")
    ctx = -(-min(n_ctx, trained or n_ctx) // CTX_STEP) * CTX_STEP
    if ctx > n_ctx:
        logger.warning("context of %d tokens raised to %d: llama.cpp allocates it in steps of %d", n_ctx, ctx, CTX_STEP)
    with captured_log(verbose) as log:
        try:
            llm = load_llama(path, n_ctx=ctx, n_gpu_layers=n_gpu_layers, seed=seed,
                             n_threads=threads, n_threads_batch=threads, verbose=verbose,
                             op_offload=device != "cpu",  # cpu: no GPU even for large prompt batches
                             observe=observe, sequences=sequences)
        except ValueError:
            raise EdgeloraError(f"model {path}: llama.cpp cannot load it ({log_reason(log)})") from None
    rt = Runtime(llm, device, n_gpu_layers, seed)
    if lora_paths:
        set_loras(llm, [(init_lora(llm, p, path, verbose), scale) for p, scale in lora_paths])
        rt.use_chat_template(*next(((t, p) for (p, _), t in zip(lora_paths, lora_templates) if t), (None, None)))
    return rt


def greedy_answers(model: str | Path, prompts: list[list[int]], limits: list[int], loras=(), n_ctx: int = 0, *,
                   read: Sequence[Sequence[int]] | None = None, on_read=None, json_schema: dict | None = None,
                   device: str = "auto", threads: int | None = None) -> list[list[int]]:
    """The GGUF `model`'s greedy answers to `prompts` (token ids), at most `limits` tokens each,
    generated together (llamacpp.greedy_many: `read` and `on_read` score a given continuation of
    each prompt on the way), held to `json_schema` if given, each ending with an end-of-generation
    token if one came."""
    from .schema import grammar_text
    from .llamacpp import greedy_many

    needs = [len(p) + max(limit, len(r)) for p, limit, r in zip(prompts, limits, read or [()] * len(prompts))]
    cells = max(min(sum(sorted(needs)[-GENERATION_SEQUENCES:]), GENERATION_CELLS), max(needs), n_ctx)
    with load(model, loras=loras, n_ctx=-(-cells // CTX_STEP) * CTX_STEP, device=device, threads=threads,
              sequences=min(len(prompts), GENERATION_SEQUENCES)) as rt:
        return greedy_many(rt.llm, prompts, limits, read=read, on_read=on_read,
                           grammar=None if json_schema is None else grammar_text(json_schema, "JSON schema"))


def answer_text(rt: "Runtime", prompt: list[int], answer: list[int]) -> str:
    """A greedy answer's text as chat() returns it: its tokens after `prompt`, without the
    end-of-generation token that ended it."""
    import llama_cpp

    if answer and llama_cpp.llama_vocab_is_eog(handles(rt.llm)[2], answer[-1]):
        answer = answer[:-1]
    return rt.llm.detokenize(answer, prev_tokens=prompt).decode("utf-8", errors="ignore")


def lora_template(path: Path) -> str | None:
    """The chat template a LoRA GGUF carries (edgelora writes the one its run trained with)."""
    return gguf_metadata(path, "LoRA").get(CHAT_TEMPLATE)


def lora_file(path: str | Path) -> Path:
    """`path` if it is a LoRA adapter GGUF; else a one-line EdgeloraError naming it."""
    path = Path(path).expanduser()
    if gguf_metadata(path, "LoRA").get(gguf.Keys.General.TYPE) != "adapter":
        raise EdgeloraError(f"LoRA {path} is a GGUF model, not a LoRA adapter")
    return path


def init_lora(llm, path: Path, model: Path, verbose: bool = False):
    """llama.cpp's handle for the LoRA GGUF `path` on llm's model (freed with the model).

    Llama(lora_path=) takes one adapter and misses a failed load (a NULL pointer is not None), so
    this uses Llama's model handle."""
    import llama_cpp.llama_cpp as C

    with captured_log(verbose) as log:
        handle = C.llama_adapter_lora_init(handles(llm)[0], str(path).encode())
    if not handle:
        raise EdgeloraError(f"LoRA {path} does not fit model {model.name}: {log_reason(log)}")
    return handle


def set_loras(llm, adapters: Sequence[tuple[object, float]]) -> None:
    """Make exactly these (handle, scale) adapters active in llm's context (none: the bare model)."""
    import llama_cpp.llama_cpp as C

    n = len(adapters)
    array = (C.llama_adapter_lora_p_ctypes * n)(*(h for h, _ in adapters)) if n else None
    scales = (ctypes.c_float * n)(*(s for _, s in adapters)) if n else None
    if C.llama_set_adapters_lora(handles(llm)[1], array, n, scales) != 0:
        raise EdgeloraError("llama.cpp could not attach the LoRA adapters")


# ---------------------------------------------------------------- generation

@dataclass
class Runtime:
    """A loaded model. chat() and complete() return the text, or with stream=True an iterator of pieces."""

    llm: Llama
    device: str
    n_gpu_layers: int
    seed: int = 0
    _template: str | None = field(default=None, init=False, repr=False)  # set by use_chat_template
    _template_file: str | None = field(default=None, init=False, repr=False)  # ... and the LoRA file it came from
    _grammars: dict = field(default_factory=dict, init=False, repr=False)  # JSON schema text -> LlamaGrammar

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Free the model, its context and its mapping of the file now, not when the garbage is collected."""
        self.llm.close()

    @property
    def chat_template(self) -> str | None:
        """The chat template chat() renders with: a LoRA's (use_chat_template), else the GGUF's."""
        return self._template or self.llm.metadata.get(CHAT_TEMPLATE)

    def use_chat_template(self, template: str | None, file: str | Path | None = None) -> None:
        """Render chats with `template` (the template a LoRA was trained with, from `file`); None:
        the GGUF's own. Rendered bounded, as every template is (edgelora.templates)."""
        from .templates import chat_formatter

        self._template, self._template_file = template, None if template is None else str(file)
        self.llm.chat_handler = None if template is None else chat_formatter(self._template_file)(
            template, stop_token_ids=[self.llm.token_eos()], **self._specials()).to_chat_handler()

    def _specials(self) -> dict:
        """The eos_token / bos_token texts a chat template may use, as llama-cpp-python passes them."""
        return dict(eos_token=token_text(self.llm, self.llm.token_eos()),
                    bos_token=token_text(self.llm, self.llm.token_bos()))

    def describe(self) -> str:
        layers = "all" if self.n_gpu_layers < 0 else self.n_gpu_layers
        return f"{self.device} ({layers} layers offloaded)"

    def chat(self, messages: list[dict], *, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 0.95,
             seed: int | None = None, stream: bool = False, json_schema: dict | None = None) -> str | Iterator[str]:
        """Answer a conversation ({"role", "content"} dicts) using the chat template; with
        `json_schema`, decoding is held to it by a llama.cpp grammar (edgelora.schema)."""
        if self.chat_template is None:
            raise EdgeloraError(NO_TEMPLATE + "; use plain completion")
        out = self._generate(self.llm.create_chat_completion, {"messages": messages}, max_tokens, temperature,
                             top_p, seed, stream, json_schema)
        if stream:
            return (piece for c in out if (piece := c["choices"][0]["delta"].get("content")))
        return out["choices"][0]["message"]["content"] or ""

    def chat_finish(self, messages: list[dict], *, max_tokens: int = 512) -> tuple[str, str]:
        """The greedy answer and why it ended: "stop" (an end-of-generation token) or "length"."""
        if self.chat_template is None:
            raise EdgeloraError(NO_TEMPLATE + "; use plain completion")
        out = self._generate(self.llm.create_chat_completion, {"messages": messages}, max_tokens, 0.0, 1.0, None,
                             False)["choices"][0]
        return out["message"]["content"] or "", out["finish_reason"]

    def complete(self, prompt: str, *, max_tokens: int = 512, temperature: float = 0.0, top_p: float = 0.95,
                 seed: int | None = None, stream: bool = False, json_schema: dict | None = None) -> str | Iterator[str]:
        """Continue `prompt` as plain text, without the chat template (held to `json_schema` if given)."""
        out = self._generate(self.llm.create_completion, {"prompt": prompt}, max_tokens, temperature, top_p, seed,
                             stream, json_schema)
        if stream:
            return (piece for c in out if (piece := c["choices"][0]["text"]))
        return out["choices"][0]["text"]

    def chat_tokens(self, messages: list[dict], answer: str | dict | None = None) -> tuple[list[int], list[int]]:
        """The prompt's token ids exactly as chat() feeds them to the model, and, given `answer`
        (its text, or the whole assistant message, e.g. with its reasoning_content), the answer's
        ids as the template closes the turn (its text plus the end-of-turn token): what scoring an
        answer needs."""
        head = self.chat_text(messages)
        # llama-cpp-python's chat formatter writes every special token itself: the tokenizer adds none
        prompt = self.llm.tokenize(head.encode(), add_bos=False, special=True)
        if answer is None:
            return prompt, []
        turn = answer if isinstance(answer, dict) else {"role": "assistant", "content": answer}
        full = self.chat_text([*messages, turn], add_generation_prompt=False)
        if not full.startswith(head):
            raise EdgeloraError("the chat template renders the prompt differently once an answer follows it")
        tail = full[len(head):].rstrip()  # the answer, the end-of-turn token; not the newline after it
        # read on from the prompt, as training read the whole turn: a tokenizer that puts ▁ before the
        # text it is given (SentencePiece's add_space_prefix) would put one before the answer alone
        whole = self.llm.tokenize((head + tail).encode(), add_bos=False, special=True)
        if whole[:len(prompt)] == prompt:
            return prompt, whole[len(prompt):]
        return prompt, self.llm.tokenize(tail.encode(), add_bos=False, special=True)  # tokens merged across the cut

    def chat_text(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """`messages` rendered by the chat template chat() uses (a TemplateError naming its file
        where the template fails: edgelora.templates)."""
        from .templates import chat_formatter

        template = self.chat_template
        if template is None:
            raise EdgeloraError(NO_TEMPLATE)
        return chat_formatter(self._template_file or self.llm.model_path)(
            template, add_generation_prompt=add_generation_prompt, **self._specials())(messages=messages).prompt

    def check_chat_template(self) -> None:
        """Refuse (a TemplateError naming its file) a chat template that cannot render a plain
        conversation, rather than fail on every message; nothing to check without one."""
        if self.chat_template is not None:
            self.chat_text([{"role": "user", "content": "Hello"}])

    def logits(self, tokens: Sequence[int]):
        """Next-token logits (float32 array, one row per token) for `tokens` read from position 0,
        for scoring (perplexity, KL between files): llamacpp.all_logits, within this context."""
        if len(tokens) > self.llm.n_ctx():
            raise EdgeloraError(f"{len(tokens)} tokens do not fit the context of {self.llm.n_ctx()}")
        return all_logits(self.llm, tokens)

    def timings(self) -> dict:
        """llama.cpp's counters for the last answer: prompt tokens evaluated, tokens generated, the
        seconds each took and the tokens/s."""
        import llama_cpp.llama_cpp as C

        t = C.llama_perf_context(handles(self.llm)[1])
        return {"prompt_tokens": t.n_p_eval, "prompt_s": t.t_p_eval_ms / 1e3,
                "prompt_tok_s": t.n_p_eval / t.t_p_eval_ms * 1e3 if t.t_p_eval_ms else 0.0,
                "gen_tokens": t.n_eval, "gen_s": t.t_eval_ms / 1e3,
                "gen_tok_s": t.n_eval / t.t_eval_ms * 1e3 if t.t_eval_ms else 0.0}

    def grammar(self, json_schema: dict):
        """The llama.cpp grammar of `json_schema` (made and checked once per schema)."""
        from llama_cpp import LlamaGrammar

        from .schema import grammar_text

        key = json.dumps(json_schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = LlamaGrammar.from_string(grammar_text(json_schema, "JSON schema"), verbose=False)
        return self._grammars[key]

    def _generate(self, fn, request: dict, max_tokens, temperature, top_p, seed, stream, json_schema=None):
        """fn(**request, ...); llama-cpp-python's ValueErrors (a prompt longer than the context, a
        template that rejects the messages) become EdgeloraError, in streams too."""
        import llama_cpp.llama_cpp as C

        grammar = None if json_schema is None else self.grammar(json_schema)
        C.llama_perf_context_reset(handles(self.llm)[1])
        with _input_errors():
            out = fn(**request, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                     seed=self.seed if seed is None else seed, stream=stream, grammar=grammar)
        return _checked_stream(out) if stream else out


@contextlib.contextmanager
def _input_errors():
    try:
        yield
    except ValueError as e:
        raise EdgeloraError(str(e)) from None


def _checked_stream(chunks):
    with _input_errors():
        yield from chunks
