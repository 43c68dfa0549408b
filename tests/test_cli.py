import json
import os
import signal
import subprocess
import sys
import time


from tiny import assert_one_line_error, ctrl_c_default, run_cli, write_jsonl


def test_help_lists_train_options():
    r = run_cli("train", "--help")
    assert r.exit_code == 0
    for opt in ("--base", "--data", "--method", "--dora", "--rslora", "--rank", "--alpha", "--targets",
                "--max-steps", "--grad-accum", "--seq-len", "--resume", "--device", "--eval-split"):
        assert opt in r.output


def test_malformed_data_is_one_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": "fine"}', '{"text": "fine"}', "{nope"])
    assert_one_line_error(run_cli("train", "--data", bad, "--out", tmp_path / "run"), "bad.jsonl:3: malformed JSON")
    assert not (tmp_path / "run").exists()


def test_empty_file_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_one_line_error(run_cli("train", "--data", empty, "--out", tmp_path / "run"), "empty.jsonl: empty data file")


def test_missing_base_is_one_line(chat_file, tmp_path):
    r = run_cli("train", "--base", tmp_path / "nope", "--data", chat_file, "--out", tmp_path / "run")
    assert_one_line_error(r, "nope' not found")


def test_config_file_and_flag_precedence(tiny_llama, chat_file, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text(f"base: {tiny_llama}\ndata: {chat_file}\nmethod: lora\nrank: 16\nmax-steps: 2\nseq_len: 64\n")
    r = run_cli("train", conf, "--rank", "2", "--out", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output
    saved = (tmp_path / "run/config.yaml").read_text()
    assert "rank: 2\n" in saved and "alpha: 4.0\n" in saved and "seq_len: 64\n" in saved
    assert json.loads((tmp_path / "run/adapter/adapter_config.json").read_text())["r"] == 2
    assert_one_line_error(run_cli("train", conf, "--out", tmp_path / "run"), "already exists; use --force")


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tiny_llama, chat_file, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "edgelora.cli", "train", "--base", str(tiny_llama), "--data", str(chat_file),
            "--out", str(out), "--method", "lora", "--max-steps", "400", "--batch-size", "2", "--seq-len", "64",
            "--save-every", "1000"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=ctrl_c_default)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "checkpoint saved to" in stderr and "--resume" in stderr
    ckpts = list((out / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "adapter" / "adapter_model.safetensors").is_file()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 2 <= stopped_at < 400
    r = run_cli("train", "--base", tiny_llama, "--data", chat_file, "--out", out, "--method", "lora",
                "--max-steps", stopped_at + 2, "--batch-size", "2", "--seq-len", "64", "--save-every", "1000", "--resume")
    # max-steps differs from the interrupted run, which is allowed; the data order is kept.
    assert r.exit_code == 0, r.output
    assert f"trained {stopped_at + 2} steps" in r.output


def test_export_and_inspect_commands(tiny_llama, chat_file, tmp_path):
    run = tmp_path / "run"
    assert run_cli("train", "--base", tiny_llama, "--data", chat_file, "--out", run, "--method", "lora",
                   "--max-steps", "2", "--seq-len", "64").exit_code == 0
    r = run_cli("export", run, "--quant", "q8_0", "--quant", "f16")
    assert r.exit_code == 0, r.output
    assert "run-q8_0.gguf" in r.output and "bpw" in r.output and "manifest:" in r.output
    gguf_file = run / "export" / "run-q8_0.gguf"
    r = run_cli("inspect", gguf_file)
    assert r.exit_code == 0 and "llama" in r.output and "Q8_0" in r.output, r.output
    info = json.loads(run_cli("inspect", gguf_file, "--json").output)
    assert info["arch"] == "llama" and info["tensor_types"]["Q8_0"] > 0 and "tensors" not in info
    assert_one_line_error(run_cli("export", run, "--quant", "q8_0"), "run-q8_0.gguf already exists; use --force")
    assert run_cli("export", run, "--quant", "q8_0", "--force").exit_code == 0
    assert_one_line_error(run_cli("export", run, "--quant", "q3_x"), "unknown quant 'q3_x'")


def test_inspect_rejects_non_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    assert_one_line_error(run_cli("inspect", bad), "model.gguf")


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from edgelora.cli import main; "
            "main(['train', '--data', 'd.jsonl', '--out', 'o'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert (out.returncode, out.stderr) == (1, "error: edgelora train needs torch: pip install 'edgelora[train]'\n")


def test_train_options_are_the_config_fields():
    """Each TrainConfig field the CLI shows is an option whose help states the field's own default;
    a value given on the command line lands in that field."""
    import dataclasses

    from edgelora.cli import main
    from edgelora.config import TrainConfig, default_text

    options = {p.name: p for p in main.commands["train"].params}
    shown = [f for f in dataclasses.fields(TrainConfig) if f.metadata["cli"]]
    assert {"base", "lr", "device", "grad_checkpointing", "json_schema"} <= {f.name for f in shown}
    for f in shown:
        help_text = options[f.name].help
        assert help_text.startswith(f.metadata["help"]), f.name
        assert help_text.endswith(f"[default: {default_text(f)}]" if default_text(f) else f.metadata["help"]), f.name
    assert options["data_format"].opts == ["--format"] and "extra" not in options and "keep_checkpoints" in options
    lr = next(f for f in dataclasses.fields(TrainConfig) if f.name == "lr")
    assert default_text(lr) == "2e-4" and TrainConfig().lr == 2e-4
    r = run_cli("train", "--format", "shapeless", "--data", "x.jsonl", "--out", "o")
    assert r.exit_code == 2 and "'shapeless' is not one of 'auto', 'chat', 'instruction', 'text'" in r.output


def test_export_options_default_as_the_python_api():
    """Each export option that is also a keyword of edgelora.exporter.export has the same default there."""
    import inspect

    from edgelora.cli import main
    from edgelora.exporter import export

    api = inspect.signature(export).parameters
    shared = {p.name: p.default for p in main.commands["export"].params
              if p.name in api and isinstance(p.default, (bool, int, float, str))}  # those with a default
    assert {"imatrix", "effort", "imatrix_decision_weight", "verify"} <= set(shared)
    assert {name: api[name].default for name in shared} == shared


def test_export_efforts_as_the_python_api():
    """--effort offers exporter.EFFORTS, and --imatrix-tokens's help gives their token budgets."""
    from edgelora.cli import main
    from edgelora.exporter import EFFORTS

    options = {p.name: p for p in main.commands["export"].params}
    assert list(options["effort"].type.choices) == list(EFFORTS)
    assert f"{EFFORTS['fast'].imatrix_tokens} at --effort fast, else {EFFORTS['default'].imatrix_tokens}" \
        in options["imatrix_tokens"].help
    assert EFFORTS["thorough"].imatrix_tokens == EFFORTS["default"].imatrix_tokens
