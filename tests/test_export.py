"""`edgelora export` on tiny models: files re-read by llama.cpp, logits compared with PEFT."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgelora.errors import EdgeloraError
from edgelora.exporter import export
from edgelora.bases import file_sha256
from edgelora.handoff import MERGED, Role, RunSummary
from tiny import build_model, llama_logits

TOKENS = [1, 20, 31, 42, 53, 64, 75, 86, 97, 108, 119, 130, 141, 152, 163, 174]


def peft_logits(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].numpy()


def close(a, b, rel):
    top1 = (a.argmax(-1) == b.argmax(-1)).mean()
    assert np.abs(a - b).max() <= rel * np.abs(b).max(), np.abs(a - b).max()
    assert top1 >= 0.995, top1


def test_files_manifest_and_modelfiles(run_dir, tiny_export):
    out = run_dir / "export"
    assert tiny_export["merged:f16"].parent == out
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["Modelfile", "Modelfile.lora", "manifest.json", "tiny-run-f16.gguf", "tiny-run-q8_0.gguf",
                            "tiny-run-imatrix.gguf", "tiny-run-lora-f16.gguf", f"{_base_name(run_dir)}-base-f16.gguf",
                            f"{_base_name(run_dir)}-base-q8_0.gguf"])
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"]["adapter"]["sha256"] == file_sha256(run_dir / "adapter" / "adapter_model.safetensors")
    for f in m["outputs"]:
        assert f["sha256"] == file_sha256(out / f["file"]) and f["size_bytes"] == (out / f["file"]).stat().st_size
    by_role = {f["role"]: f for f in m["outputs"]}
    assert by_role["merged:q8_0"]["tensor_types"].get("Q8_0", 0) > 0
    assert by_role["merged:q8_0"]["bpw"] < by_role["merged:f16"]["bpw"]
    assert {"edgelora", "gguf", "llama_cpp_python"} <= set(m["versions"])
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./tiny-run-f16.gguf\n")
    assert "<|im_start|>{{ .Role }}" in modelfile and 'SYSTEM """You are a tiny test model."""' in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    lora_file = (out / "Modelfile.lora").read_text().splitlines()
    base = f"./{_base_name(run_dir)}-base-f16.gguf"
    assert lora_file[:4] == [
        "# Ollama 0.34.1 and later refuse ADAPTER: with those, build ./Modelfile (the merged file) instead.",
        f"# This route runs in llama.cpp: llama-server -m {base} --lora ./tiny-run-lora-f16.gguf",
        f"FROM {base}", "ADAPTER ./tiny-run-lora-f16.gguf"]


def _base_name(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["base"].rstrip("/").split("/")[-1]


def test_merged_f16_matches_peft(run_dir, tiny_export):
    base = json.loads((run_dir / "summary.json").read_text())["base_hf_dir"]
    ref = peft_logits(base, run_dir / "adapter")
    assert np.abs(ref - peft_logits(base, None)).max() > 1e-2  # the adapter really changes the model
    close(llama_logits(run_dir / "export" / "tiny-run-f16.gguf", TOKENS), ref, 1e-2)


def test_base_plus_lora_gguf_matches_merged(run_dir, tiny_export):
    out = run_dir / "export"
    merged = llama_logits(out / "tiny-run-f16.gguf", TOKENS)
    close(llama_logits(out / f"{_base_name(run_dir)}-base-f16.gguf", TOKENS, lora=out / "tiny-run-lora-f16.gguf"), merged, 1e-2)


def test_files_say_who_they_are(run_dir, tiny_export, tmp_path):
    """general.* keys as llama.cpp's converter writes them: what LM Studio and Ollama list."""
    from edgelora import card as C
    from edgelora.gguf_info import format_inspect, inspect_gguf
    from tiny import assert_one_line_error, run_cli

    out = run_dir / "export"
    m = json.loads((out / "manifest.json").read_text())
    base = _base_name(run_dir)
    want = {"general.name": "tiny-run", "general.basename": base.lower(), "general.finetune": "tiny-run",
            "general.size_label": C.gguf.utility.size_label(sum(p.numel() for p in _hf_params(run_dir)), 0, 0, 0),
            "general.base_model.count": 1, "general.base_model.0.name": base,
            "edgelora.base_model.sha256": m["inputs"]["base"]["sha256"],
            "general.dataset.count": 1, "general.dataset.0.name": "chat.jsonl"}
    assert m["card"] == want
    for f in ("tiny-run-f16.gguf", "tiny-run-q8_0.gguf", "tiny-run-lora-f16.gguf"):  # the quantiser keeps the keys
        assert inspect_gguf(out / f)["card"] == want, f
    base_card = inspect_gguf(out / f"{base}-base-f16.gguf")["card"]  # the bare base is not the fine-tune
    assert base_card["general.name"] == base and "general.finetune" not in base_card
    assert base_card["edgelora.base_model.sha256"] == m["inputs"]["base"]["sha256"]
    shown = format_inspect(inspect_gguf(out / "tiny-run-q8_0.gguf"))
    assert "  model card\n    name               tiny-run\n" in shown and "dataset.0.name     chat.jsonl" in shown
    # A GGUF base's own card is carried over to its fine-tune: basename, size, licence, organisation.
    base_gguf = out / f"{base}-base-f16.gguf"
    from_gguf = C.model_card(C.base_card("gguf", base_gguf, Path(".")), "abc", "My Tune", "d.jsonl")
    assert from_gguf["general.finetune"] == "my-tune" and from_gguf["general.size_label"] == want["general.size_label"]
    tuned = C.model_card({"general.name": "Base", "general.languages": ["en", "fr"], "general.tags": ["x"]}, "abc", "t")
    assert tuned["general.languages"] == ["en", "fr"] and "general.tags" not in tuned  # what apps list it under
    r = run_cli("export", run_dir, "--quant", "f16", "--name", "shop-bot", "--out", tmp_path / "named",
                "--imatrix", "none")
    assert r.exit_code == 0, r.output
    assert inspect_gguf(tmp_path / "named" / "shop-bot-f16.gguf")["card"]["general.name"] == "shop-bot"
    r = run_cli("export", run_dir, "--name", "../x", "--out", tmp_path / "bad")
    assert_one_line_error(r, "--name '../x': use letters, digits and . _ + - (it names the files)")
    assert not (tmp_path / "bad").exists()


def _hf_params(run_dir):
    from transformers import AutoModelForCausalLM

    base = json.loads((run_dir / "summary.json").read_text())["base_hf_dir"]
    return list(AutoModelForCausalLM.from_pretrained(base).parameters())


def test_existing_outputs_kept_without_force(run_dir, tiny_export):
    target = run_dir / "export" / "tiny-run-q8_0.gguf"
    before = (target.stat().st_mtime_ns, file_sha256(target))
    with pytest.raises(EdgeloraError, match="tiny-run-q8_0.gguf already exists; use --force"):
        export(str(run_dir), quants=["q8_0"])
    assert (target.stat().st_mtime_ns, file_sha256(target)) == before


def test_plain_conversion_of_a_base(tiny_qwen2, tmp_path):
    res = export(base=str(tiny_qwen2), quants=["f16"], out=str(tmp_path / "o"))
    (f,) = res.files
    assert f.role == Role(MERGED, "f16") and (tmp_path / "o" / f.file).is_file()
    close(llama_logits(tmp_path / "o" / f.file, TOKENS), peft_logits(tiny_qwen2, None), 1e-2)
    from edgelora.gguf_info import inspect_gguf

    named = export(base=str(tiny_qwen2), quants=["f16"], out=str(tmp_path / "n"), name="q-named")
    card = inspect_gguf(named.out_dir / "q-named-f16.gguf")["card"]  # the base's own card, under the name asked for
    assert card["general.name"] == "q-named" and "general.finetune" not in card and "general.size_label" in card


@pytest.mark.parametrize("kwargs, message", [
    (dict(quants=["q5_x"]), "unknown quant 'q5_x' (known: f16, q2_k, q4_k_m, q8_0, all, auto)"),
    (dict(), "export needs a RUN_DIR, or --base MODEL"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(EdgeloraError) as e:
        export(**kwargs) if "quants" not in kwargs else export(base="x", **kwargs)
    assert message in str(e.value)


def imatrix_variant(tiny_export, path, change):
    """A copy of the tiny export's own importance matrix, `change`d (a function of its sums dict)."""
    from edgelora import imatrix as IM

    matrix = IM.read(tiny_export["merged:f16"].parent / "tiny-run-imatrix.gguf")
    change(matrix.sums, matrix.counts)
    return IM.write(matrix, path, "llama")


def test_options_and_input_files_are_checked_before_anything_is_written(run_dir, tiny_export, tiny_llama, tmp_path):
    """Each refused in one line naming what the user gave, and the output folder holds no file."""
    def narrower(sums, counts):
        sums["blk.0.attn_q.weight"] = sums["blk.0.attn_q.weight"][:, :128]

    def another_model(sums, counts):
        sums["blk.7.attn_q.weight"], counts["blk.7.attn_q.weight"] = sums["blk.0.attn_q.weight"], counts["blk.0.attn_q.weight"]

    narrow, other = imatrix_variant(tiny_export, tmp_path / "narrow.gguf", narrower), \
        imatrix_variant(tiny_export, tmp_path / "other.gguf", another_model)
    for kwargs, message in (
            (dict(quants=["q8_0"], target_size="abc"), "--target-size 'abc': give a size such as 70MB or 64MiB"),
            (dict(imatrix_decision_weight=float("inf")),
             "--imatrix-decision-weight must be a finite number, at least 0, not inf"),
            (dict(imatrix=str(narrow)), f"imatrix {narrow}: 'blk.0.attn_q.weight' has 128 values, the tensor needs 256"),
            (dict(imatrix=str(other)), f"imatrix {other}: 'blk.7.attn_q.weight' is not a weight of "
                                       f"{tiny_llama} + adapter (an imatrix made for another model?)")):
        out = tmp_path / "out"
        with pytest.raises(EdgeloraError) as e:
            export(str(run_dir), out=str(out), **{"quants": ["q4_k_m"], **kwargs})
        assert str(e.value).startswith(message), str(e.value)
        assert not out.exists() or not any(out.iterdir())


def test_export_reads_how_training_tokenised_from_the_run_summary_and_from_an_older_runs_config(run_dir, tmp_path):
    """summary.json records seq_len, seed and the held-out share, which the export's calibration and
    verification tokenise with; a run whose summary predates them is read from its config.yaml."""
    import shutil

    from edgelora.config import load_config

    summary, config = RunSummary.read(run_dir), load_config(str(run_dir / "config.yaml"), {})
    assert (summary.seq_len, summary.seed, summary.held_out) == (config.seq_len, config.seed, config.eval_split) != (0, 0, 0)
    older = tmp_path / "older"
    shutil.copytree(run_dir, older, ignore=shutil.ignore_patterns("export"))
    recorded = json.loads((older / "summary.json").read_text())
    for key in ("seq_len", "seed", "held_out"):
        del recorded[key]
    (older / "summary.json").write_text(json.dumps(recorded))
    for run in (run_dir, older):
        result = export(str(run), quants=["f16"], imatrix="none", out=str(tmp_path / f"out-{run.name}"))
        assert result.checks and all(c["passed"] for c in result.checks), result.checks


def test_not_a_run_dir(tmp_path):
    with pytest.raises(EdgeloraError, match="not a finished edgelora run"):
        export(str(tmp_path))


def test_adapter_for_another_base_writes_nothing(run_dir, tiny_tokenizer, tmp_path):
    other = build_model(tmp_path / "wider", "llama", tiny_tokenizer, intermediate=768)
    with pytest.raises(EdgeloraError, match=r"do not fit base model\.layers\.0\.mlp\.down_proj\.weight .*different base model"):
        export(str(run_dir), base=str(other), quants=["f16"], out=str(tmp_path / "o"))
    assert not any(p.suffix == ".gguf" for p in (tmp_path / "o").glob("*"))


def test_failed_quantisation_leaves_no_final_file(run_dir, tmp_path, monkeypatch):
    import edgelora.quantize

    def boom(src, dst, preset, **kw):
        raise EdgeloraError(f"{src}: quantisation failed")

    monkeypatch.setattr(edgelora.quantize, "quantize", boom)
    with pytest.raises(EdgeloraError, match="quantisation failed"):
        export(str(run_dir), quants=["q4_k_m"], out=str(tmp_path / "o"))
    # no model file, not even the intermediate f16: only what a rerun resumes from (the matrix, its record)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".export-progress.json", "tiny-run-imatrix.gguf"]


def test_an_interrupted_export_resumes_keeping_what_it_finished(run_dir, tmp_path, monkeypatch):
    """Killed while making q2_k: the f16, q8_0 and the importance matrix stay, with the record of
    them. Run again with other settings: refused, nothing touched. With the same: only q2_k is
    made (no matrix measured again), the finished files are kept as they are, and the manifest is
    whole, the record gone."""
    from edgelora import exporter as E
    from edgelora.resume import PROGRESS_FILE

    out, quants = tmp_path / "out", ["f16", "q8_0", "q2_k"]
    quantised, measured = [], []
    real_quantize, real_imatrix = E.quantize_searched, E._computed_imatrix

    def quantize(f16, dst, quant, *args, **kw):
        quantised.append(quant)
        if quant == "q2_k" and len(quantised) == 2:
            raise KeyboardInterrupt
        return real_quantize(f16, dst, quant, *args, **kw)

    def imatrix(*args, **kw):
        measured.append(1)
        return real_imatrix(*args, **kw)

    monkeypatch.setattr(E, "quantize_searched", quantize)
    monkeypatch.setattr(E, "_computed_imatrix", imatrix)
    with pytest.raises(KeyboardInterrupt):
        export(str(run_dir), quants=quants, out=str(out))
    finished = ["tiny-run-f16.gguf", "tiny-run-q8_0.gguf", "tiny-run-imatrix.gguf"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*finished, PROGRESS_FILE])
    before = {name: ((out / name).stat().st_mtime_ns, file_sha256(out / name)) for name in finished}
    with pytest.raises(EdgeloraError, match=r"tiny-run-f16.gguf already exists; an export with other settings stopped "
                                            r"here; use --force to start over"):
        export(str(run_dir), quants=quants, out=str(out), effort="fast")
    result = export(str(run_dir), quants=quants, out=str(out))
    assert quantised == ["q8_0", "q2_k", "q2_k"] and measured == [1]
    assert {name: ((out / name).stat().st_mtime_ns, file_sha256(out / name)) for name in finished} == before
    assert not (out / PROGRESS_FILE).exists() and [f.file for f in result.files] == [
        "tiny-run-f16.gguf", "tiny-run-q8_0.gguf", "tiny-run-q2_k.gguf"]
    manifest = json.loads(result.manifest.read_text())
    assert manifest["imatrix"]["sha256"] == file_sha256(out / "tiny-run-imatrix.gguf")
    q8 = {o["role"]: o for o in manifest["outputs"]}["merged:q8_0"]
    assert q8["imatrix_check"]["answers_of"] > 0 and q8["fallbacks"] is not None  # its figures, from the record
    assert all(c["passed"] for c in manifest["checks"])
    with pytest.raises(EdgeloraError, match="already exists; use --force"):  # a finished export is not resumed
        export(str(run_dir), quants=quants, out=str(out))


def test_the_lora_route_is_printed_as_the_llama_cpp_command_that_runs_it(run_dir, tmp_path):
    from tiny import run_cli

    r = run_cli("export", run_dir, "--quant", "f16", "--lora-gguf", "--imatrix", "none", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    base, lora = tmp_path / "o" / f"{_base_name(run_dir)}-base-f16.gguf", tmp_path / "o" / "tiny-run-lora-f16.gguf"
    assert (f"LoRA route (llama.cpp; Ollama 0.34.1+ and LM Studio take the merged file): llama-server -m {base} "
            f"--lora {lora}") in r.output
