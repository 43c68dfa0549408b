"""The files one stage hands the next: versioned, typed, read back with one clear error."""
import json

import pytest

from edgelora.errors import EdgeloraError
from edgelora.handoff import (LORA, MERGED, AdapterInput, BaseInput, BenchReport, ExportedFile, ExportManifest, Role,
                              RunSummary)
from tiny import assert_one_line_error, run_cli

OLDER = {"base": "smollm2-135m", "base_path": "/x/base.gguf", "base_hf_dir": "/x/hf", "base_sha256": "ab" * 32,
         "data": "data/train.jsonl", "data_format": "chat", "method": "qlora", "dora": False, "rslora": False,
         "rank": 8, "alpha": 16.0, "targets": "all-linear", "device": "cpu", "compute_dtype": "float32",
         "trainable_params": 10, "total_params": 100, "train_examples": 3, "eval_examples": 0,
         "truncated_examples": 0, "dropped_examples": 0, "steps": 60, "final_loss": 0.01,
         "first_eval_loss": None, "final_eval_loss": None, "mean_tokens_per_s": 89.8, "peak_mem_mb": 5308.8,
         "wall_time_s": 1547.2, "versions": {"edgelora": "0.1.0"}}  # session 5's layout: no schema key, fewer keys


def test_roles_read_as_written():
    for text, role in [("merged:q4_k_m", Role(MERGED, "q4_k_m")), ("lora", Role(LORA)), ("base:f16", Role("base", "f16"))]:
        assert Role.parse(text) == role and str(role) == text
    assert {Role.parse("merged:auto"): 1}[Role(MERGED, "auto")] == 1  # usable as keys


def test_a_summary_from_an_older_edgelora_reads_with_defaults(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({**OLDER, "a_key_from_later": 1}))
    s = RunSummary.read(tmp_path)
    assert (s.base, s.steps, s.data_format) == ("smollm2-135m", 60, "chat")
    assert (s.world_size, s.fsdp, s.grad_checkpointing, s.json_schema) == (1, False, None, None)
    (tmp_path / "again").mkdir()
    s.write(tmp_path / "again")
    assert RunSummary.read(tmp_path / "again") == s
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["edgelora_schema"] == 1


@pytest.mark.parametrize("change, message", [
    ({"edgelora_schema": 2}, r"summary.json: written by a newer edgelora \(layout 2; this one reads up to 1\); upgrade"),
    ({"edgelora_schema": "one"}, r"summary.json: damaged run summary \(edgelora_schema is 'one'\)"),
    ({"steps": "sixty"}, r"summary.json: damaged run summary \('steps' is 'sixty'\)"),
    ({"dora": 1}, r"summary.json: damaged run summary \('dora' is 1\)"),
    ({"base_sha256": None}, r"summary.json: damaged run summary \('base_sha256' is None\)"),
])
def test_a_damaged_or_newer_summary_is_named(tmp_path, change, message):
    (tmp_path / "summary.json").write_text(json.dumps({**OLDER, **change}))
    with pytest.raises(EdgeloraError, match=message):
        RunSummary.read(tmp_path)


def test_manifest_and_report_layouts_are_checked(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs": {}, "outputs": [], "edgelora_schema": 3}))
    with pytest.raises(EdgeloraError, match="manifest.json: written by a newer edgelora"):
        ExportManifest.read(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"nothing": []}))
    with pytest.raises(EdgeloraError, match="report.json: damaged bench report, no 'rows'"):
        BenchReport.read(tmp_path)


MANIFEST = ExportManifest(
    "extract", BaseInput("smollm2-135m", "gguf", "/x/base.gguf", "ab" * 32), AdapterInput("/x/run/adapter", "cd" * 32),
    [ExportedFile(Role(MERGED, "q4_k_m"), "extract-q4_k_m.gguf", "ef" * 32, 105_000_000, 6.17, "q4_k_m", "MOSTLY_Q4_K_M",
                  {"Q5_0": 150}, {"attn_q": {"Q5_0": 30}}, imatrix=True, fallbacks={"count": 180}),
     ExportedFile(Role(LORA), "extract-lora-f16.gguf", "01" * 32, 9_000_000, 16.0, "f16")],
    imatrix={"file": "extract-imatrix.gguf", "computed": True}, seconds={"total": 12.5})


def test_a_manifest_reads_back_as_written(tmp_path):
    path = MANIFEST.write(tmp_path)
    data = json.loads(path.read_text())
    assert list(data)[:4] == ["edgelora_schema", "name", "inputs", "outputs"]
    assert data["inputs"]["base"]["kind"] == "gguf" and data["outputs"][1]["role"] == "lora"
    again = ExportManifest.read(tmp_path)
    assert again == MANIFEST
    assert again.outputs_by_role()[Role(MERGED, "q4_k_m")].bpw == 6.17
    data["outputs"][0]["from_a_newer_edgelora"] = 1  # keys it does not know are passed over
    path.write_text(json.dumps(data))
    assert ExportManifest.read(tmp_path) == MANIFEST


@pytest.mark.parametrize("change, message", [
    (lambda d: d["outputs"][1].pop("file"), r"damaged export manifest \(output 2\) \(no 'file'\)"),
    (lambda d: d["outputs"][0].update(size_bytes="big"), r"damaged export manifest \(output 1\) \('size_bytes' is 'big'\)"),
    (lambda d: d.update(outputs={"role": "lora"}), r"damaged export manifest \(its inputs or outputs are not"),
    (lambda d: d["inputs"].pop("base"), r"damaged export manifest \(its inputs or outputs are not"),
    (lambda d: d["inputs"]["base"].pop("path"), r"damaged export manifest \(base\) \(no 'path'\)"),
    (lambda d: d["inputs"]["adapter"].update(path=3), r"damaged export manifest \(adapter\) \('path' is 3\)"),
])
def test_a_damaged_manifest_is_named(tmp_path, change, message):
    path = MANIFEST.write(tmp_path)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(EdgeloraError, match=f"manifest.json: {message}"):
        ExportManifest.read(tmp_path)


def test_export_of_a_run_from_a_newer_edgelora_is_one_line(run_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "edgelora_schema": 2}))
    assert_one_line_error(run_cli("export", run, "--quant", "f16", "--out", tmp_path / "o"),
                          "summary.json: written by a newer edgelora (layout 2")
    assert not (tmp_path / "o").exists()


def test_a_report_reads_back_and_a_damaged_row_is_named(tmp_path):
    from edgelora.handoff import BenchRow

    row = BenchRow("q4_k_m", "merged", "/x/q4.gguf", 105_000_000, 6.17, 0.95, 1.01, 0.002, 0.99, answers=["{}"])
    report = BenchReport("eval.jsonl", 1, 0.97, {"score": "json"}, "q4_k_m", [row],
                         {"label": "q4_k_m", "model": "/x/q4.gguf", "text": "recommended: q4_k_m"}, ["{}"])
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report.as_json()))
    assert BenchReport.read(tmp_path) == report and BenchReport.read(tmp_path).row("q4_k_m").kl == 0.002
    data = report.as_json()
    del data["rows"][0]["kl"]
    path.write_text(json.dumps(data))
    with pytest.raises(EdgeloraError, match=r"report.json: damaged bench report \(row 1\) \(no 'kl'\)"):
        BenchReport.read(tmp_path)
    path.write_text(json.dumps({**report.as_json(), "examples": "one"}))
    with pytest.raises(EdgeloraError, match=r"report.json: damaged bench report \('examples' is 'one'\)"):
        BenchReport.read(tmp_path)
