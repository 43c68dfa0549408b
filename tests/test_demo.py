"""`edgelora demo --quick` end to end on the embedded SmolLM2, as CI runs it: the tuned files
beat the untrained base on held-out examples, reports are written, a rerun reuses every stage."""
import json
import time

import pytest

from edgelora.demo import MODES, demo_data
from edgelora.gguf_info import inspect_gguf
from tiny import needs_smollm2, run_cli

pytestmark = [pytest.mark.slow, needs_smollm2]
RUN = "smollm2-135m-extract"  # the demo's run, named for its base and data (config.default_run_dir)


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    t0 = time.time()
    r = run_cli("demo", "--quick", "--out", out)
    assert r.exit_code == 0, r.output
    return out, r.output, time.time() - t0


def test_training_beats_the_base_for_f16_and_q4_k_m(quick_demo):
    out, _, _ = quick_demo
    summary = json.loads((out / "demo.json").read_text())
    for quant in ("f16", "q4_k_m"):
        s = summary["task_score"][quant]
        assert s["after"] > s["before"], (quant, s)
        assert s["after"] >= 0.75, (quant, s)
    before = json.loads((out / "base" / "bench" / "report.json").read_text())
    after = json.loads((out / RUN / "export" / "bench" / "report.json").read_text())
    assert before["expected"] == after["expected"] and after["examples"] == summary["examples"] == MODES["quick"]["limit"]
    assert {r["label"] for r in after["rows"]} == {"f16", "q8_0", "q4_k_m", "q2_k", "q4_1+lora"}
    assert summary["example"]["after"].strip() == summary["example"]["expected"]


def test_outputs_and_printed_report(quick_demo):
    out, output, _ = quick_demo
    export = out / RUN / "export"
    for name in (f"{RUN}-f16.gguf", f"{RUN}-q8_0.gguf", f"{RUN}-q4_k_m.gguf", f"{RUN}-q2_k.gguf", f"{RUN}-lora-f16.gguf",
                 "Modelfile", "Modelfile.lora", "manifest.json", "bench/report.md", "bench/ladder.png"):
        assert (export / name).is_file(), name
    assert "| **" in output and "recommended: " in output
    assert "before -> after training: f16 " in output and "example question: " in output
    assert str(export / f"{RUN}-q4_k_m.gguf") in output
    assert inspect_gguf(export / f"{RUN}-q4_k_m.gguf")["card"]["general.name"] == RUN  # what LM Studio lists


def test_a_rerun_reuses_every_stage(quick_demo):
    out, _, first = quick_demo
    report = (out / RUN / "export" / "bench" / "report.json").read_bytes()
    t0 = time.time()
    r = run_cli("demo", "--quick", "--out", out)
    assert r.exit_code == 0, r.output
    assert r.output.count("done already") == 4
    assert (out / RUN / "export" / "bench" / "report.json").read_bytes() == report
    assert time.time() - t0 < first / 5


def test_demo_data_is_packaged():
    train, evals = demo_data()
    assert sum(1 for _ in train.open()) == 300 and sum(1 for _ in evals.open()) == 60


def test_refit_redoes_only_the_export_and_bench_and_adds_the_refitted_pair(quick_demo, tmp_path):
    import shutil

    src, _, _ = quick_demo
    out = tmp_path / "demo"
    shutil.copytree(src, out)  # the fixture's folder stays as the other tests read it
    train_summary = (out / RUN / "summary.json").read_bytes()
    r = run_cli("demo", "--quick", "--refit", "--out", out)
    assert r.exit_code == 0, r.output
    assert "holds a demo without the refit: redoing its export and bench" in r.output
    assert r.output.count("done already") == 2  # training and the untrained base
    assert (out / RUN / "summary.json").read_bytes() == train_summary
    refit = MODES["quick"]["refit"]
    after = json.loads((out / RUN / "export" / "bench" / "report.json").read_text())
    assert {row["label"] for row in after["rows"]} == {"f16", "q8_0", "q4_k_m", "q2_k", "q4_1+lora", f"{refit}+lora",
                                                         f"{refit}+refit"}
    manifest = json.loads((out / RUN / "export" / "manifest.json").read_text())
    refitted = [o for o in manifest["outputs"] if o.get("refit")]
    assert len(refitted) == 1 and refitted[0]["refit"]["verified"]["passed"], refitted
    summary = json.loads((out / "demo.json").read_text())
    pair = next(row for row in after["rows"] if row["label"] == f"{refit}+refit")
    base, (lora,) = pair["model"], pair["loras"]
    assert base.endswith(f"smollm2-135m-base-{refit}.gguf") and lora.endswith(f"refit-{refit}-lora-f16.gguf")
    assert summary["refit"] is True and summary["files"]["refit"] == f"llama-server -m {base} --lora {lora}"
    assert f"{summary['files']['refit']}    (the refitted pair)" in r.output
    again = run_cli("demo", "--quick", "--refit", "--out", out)
    assert again.exit_code == 0 and again.output.count("done already") == 4, again.output
