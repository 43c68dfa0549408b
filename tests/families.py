"""Tiny random models of the families the converter supports, with locally trained tokenizers.

Byte-level BPEs that mirror SmolLM2's, Qwen2's and Phi-3's pre-tokenizers and specials, a
SentencePiece-style BPE with byte fallback like Gemma's, random models of each HF model_type with
the shapes that matter for conversion, and PEFT adapters with non-zero B: built in seconds, no hub.
Used by the converter tests and by any test that needs one of these families.
"""
from __future__ import annotations

import functools
from pathlib import Path

import gguf
import torch
from peft import LoraConfig, get_peft_model
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from edgelora.converters.vocab import QWEN2_SPLIT

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. I've been told he's there, you'll see.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 123 2024 12345 3.14159 1,000,000",
    "def main():\n    print('hello world')\n    return 0\n\n",
    "Unicode: café naïve résumé — “quotes” 日本語のテキスト 中文 한국어 Ελληνικά русский",
    "Emoji: 😀 🚀 🦙🦙 ✅ 👍🏽 and tabs\tand  double  spaces   triple",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n",
    "Punctuation glued to words: (normal) [brackets] {braces} $dollars #hash @handle 'RE 'VE 'LL",
    "(normal) $dollars #hash 'RE 'VE (normal) $dollars #hash 'RE 'VE",
] * 20

TRICKY = [
    "Hello world",
    " leading space",
    "   three leading spaces and trailing  ",
    "digits 12345 and 3.14159, 2024-01-01",
    "unicode: café naïve — 日本語 😀🚀 🦙🦙",
    "new\nlines\n\n\nand\ttabs\r\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "I've been 'told' he's there, 'RE you sure?",
    "(normal) [brackets] $dollars #hash @handle",
    "<|user|>\nhi there<|end|>\n<|assistant|>\n </s>  <s> <|endoftext|> x",
]


# Phi-3's added tokens: each strips the whitespace after it (rstrip) but <unk>, <s>, <|endoftext|>
PHI3_SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
PHI3_CHAT = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")


@functools.cache
def train_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE whose pre-tokenizer mirrors SmolLM2 ("llama"), Qwen2 ("qwen2") or
    SmolLM2's with Phi-3's added tokens and chat template instead of ChatML ("phi3")."""
    tok = Tokenizer(models.BPE())
    if kind in ("llama", "phi3"):  # SmolLM2: digits split one by one, then GPT-2's regex; specials first
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        specials = SPECIALS if kind == "llama" else []
    else:  # Qwen2: its own split regex, NFC; specials appended after the BPE vocabulary
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = []
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "phi3":
        tok.add_special_tokens([AddedToken(t, special=True, rstrip=t not in ("<unk>", "<s>", "<|endoftext|>"),
                                           normalized=False) for t in PHI3_SPECIALS])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>", unk_token="<unk>", chat_template=PHI3_CHAT)
    if kind == "qwen2":
        tok.add_special_tokens(SPECIALS)
    bos = "<|im_start|>" if kind == "llama" else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, chat_template=CHATML)


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]


@functools.cache
def train_sentencepiece_tokenizer(space_prefix: bool, metaspace: str | None = None) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE with byte fallback like Gemma's (or Llama 2's, with a ▁ prepended;
    or, with `metaspace` a prepend scheme, newer conversions' Metaspace pre-tokenizer instead of a
    normalizer): spaces become ▁, characters outside a small alphabet become <0xXX> byte tokens,
    and the merges are regenerated from the vocabulary as transformers does when converting a
    SentencePiece model."""
    from transformers.tokenization_utils_base import generate_merges
    steps = [normalizers.Replace(" ", "\u2581")]
    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *steps]) if space_prefix else steps[0]
    # Gemma's pre-tokenizer splits on spaces, of which its normalizer leaves none
    pre = None if space_prefix else pre_tokenizers.Split(" ", behavior="merged_with_previous")
    if metaspace:
        normalizer, pre = None, pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=metaspace, split=False)
    trained = Tokenizer(models.BPE())
    trained.normalizer, trained.pre_tokenizer = normalizer, pre
    trained.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=800, limit_alphabet=60, show_progress=False))
    fixed = GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    pieces = fixed + sorted(trained.get_vocab(), key=trained.get_vocab().get)
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab, generate_merges(vocab, skip_tokens=fixed), unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(GEMMA_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


@functools.cache
def train_unigram_tokenizer(prepend_scheme: str = "always") -> PreTrainedTokenizerFast:
    """A SentencePiece-style Unigram (Viterbi over per-piece log-probabilities, no byte fallback)
    with a Metaspace pre-tokenizer that splits on spaces, ChatML's specials and template."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme, split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme=prepend_scheme, split=True)
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=700, special_tokens=["<unk>", *SPECIALS],
                                                            unk_token="<unk>", show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", chat_template=CHATML)


def randomize(model: torch.nn.Module) -> None:
    """Weights large enough for clearly separated logits; norms and biases not trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.08 * noise)


def build_model(out: Path, kind: str, *, hidden: int = 256, tok: PreTrainedTokenizerFast | None = None,
                **overrides) -> Path:
    """A random model of HF model_type `kind`, tied and stored in bf16 unless said otherwise:
    "llama"/"mistral": 2 blocks, like SmolLM2;
    "qwen2": 2 blocks, untied, f32, with q/k/v biases and embeddings padded past the tokenizer;
    "qwen3": 2 blocks, q/k norms and a head_dim (96) apart from hidden / heads (64);
    "gemma3_text": 4 blocks, sliding-window blocks 0, 1, 3 with a window (8) shorter than the
    prompt and global block 2; query_pre_attn_scalar left at HF's 256 while head_dim is 64;
    "phi3": 2 blocks, fused qkv_proj and gate_up_proj, untied;
    "smollm3": 4 blocks, the fourth without RoPE.
    The tokenizer is a byte-level BPE (`train_tokenizer`) unless `tok` is given."""
    tok = tok or train_tokenizer("qwen2" if kind.startswith("qwen") else "phi3" if kind == "phi3" else "llama")
    config = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, vocab_size=len(tok),
                  tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if kind == "qwen2":
        config.update(vocab_size=len(tok) + 13, tie_word_embeddings=False)
    elif kind == "qwen3":
        config.update(head_dim=96)
    elif kind == "gemma3_text":
        config.update(num_hidden_layers=4, head_dim=64, sliding_window=8, sliding_window_pattern=3)
    elif kind == "phi3":
        config.update(tie_word_embeddings=False)
    elif kind == "smollm3":
        config.update(num_hidden_layers=4)
    config = AutoConfig.for_model(kind, **{**config, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    randomize(model)
    model.to(torch.float32 if kind == "qwen2" else torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_adapter(base_dir: Path, out: Path, **lora) -> Path:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", **lora))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: the adapter would do nothing
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(out)
    return out


def gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()
            if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
