"""The tokenizer part of a GGUF: vocab, merges or scores, special tokens, chat template.

Three kinds of HF fast tokenizer (tokenizer.json) are supported: byte-level BPE (GPT-2 style:
SmolLM, Qwen, Llama 3), written as llama.cpp's "gpt2" tokenizer; SentencePiece-style BPE with
byte fallback (Gemma, and Llama 2 in its original tokenizer.json), written as llama.cpp's "llama"
one; and SentencePiece-style Unigram (SentencePiece's default model type), written as llama.cpp's
"t5" one, which like HF picks the split with the best sum of the pieces' log-probabilities.
"""
from __future__ import annotations

import base64
import json
import logging
import re
from pathlib import Path

import gguf

from . import ConvertError

log = logging.getLogger(__name__)

# tokenizer.json Split regexes of the model families whose pre-tokenizer llama.cpp implements.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPACE = "\u2581"  # SentencePiece's visible space
_SPACES_TO_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")

# Shape of tokenizer.json's pre_tokenizer (see `_pre_steps`) -> llama.cpp's tokenizer.ggml.pre.
# llama.cpp itself names them by hashing the tokens of a test string, which only works for
# the exact published vocabularies; the pre-tokenizer rules are what actually has to match.
PRE_TOKENIZERS: dict[tuple, str] = {
    (("Digits", True), ("ByteLevel", True)): "smollm",  # SmolLM/SmolLM2, StarCoder-style
    (("ByteLevel", True),): "gpt-2",
    (("Split", QWEN2_SPLIT), ("ByteLevel", False)): "qwen2",
    (("Split", LLAMA3_SPLIT), ("ByteLevel", False)): "llama-bpe",
}


def chat_template(folder: Path) -> str | None:
    """The chat template a HF tokenizer folder holds, wherever transformers stored it:
    chat_template.jinja (transformers 5), or tokenizer_config.json's `chat_template` (a string,
    or a list of named templates, of which "default" is the one used)."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError) as e:
        raise ConvertError(f"{config}: not a valid tokenizer config: {e}") from None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template if isinstance(template, str) and template else None


def read_tokenizer(model_dir: Path) -> dict:
    """`model_dir`'s tokenizer.json, parsed, or the one transformers makes of its SentencePiece
    tokenizer.model (older Llama 2 / Mistral folders ship only that; training used the same
    conversion); ConvertError naming what is wrong."""
    path = tokenizer_file(model_dir)
    if path.name == "tokenizer.model":
        return _from_sentencepiece(model_dir)
    if not path.is_file():
        raise ConvertError(f"{model_dir}: no tokenizer.json (a HF fast tokenizer is required)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None


def tokenizer_file(model_dir: Path) -> Path:
    """The file messages about `model_dir`'s tokenizer name: tokenizer.json, else tokenizer.model."""
    path = model_dir / "tokenizer.json"
    return path if path.is_file() or not (model_dir / "tokenizer.model").is_file() else model_dir / "tokenizer.model"


def _from_sentencepiece(model_dir: Path) -> dict:
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # transformers raises many kinds here: a damaged file, a missing package
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConvertError(f"{model_dir / 'tokenizer.model'}: transformers cannot make a fast tokenizer of it "
                           f"({first})") from None
    if not tok.is_fast:
        raise ConvertError(f"{model_dir / 'tokenizer.model'}: transformers made no fast tokenizer of it")
    log.info("%s: no tokenizer.json; using transformers' conversion of tokenizer.model", model_dir)
    return json.loads(tok.backend_tokenizer.to_str())


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, data: dict, n_vocab: int, template_dir: Path | None = None,
              name: str = "") -> None:
    """The vocabulary of `model_dir`'s tokenizer (`data`: its tokenizer.json, read_tokenizer's); the
    chat template of `template_dir`'s when given (the tokenizer a run trained with: it may have
    added a template the base lacks). `name`: the file's general.name, on which llama.cpp's
    tokenizer partly depends (check_name_rules)."""
    path = tokenizer_file(model_dir)
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    unigram = model.get("type") == "Unigram"
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback"))
    if not (sentencepiece or unigram) and (model.get("type") != "BPE" or decoder.get("type") != "ByteLevel"):
        raise ConvertError(f"{path}: only byte-level BPE (GPT-2 style), SentencePiece-style BPE with byte "
                           "fallback (Llama 2, Gemma) and Unigram tokenizers are supported")

    tokens, types = token_table(data, n_vocab, path)
    check_name_rules(data, name, path)
    if unigram:
        add_unigram(writer, data, tokens, path)
    elif sentencepiece:
        space_prefix = sentencepiece_space_prefix(data, path)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(merge_scores(data, tokens))
        writer.add_add_space_prefix(space_prefix)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name({"pre_tokenizer": applied_pre_tokenizer(template_dir or model_dir,
                                                                                           data)}, path))
        writer.add_token_list(tokens)
    writer.add_token_types(types)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=not (sentencepiece or unigram), n_vocab=n_vocab)
    except ValueError as e:  # malformed merges or special token ids
        raise ConvertError(f"{path}: {e}") from None
    if unigram:  # llama.cpp's "t5" tokenizer otherwise takes T5's ids (unknown 2, end 1, padding 0)
        special.special_token_ids.setdefault("unk", model["unk_id"])
    # HF adds BOS/EOS only when the tokenizer says so; llama.cpp's default differs per type.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    if template_dir is not None:
        special.chat_template = chat_template(template_dir) or special.chat_template
    special.add_to_gguf(writer, quiet=True)


def token_table(data: dict, n_vocab: int, path: Path) -> tuple[list[str], list[int]]:
    """Token texts and types by id; ids the tokenizer does not use become [PADn] (UNUSED).
    A SentencePiece-style vocabulary also has BYTE (<0xXX>) and UNKNOWN tokens."""
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab

    def put(i: int, text: str, kind: gguf.TokenType) -> None:
        if not 0 <= i < n_vocab:
            raise ConvertError(f"{path}: token {text!r} has id {i}, outside the model's {n_vocab} embeddings")
        tokens[i], types[i] = text, kind

    byte_fallback = bool(data["model"].get("byte_fallback"))
    for text, i in vocab_ids(data["model"]).items():
        byte = byte_fallback and _BYTE_TOKEN.fullmatch(text)
        put(i, text, gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL)
    # Added tokens are matched on raw text (not byte-level encoded) by both HF and llama.cpp.
    for added in data.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        put(added["id"], added["content"], kind)
    unk = data["model"].get("unk_token")
    if byte_fallback and unk in data["model"]["vocab"]:
        types[data["model"]["vocab"][unk]] = gguf.TokenType.UNKNOWN
    if data["model"].get("type") == "Unigram" and data["model"].get("unk_id") is not None:
        types[data["model"]["unk_id"]] = gguf.TokenType.UNKNOWN
    return tokens, types


def vocab_ids(model: dict) -> dict[str, int]:
    """tokenizer.json's model vocabulary as text -> id: BPE's is that map, Unigram's a list of
    [text, log-probability] whose positions are the ids."""
    vocab = model.get("vocab") or {}
    return {text: i for i, (text, _) in enumerate(vocab)} if model.get("type") == "Unigram" else vocab


def add_unigram(writer: gguf.GGUFWriter, data: dict, tokens: list[str], path: Path) -> None:
    """A Unigram vocabulary as llama.cpp's "t5" tokenizer: the pieces' log-probabilities as scores,
    SentencePiece's precompiled character map where the normalizer starts with one, ▁ prepended
    as the rest of the normalizer / pre-tokenizer says (sentencepiece_space_prefix). llama.cpp
    runs the Viterbi search over the whole text between special tokens, HF's over each word
    when Metaspace splits: the same while no piece holds a ▁ past its first character."""
    model = data["model"]
    if model.get("byte_fallback"):
        raise ConvertError(f"{path}: a Unigram tokenizer with byte fallback: llama.cpp's Unigram tokenizer has "
                           "none (it would read characters outside the vocabulary as the unknown token)")
    if model.get("unk_id") is None:
        raise ConvertError(f"{path}: a Unigram tokenizer without an unknown token: llama.cpp's needs one")
    normalizer = data.get("normalizer") or {}
    steps = (normalizer.get("normalizers") or []) if normalizer.get("type") == "Sequence" else [normalizer]
    charsmap = steps[0].get("precompiled_charsmap") if steps and steps[0].get("type") == "Precompiled" else None
    rest = [step for step in (steps[1:] if charsmap is not None else steps) if step]  # what the map leaves
    words = not any(SPACE in text[1:] for text in vocab_ids(model))
    space_prefix = sentencepiece_space_prefix(
        {**data, "normalizer": {"type": "Sequence", "normalizers": rest} if rest else None}, path, split_ok=words)
    writer.add_tokenizer_model("t5")
    writer.add_token_list(tokens)
    scores = {i: score for i, (_, score) in enumerate(model["vocab"])}
    writer.add_token_scores([scores.get(i, 0.0) for i in range(len(tokens))])
    writer.add_add_space_prefix(space_prefix)
    writer.add_remove_extra_whitespaces(False)
    if charsmap:
        writer.add_precompiled_charsmap(base64.b64decode(charsmap))
        log.warning("%s: HF applies the character map to each grapheme, llama.cpp to each character: a CR LF line "
                    "end (one grapheme) becomes one ▁ in HF, two in llama.cpp", path)


# llama.cpp's tokenizer takes a model whose general.name holds "phi3" or "phi-3" for Phi-3
# (llama-vocab.cpp): it strips the whitespace after each added token but PHI3_KEPT (rstrip, as
# Phi-3's tokenizer.json says), and after "</s>", looking each of these tokens up by text.
PHI3_NAMES = ("phi3", "phi-3")
PHI3_KEPT = ("<unk>", "<s>", "<|endoftext|>")


def _phi3_named(name: str) -> bool:
    return any(n in name.lower() for n in PHI3_NAMES)


def _phi3_stripped(data: dict) -> set[str]:
    """The added tokens llama.cpp strips the whitespace after in a model named phi3."""
    return {a["content"] for a in data.get("added_tokens") or [] if a["content"] not in PHI3_KEPT} | {"</s>"}


def llama_cpp_name(data: dict, name: str) -> str:
    """`name`, or `name (phi-3)` for a tokenizer (`data`: its tokenizer.json) that strips the
    whitespace after its added tokens as Phi-3's does: llama.cpp does the same only for a model
    whose name says phi-3."""
    stripped = {a["content"] for a in data.get("added_tokens") or [] if a.get("rstrip")}
    if _phi3_named(name) or not stripped or stripped != _phi3_stripped(data):
        return name
    log.info("general.name %r: with ' (phi-3)' added, for llama.cpp to strip the whitespace after the special tokens "
             "as the HF tokenizer does", name)
    return f"{name} (phi-3)"


def check_name_rules(data: dict, name: str, path: Path) -> None:
    """Refuse a general.name that makes llama.cpp look up tokens this vocabulary lacks (the GGUF
    would not load); warn where llama.cpp and HF would strip different whitespace around added
    tokens (what `edgelora export` then checks on the run's own examples)."""
    stripped = set()
    if _phi3_named(name):
        known = set(vocab_ids(data["model"])) | {a["content"] for a in data.get("added_tokens") or []}
        missing = [t for t in ("</s>", *PHI3_KEPT) if t not in known]
        if missing:
            raise ConvertError(f"{path}: llama.cpp reads a model named {name!r} as Phi-3 and looks up its token "
                               f"{missing[0]!r}, which this vocabulary lacks (the GGUF would not load): choose a "
                               "name without 'phi3' or 'phi-3'")
        stripped = _phi3_stripped(data)
    for a in data.get("added_tokens") or []:
        text, ours = a["content"], a["content"] in stripped
        if a.get("lstrip") or bool(a.get("rstrip")) != ours:
            side, hf = ("before", True) if a.get("lstrip") else ("after", bool(a.get("rstrip")))
            log.warning("%s: the HF tokenizer %s the whitespace %s %r, llama.cpp's (for a model named %r) %s it%s",
                        path, "strips" if hf else "keeps", side, text, name, "keeps" if hf else "strips",
                        " (it strips after added tokens only for a model named phi3 or phi-3)" if side == "after"
                        else "")
            return


def sentencepiece_space_prefix(data: dict, path: Path, split_ok: bool = False) -> bool:
    """Whether the text gets a leading ▁ (llama.cpp's add_space_prefix) on top of spaces becoming ▁.

    llama.cpp's "llama" tokenizer does that and nothing else, on the whole text between special
    tokens: the normalizer must be Gemma's (spaces to ▁) or Llama 2's (a ▁ prepended, then the
    same), with no pre-tokenizer but Gemma's split on spaces (none are left by then); or no
    normalizer and the same as a Metaspace pre-tokenizer that does not split (newer conversions:
    Mistral v0.3). Metaspace puts no ▁ before text that starts with a space, and with "first"
    only at the start of the input; llama.cpp puts one before the text at the start and after
    every special token: where that differs is warned about (export's template check then tells
    whether the run's own prompts meet it). `split_ok`: a Metaspace that splits into words is
    the same (the vocabulary has no piece that spans a word boundary).
    """
    normalizer, pre = data.get("normalizer") or {}, data.get("pre_tokenizer")
    if not normalizer and pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE \
            and (split_ok or not pre.get("split", True)):
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme != "never":
            log.warning("%s: Metaspace (prepend_scheme %r) puts no ▁ before text that starts with a space%s; "
                        "llama.cpp does, at the start and after each special token", path, scheme,
                        ", nor after a special token" if scheme == "first" else "")
        return scheme != "never"
    steps = (normalizer.get("normalizers") or []) if normalizer.get("type") == "Sequence" else [normalizer]
    prefix = steps[:1] == [{"type": "Prepend", "prepend": SPACE}]
    no_split = pre is None or (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "})
    if steps[int(prefix):] != [_SPACES_TO_SPACE] or not no_split:
        raise ConvertError(f"{path}: SentencePiece-style tokenizer with a normalizer / pre-tokenizer llama.cpp "
                           "does not reproduce; supported: Gemma's (spaces to ▁) and Llama 2's (▁ prepended too)")
    return prefix


def merge_scores(data: dict, tokens: list[str]) -> list[float]:
    """llama.cpp's "llama" tokenizer repeatedly joins the adjacent pair whose joined text is the
    best-scored token: a token scores by the rank of the first merge making it, so that the joins
    follow the BPE merges. Tokens no merge makes (characters, bytes, specials) score lowest."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(data["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    return [-1.0 - rank.get(text, len(rank)) for text in tokens]


def _pre_steps(pre: dict | None) -> tuple:
    pre = pre or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    shape = []
    for step in steps:
        kind = step.get("type")
        if kind == "Digits":
            shape.append((kind, bool(step.get("individual_digits"))))
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            shape.append((kind, bool(step.get("use_regex", True))))
        elif kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            shape.append((kind, (step.get("pattern") or {}).get("Regex")))
        else:
            shape.append((kind, repr(step)))
    return tuple(shape)


def applied_pre_tokenizer(folder: Path, data: dict) -> dict | None:
    """The pre-tokenizer transformers really applies to `folder`'s tokenizer, which training used:
    a tokenizer class may put its own over tokenizer.json's (transformers 5's Qwen2Tokenizer
    splits digits one by one whatever the file says). tokenizer.json's where transformers is absent."""
    try:
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(folder).backend_tokenizer
    except (ImportError, OSError, ValueError, AttributeError, KeyError):
        return data.get("pre_tokenizer")
    return json.loads(backend.to_str()).get("pre_tokenizer")


def pre_tokenizer_name(data: dict, path: Path) -> str:
    name = PRE_TOKENIZERS.get(_pre_steps(data.get("pre_tokenizer")))
    if name is None:
        log.warning("%s: pre-tokenizer not recognised; writing 'default', llama.cpp may split text "
                    "differently from HF", path)
        return "default"
    return name


def hf_pre_tokenizer(name: str):
    """The `tokenizers` pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre` name, or None.

    The inverse of PRE_TOKENIZERS, for tokenizers rebuilt from a GGUF: transformers gives them a
    plain GPT-2 pre-tokenizer whatever the GGUF says, so digits would split differently in
    training than in llama.cpp.
    """
    from tokenizers import Regex, pre_tokenizers as pt

    for shape, pre_name in PRE_TOKENIZERS.items():
        if pre_name != name:
            continue
        steps = []
        for kind, arg in shape:
            if kind == "Digits":
                steps.append(pt.Digits(individual_digits=arg))
            elif kind == "ByteLevel":
                steps.append(pt.ByteLevel(add_prefix_space=False, use_regex=arg))
            else:
                steps.append(pt.Split(Regex(arg), behavior="isolated", invert=False))
        return steps[0] if len(steps) == 1 else pt.Sequence(steps)
    return None
