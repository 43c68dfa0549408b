import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HUB_OFFLINE"] = "1"

from tiny import build_gguf, build_model, build_tokenizer, cfg, chat_rows, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_model(tmp_path_factory.mktemp("llama"), "llama", tiny_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_model(tmp_path_factory.mktemp("qwen2"), "qwen2", tiny_tokenizer, seed=1)


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_rows())


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, tiny_llama, chat_file) -> dict:
    """role -> path of `edgelora export tiny-run --quant f16 --quant q8_0 --lora-gguf` after 6 quick
    LoRA steps on the tiny llama: merged:f16, merged:q8_0, lora, base:f16, base:q8_0."""
    from edgelora.exporter import export
    from edgelora.trainer import train

    run = tmp_path_factory.mktemp("tiny-export") / "tiny-run"
    train(cfg(tiny_llama, chat_file, run, max_steps=6, lr=2e-2, eval_split=0.0))
    res = export(str(run), quants=["f16", "q8_0"], lora_gguf=True)
    return {str(f.role): res.out_dir / f.file for f in res.files}


@pytest.fixture(scope="session")
def run_dir(tiny_export) -> Path:
    """The run directory `tiny_export` trained (its export/ folder holds the files)."""
    return tiny_export["merged:f16"].parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """edgelora's base-model cache goes to a per-session temp dir, never ~/.cache; session-scoped,
    so module-scoped fixtures (trained runs, the demo) use it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELORA_CACHE", str(tmp_path_factory.getbasetemp() / "edgelora-cache"))
        yield


@pytest.fixture(scope="session", autouse=True)
def _llama_cpp_policy():
    """Every Llama the tests open follows edgelora's loading policy (see edgelora/llamacpp.py:
    this machine advertises AMX that faults, so quantised weights avoid the AMX buffers)."""
    from edgelora.llamacpp import model_params_policy

    with model_params_policy():
        yield


@pytest.fixture(scope="session")
def wider_gguf(tmp_path_factory) -> Path:
    """A GGUF of the tiny llama's shape but wider feed-forward layers (768), written without torch:
    a model tiny_export's LoRA does not fit."""
    return build_gguf(tmp_path_factory.mktemp("wider") / "wider.gguf", intermediate=768)[0]
