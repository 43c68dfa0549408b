"""examples/: the datasets and their generator scripts, the YAML configs (trained for a few real
steps on the embedded SmolLM2-135M) and the Python API script (run as a user would)."""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from edgelora.config import load_config
from edgelora.data import read_jsonl
from tiny import needs_smollm2

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"
# config -> (data shape, data files it reads)
CONFIGS = {
    "extract.yaml": ("chat", ["extract_train.jsonl", "extract_eval.jsonl"]),
    "chat.yaml": ("chat", ["support_chat.jsonl"]),
    "instruction.yaml": ("instruction", ["units_instruction.jsonl"]),
}
# generator script -> the files it writes
GENERATORS = {
    "make_extract_dataset.py": ["extract_train.jsonl", "extract_eval.jsonl"],
    "make_chat_dataset.py": ["support_chat.jsonl"],
    "make_instruction_dataset.py": ["units_instruction.jsonl"],
    "make_records_dataset.py": ["records_train.jsonl", "records_eval.jsonl"],
}


@pytest.mark.parametrize("script", sorted(GENERATORS))
def test_generators_reproduce_the_committed_files(script, tmp_path):
    cmd, out = [sys.executable, str(EXAMPLES / script), "--out", str(tmp_path / "out")], tmp_path / "out"
    subprocess.run(cmd, check=True, cwd=tmp_path, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(GENERATORS[script])
    for name in GENERATORS[script]:
        assert (out / name).read_bytes() == (DATA / name).read_bytes(), f"{name} differs from {script}'s output"


def test_every_dataset_is_listed_in_the_licence():
    licence = (DATA / "LICENSE").read_text()
    assert "CC0 1.0" in licence
    for script, files in GENERATORS.items():
        assert f"examples/{script}" in licence
        for name in files:
            assert name in licence
    assert sorted(p.name for p in DATA.glob("*.jsonl")) == sorted(f for fs in GENERATORS.values() for f in fs)


def test_chat_dataset_shape():
    examples, shape = read_jsonl(DATA / "support_chat.jsonl")
    assert shape == "chat" and 60 <= len(examples) <= 120
    turns = []
    for ex in examples:
        roles = [m["role"] for m in ex.messages]
        assert roles[0] == "system" and roles[-1] == "assistant", ex.source
        assert roles[1:] == ["user", "assistant"] * (len(roles) // 2), ex.source
        assert all(m["content"].startswith("Lumo Support here.") for m in ex.messages if m["role"] == "assistant")
        turns.append(roles.count("assistant"))
    assert min(turns) == 1 and max(turns) >= 3  # single- and multi-turn conversations
    assert sum(t > 1 for t in turns) >= len(turns) // 3


def test_instruction_dataset_shape():
    rows = [json.loads(line) for line in (DATA / "units_instruction.jsonl").read_text().splitlines()]
    assert all(set(r) == {"instruction", "input", "output"} for r in rows)
    assert any(r["input"] for r in rows) and any(not r["input"] for r in rows)  # "input" is optional
    assert all(re.fullmatch(r"\d+(\.\d+)? [A-Za-z]+", r["output"]) for r in rows)
    assert len({json.dumps(r) for r in rows}) == len(rows)
    examples, shape = read_jsonl(DATA / "units_instruction.jsonl")
    assert shape == "instruction" and len(examples) == len(rows)
    for ex, r in zip(examples, rows):  # instruction, a blank line and the input (if any) as the user turn
        assert ex.messages == [
            {"role": "user", "content": f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"]},
            {"role": "assistant", "content": r["output"]}]


def test_extract_dataset_shape():
    for name, n in (("extract_train.jsonl", 300), ("extract_eval.jsonl", 60)):
        examples, shape = read_jsonl(DATA / name)
        assert shape == "chat" and len(examples) == n
        assert all([m["role"] for m in ex.messages] == ["user", "assistant"] for ex in examples)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_config_loads_and_names_its_command(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # data paths in the configs are relative to the repository root
    cfg = load_config(str(EXAMPLES / config), {})
    shape, files = CONFIGS[config]
    assert cfg.base == "smollm2-135m" and cfg.method == "qlora" and cfg.max_steps
    assert [Path(p).name for p in (cfg.data, cfg.eval_data) if p] == files
    assert read_jsonl(cfg.data, cfg.data_format)[1] == shape
    assert cfg.eval_data or cfg.eval_split > 0  # every example reports an eval loss
    assert f"edgelora train examples/{config} --out runs/" in (EXAMPLES / config).read_text()


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_config_trains_on_smollm2(config, tmp_path, monkeypatch):
    from edgelora.trainer import train

    monkeypatch.chdir(ROOT)
    cfg = load_config(str(EXAMPLES / config), dict(out=str(tmp_path / "run"), max_steps=2, batch_size=2))
    cfg = dataclasses.replace(cfg, eval_data=None, eval_split=0.0)  # eval off: a few steps only
    res = train(cfg)
    s = res.summary
    assert s.steps == 2 and s.method == "qlora" and s.data_format == CONFIGS[config][0]
    assert s.truncated_examples == 0 and s.dropped_examples == 0, "the config's seq_len cuts examples"
    assert math.isfinite(s.final_loss)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.slow
@needs_smollm2
def test_python_api_script(tmp_path):
    out = tmp_path / "api"
    proc = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), "--out", str(out), "--steps", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").is_file()
    for name in ("api-q4_k_m.gguf", "api-lora-f16.gguf", "manifest.json"):
        assert (out / "export" / name).is_file(), name
    assert (out / "export" / "api-q4_k_m.gguf").read_bytes()[:4] == b"GGUF"
    answer = proc.stdout.split("answer:", 1)[1].strip()  # the loaded model said something
    assert answer, proc.stdout
