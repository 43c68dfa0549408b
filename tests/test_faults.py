"""Faults in every command, one test per class: full and read-only disks, outputs that are files,
leftovers of killed runs, damaged inputs and run files, values that pass a type check and then
crash, a base without a chat template, and bad runtime options. Each asserts the exit code, the
one-line message and what it names, no traceback, and the file system afterwards.
(`edgelora serve` against hostile clients: test_faults_serve.py.)"""
import contextlib
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import assert_one_line_error, build_model, build_tokenizer, cfg, chat_rows, run_cli, write_jsonl


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A small tmpfs mounted at `path` (root only): a disk that fills up, or one that is read-only."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or 'not root'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`edgelora ARGS` as a real process: stderr holds its log lines too (CliRunner's capture misses
    the logging handler, which keeps the stream it was set up with)."""
    return subprocess.run([sys.executable, "-m", "edgelora.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def tree(path: Path) -> list[str]:
    """Every entry below `path`, hidden ones included, relative."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------------------- OS errors on outputs

def test_full_disk_while_writing_a_gguf_is_one_line_and_leaves_nothing(run_dir, tmp_path, monkeypatch):
    # The converter refuses up front when the disk is too small (a test below); a disk that fills
    # up while writing (another process writing too) is simulated by skipping that check.
    from edgelora import files

    monkeypatch.setattr(files, "check_free_space", lambda *a: None)
    with tmpfs(tmp_path / "disk", "1m") as disk:
        r = run_cli("export", run_dir, "--quant", "f16", "--out", disk / "out")
        assert_one_line_error(r, f"{disk / 'out' / 'tiny-run-f16.gguf'}: No space left on device")
        assert tree(disk) == ["out"]  # no temporary, nothing under the final name


def test_full_disk_in_llama_cpps_quantiser_is_one_line_and_leaves_nothing(run_dir, tiny_export, tmp_path,
                                                                            monkeypatch):
    from edgelora import files

    monkeypatch.setattr(files, "check_free_space", lambda *a: None)
    f16_bytes = tiny_export["merged:f16"].stat().st_size
    with tmpfs(tmp_path / "disk", str(f16_bytes + 256 * 1024)) as disk:  # the f16 fits, its q8_0 beside it does not
        r = run_cli("export", run_dir, "--quant", "q8_0", "--out", disk / "out")
        assert_one_line_error(r, "tiny-run-q8_0.gguf")
        assert "No space left on device" in r.output
        # no temporary, no model file: the importance matrix and its record, which a rerun resumes from
        assert tree(disk) == ["out", "out/.export-progress.json", "out/tiny-run-imatrix.gguf"]


def test_a_disk_known_to_be_too_small_is_refused_before_writing(run_dir, tmp_path):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        assert_one_line_error(run_cli("export", run_dir, "--quant", "f16", "--out", disk / "out"),
                              "not enough disk space")
        assert tree(disk) == ["out"]


def test_read_only_output_folder(run_dir, chat_file, tiny_llama, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert_one_line_error(run_cli("export", run_dir, "--quant", "f16", "--out", ro / "out"),
                              f"{ro / 'out'}: Read-only file system")
        assert_one_line_error(run_cli("train", "--base", tiny_llama, "--data", chat_file, "--out", ro / "run",
                                      "--method", "lora", "--max-steps", 1),
                              f"{ro / 'run'}: Read-only file system")
        assert tree(ro) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_out_naming_an_existing_file(run_dir, chat_file, tiny_llama, tmp_path, force):
    target = tmp_path / "taken"
    target.write_text("keep me")
    assert_one_line_error(run_cli("export", run_dir, "--quant", "f16", "--out", target, *force),
                          f"output folder {target} is a file, not a folder")
    assert_one_line_error(run_cli("train", "--base", tiny_llama, "--data", chat_file, "--out", target,
                                  "--method", "lora", "--max-steps", 1, *force),
                          f"run directory {target} is a file, not a folder")
    assert_one_line_error(run_cli("demo", "--out", target, *force), f"demo folder {target} is a file, not a folder")
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(2))
    assert_one_line_error(run_cli("bench", run_dir / "export", "--eval-data", evals, "--out", target, *force),
                          f"report folder {target} is a file, not a folder")
    assert target.read_text() == "keep me"


def test_a_killed_exports_temporaries_are_swept_by_the_next_run(run_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "export", str(run_dir), "--quant", "q8_0",
                             "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not any(
            p.name.endswith(".tmp") for p in (out.iterdir() if out.is_dir() else [])):
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    left = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert left, "the export finished before it could be killed"
    assert not (out / "tiny-run-q8_0.gguf").exists()
    alive = out / ".tiny-run-q8_0.gguf.1.abcdefgh.tmp"  # pid 1 lives: a run still writing keeps its temporary
    alive.mkdir()
    r = run_cli("export", run_dir, "--quant", "q8_0", "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["tiny-run-q8_0.gguf", "tiny-run-imatrix.gguf", "Modelfile", "manifest.json", alive.name])


# ---------------------------------------------------------------- damaged inputs

def test_invalid_utf8_in_data_names_the_line(tmp_path, tiny_export):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    r = run_cli("train", "--data", data, "--out", tmp_path / "run")
    assert_one_line_error(r, "bad.jsonl:2: not valid UTF-8 (byte 0xe9 at column 14)")
    assert not (tmp_path / "run").exists()
    evals = tmp_path / "eval.jsonl"
    evals.write_bytes(b'{"instruction": "\xff", "output": "x"}\n')
    r = run_cli("bench", tiny_export["merged:f16"], "--eval-data", evals, "--out", tmp_path / "bench")
    assert_one_line_error(r, "eval.jsonl:1: not valid UTF-8 (byte 0xff")
    assert not (tmp_path / "bench").exists()


def test_a_leading_bom_is_fine(tmp_path):
    from edgelora.data import read_jsonl

    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "fine"}\n{"text": "too"}\n')
    examples, shape = read_jsonl(data)
    assert shape == "text" and [e.text for e in examples] == ["fine", "too"]


def test_json_nested_200000_deep_in_data_names_the_line(tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "fine"}\n{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    assert_one_line_error(run_cli("train", "--data", data, "--out", tmp_path / "run"),
                          "deep.jsonl:2: JSON nested too deeply")


@pytest.mark.parametrize("content, message", [
    ("{not json", "damaged run summary, not valid JSON"),
    ("[1, 2]", "damaged run summary, not a JSON object"),
    ('{"steps": 3}', "damaged run summary, no 'base'"),
    (b"\xff\xfe", "damaged run summary, not valid JSON (invalid UTF-8"),
])
def test_damaged_summary_json(run_dir, tmp_path, content, message):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    (run / "summary.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_line_error(run_cli("export", run, "--quant", "f16"), f"{run / 'summary.json'}: {message}")
    assert not (run / "export").exists()


@pytest.mark.parametrize("mangle, message", [
    (lambda m: "{torn", "damaged export manifest, not valid JSON"),
    (lambda m: json.dumps({**m, "outputs": [{"file": "x.gguf"}]}), "damaged export manifest (output 1) (no 'role')"),
    (lambda m: json.dumps({**m, "inputs": 5}), "damaged export manifest (its inputs or outputs are not what an export"),
])
def test_damaged_manifest_json(tiny_export, tmp_path, mangle, message):
    export = tmp_path / "export"
    shutil.copytree(tiny_export["merged:f16"].parent, export, ignore=shutil.ignore_patterns("bench"))
    manifest = export / "manifest.json"
    manifest.write_text(mangle(json.loads(manifest.read_text())))
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(2))
    assert_one_line_error(run_cli("bench", export, "--eval-data", evals), message)
    assert not (export / "bench").exists()


def interrupted_run(tiny_llama, chat_file, out: Path) -> Path:
    """A run stopped at step 4 of 6 with checkpoints at steps 2 and 4."""
    from edgelora.trainer import TrainingInterrupted, train

    with pytest.raises(TrainingInterrupted):
        train(cfg(tiny_llama, chat_file, out, save_every=2, eval_split=0.0), on_step=lambda step, loss: step == 4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    return out


RESUME = ["--method", "lora", "--max-steps", 6, "--batch-size", 4, "--seq-len", 64, "--lr", 5e-3, "--rank", 4,
          "--dropout", 0.0, "--eval-split", 0.0, "--eval-every", 3, "--save-every", 2, "--resume"]


def test_resume_skips_a_truncated_checkpoint_and_a_torn_metrics_line(tiny_llama, chat_file, tmp_path):
    out = interrupted_run(tiny_llama, chat_file, tmp_path / "run")
    state = out / "checkpoints" / "step-0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # a disk that lost the end of the newest checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a kill while writing a metrics row
    r = cli("train", "--base", tiny_llama, "--data", chat_file, "--out", out, *RESUME)
    assert r.returncode == 0, r.stderr
    assert f"{state}: damaged checkpoint (" in r.stderr and "trying an older checkpoint" in r.stderr
    assert "resuming from" in r.stderr and "step-0000002 (step 2 of 6)" in r.stderr
    assert "metrics.jsonl:5: damaged metrics row skipped" in r.stderr
    assert "Traceback" not in r.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_resume_with_every_checkpoint_damaged_is_one_line(tiny_llama, chat_file, tmp_path):
    out = interrupted_run(tiny_llama, chat_file, tmp_path / "run")
    for weights in (out / "checkpoints").glob("*/adapter/adapter_model.safetensors"):
        weights.write_bytes(b"\x00" * 8)
    r = run_cli("train", "--base", tiny_llama, "--data", chat_file, "--out", out, *RESUME)
    assert_one_line_error(r, "--resume: no usable checkpoint in")
    assert "adapter_model.safetensors: damaged checkpoint" in r.output.splitlines()[-1]
    assert len(list((out / "checkpoints").iterdir())) == 2  # nothing deleted


def test_damaged_run_config_on_resume(tiny_llama, chat_file, tmp_path):
    out = interrupted_run(tiny_llama, chat_file, tmp_path / "run")
    (out / "config.yaml").write_text("rank: [\n")
    r = run_cli("train", "--base", tiny_llama, "--data", chat_file, "--out", out, *RESUME)
    assert_one_line_error(r, f"{out / 'config.yaml'}: damaged run config")


def absurd_header(src: Path, dst: Path) -> Path:
    """`src` with its first metadata key's length field set to 2**60."""
    data = bytearray(src.read_bytes())
    struct.pack_into("<Q", data, 24, 2**60)  # magic, version, tensor count, kv count, then the first key's length
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("command", ["run", "chat", "serve", "lora"])
def test_a_gguf_header_with_an_absurd_length_is_one_line(tiny_export, tmp_path, command):
    bad = absurd_header(tiny_export["merged:f16"], tmp_path / "bad.gguf")
    args = {"run": ["run", bad, "-p", "hi"], "chat": ["chat", bad], "serve": ["serve", bad, "--port", 0],
            "lora": ["run", tiny_export["base:f16"], "--lora", bad, "-p", "hi"]}[command]
    what = "LoRA" if command == "lora" else "model"
    assert_one_line_error(run_cli(*args), f"{what} {bad}: truncated or corrupt GGUF header (a length of "
                                          f"{2**60:,} at byte 32 runs past the end")


# ---------------------------------------------------------------- values that pass a type check, then crash

@pytest.mark.parametrize("yaml_text, flags, message", [
    ("batch_size: 2.5\n", [], "c.yaml: invalid config: batch_size must be a whole number, not 2.5"),
    ("epochs: .inf\n", [], "c.yaml: invalid config: epochs must be a finite number, not inf"),
    ("lr: fast\n", [], "c.yaml: invalid config: lr must be a number, not 'fast'"),
    ("dora: 1\n", [], "c.yaml: invalid config: dora must be true or false, not 1"),
    ("rank: true\n", [], "c.yaml: invalid config: rank must be a number, not True"),
    ("eval_data: 5\n", [], "c.yaml: invalid config: eval_data must be a string, not 5"),
    ("", ["--epochs", "inf"], "invalid config: epochs must be a finite number, not inf"),
    ("", ["--epochs", "nan"], "invalid config: epochs must be a finite number, not nan"),
    ("", ["--targets", ","], "invalid config: targets must be attn, all-linear or layer names separated by commas"),
    ("", ["--seed", "-1"], "invalid config: seed must be in [0, 2**32), not -1"),
    ("", ["--warmup-steps", "-2"], "invalid config: warmup_steps must be >= 0, not -2"),
])
def test_bad_values_are_refused_before_anything_is_written(chat_file, tmp_path, yaml_text, flags, message):
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml_text)
    r = run_cli("train", conf, "--data", chat_file, "--out", tmp_path / "run", *flags)
    assert_one_line_error(r, message)
    assert not (tmp_path / "run").exists()


def test_yaml_floats_without_a_dot_are_numbers(chat_file, tmp_path):
    from edgelora.config import load_config

    conf = tmp_path / "c.yaml"
    conf.write_text("lr: 1e-4\nbatch_size: 2.0\n")  # PyYAML reads 1e-4 as a string; 2.0 is a whole number
    c = load_config(str(conf), {})
    assert (c.lr, c.batch_size) == (1e-4, 2) and isinstance(c.batch_size, int)


# ---------------------------------------------------------------- a base without a chat template

def test_a_template_less_base_exports_files_that_chat(tmp_path, chat_file):
    """Trained from a base whose tokenizer has no chat template (like the Gemma-3-270M base GGUF),
    edgelora trains with ChatML; that template must reach the merged GGUF, the LoRA GGUF, both
    Modelfiles, and the chat path of run and bench for both routes."""
    import gguf
    from edgelora import runtime
    from edgelora.errors import EdgeloraError
    from edgelora.exporter import export
    from edgelora.trainer import train

    tok = build_tokenizer(tmp_path / "tok")
    tok.chat_template = None
    base = build_model(tmp_path / "plain-base", "llama", tok)
    assert not (base / "chat_template.jinja").exists()
    run = tmp_path / "plain-run"
    train(cfg(base, chat_file, run, max_steps=4, lr=2e-2, eval_split=0.0))
    res = export(str(run), quants=["f16"], lora_gguf=True)
    files = {str(f.role): res.out_dir / f.file for f in res.files}

    def template(path):
        field = gguf.GGUFReader(path).fields.get("tokenizer.chat_template")
        return field and field.contents()

    trained = (run / "adapter" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in trained
    assert template(files["merged:f16"]) == template(files["lora"]) == trained
    assert template(files["base:f16"]) is None  # the base itself has none: the LoRA GGUF carries it
    for modelfile in ("Modelfile", "Modelfile.lora"):
        text = (res.out_dir / modelfile).read_text()
        assert "TEMPLATE" in text and "<|im_start|>" in text and 'PARAMETER stop "<|im_end|>"' in text

    question = [{"role": "user", "content": "What is 3 plus 3?"}]
    merged = runtime.load(files["merged:f16"])
    routed = runtime.load(files["base:f16"], loras=[(files["lora"], 1.0)])
    assert merged.chat_tokens(question) == routed.chat_tokens(question)
    assert merged.chat(question, max_tokens=8) == routed.chat(question, max_tokens=8)
    with pytest.raises(EdgeloraError, match="no chat template"):
        runtime.load(files["base:f16"]).chat(question)
    r = run_cli("run", files["base:f16"], "--lora", files["lora"], "-p", "What is 3 plus 3?", "--max-tokens", 8)
    assert r.exit_code == 0, r.output
    evals = write_jsonl(tmp_path / "eval.jsonl", chat_rows(2))
    r = run_cli("bench", res.out_dir, "--eval-data", evals, "--no-hf", "--max-tokens", 4)
    assert r.exit_code == 0, r.output
    assert "f16+lora" in r.output


# ---------------------------------------------------------------- runtime options

@pytest.mark.parametrize("command", ["run", "chat"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_tokens_below_one_is_refused(tiny_export, command, value):
    args = [command, tiny_export["merged:f16"], "--max-tokens", value] + (["-p", "hi"] if command == "run" else [])
    r = run_cli(*args)
    assert r.exit_code == 2 and "Invalid value for '--max-tokens'" in r.output and "Traceback" not in r.output


def test_a_context_below_llama_cpps_step_is_raised_and_said(tiny_export):
    r = cli("run", tiny_export["merged:f16"], "--ctx", 16, "-p", "What is 3 plus 3?", "--max-tokens", 2)
    assert r.returncode == 0, r.stderr
    assert "context of 16 tokens raised to 256: llama.cpp allocates it in steps of 256" in r.stderr


def test_ctrl_c_in_any_command_is_exit_130_without_traceback(run_dir, tmp_path, monkeypatch):
    from edgelora import exporter

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "export", interrupted)
    r = run_cli("export", run_dir, "--quant", "f16", "--out", tmp_path / "out")
    assert r.exit_code == 130 and r.output.strip().endswith("interrupted") and "Traceback" not in r.output
