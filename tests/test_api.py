import json
import subprocess
import sys

import edgelora


def test_python_api_trains(tiny_qwen2, chat_file, tmp_path):
    res = edgelora.train(base=str(tiny_qwen2), data=str(chat_file), out=str(tmp_path / "run"), method="lora",
                         max_steps=2, seq_len=64, rank=2)
    assert res.run_dir == tmp_path / "run" and res.summary.steps == 2
    assert json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())["r"] == 2


def test_python_api_export_and_load(tiny_qwen2, chat_file, tmp_path):
    edgelora.train(base=str(tiny_qwen2), data=str(chat_file), out=str(tmp_path / "run"), method="lora",
                   max_steps=2, seq_len=64)
    res = edgelora.export(str(tmp_path / "run"), quants=["q8_0"])
    (f,) = res.files
    model = edgelora.load(str(res.out_dir / f.file), device="cpu")
    first = model.chat([{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=8)
    assert isinstance(first, str)
    assert model.chat([{"role": "user", "content": "What is 2 plus 2?"}], max_tokens=8) == first


def test_light_imports():
    """The package and its CLI entry point import neither torch nor transformers."""
    code = ("import sys, edgelora, edgelora.cli, edgelora.data, edgelora.bases, edgelora.config, edgelora.runtime, edgelora.quantize, edgelora.gguf_info; "
            "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
