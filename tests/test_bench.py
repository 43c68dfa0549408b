"""`edgelora bench` on a tiny exported model: the ladder measured, reports re-read, numbers cross-checked."""
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from edgelora import runtime
from edgelora.bench import bench, final_answer, json_fields, make_scorer, pick_score, read_eval, task_result
from edgelora.errors import EdgeloraError
from edgelora.exporter import export
from edgelora.handoff import BenchReport, BenchRow
from edgelora.bench.report import recommend
from edgelora.trainer import train
from tiny import assert_one_line_error, cfg, chat_rows, run_cli, write_jsonl

LIMIT = 5


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama, chat_file):
    run = tmp_path_factory.mktemp("bench") / "tiny-run"
    train(cfg(tiny_llama, chat_file, run, max_steps=8, lr=2e-2, eval_split=0.0))
    res = export(str(run), quants=["f16", "q8_0", "q2_k"], lora_gguf=True)
    return run, res.out_dir


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("eval") / "eval.jsonl", chat_rows(8)[3:])


@pytest.fixture(scope="module")
def ladder(exported, eval_file):
    _, out_dir = exported
    return bench([str(out_dir)], str(eval_file), quants=["q8_0", "q2_k"], limit=LIMIT, hf=True, progress=False,
                 threads=2)


def rows_by_label(report):
    return {r.label: r for r in report.rows}


def test_ladder_rows_and_reference(ladder, exported):
    _, out_dir = exported
    rows = rows_by_label(ladder.report)
    assert set(rows) == {"f16", "q8_0", "q2_k", "f16+lora", "q8_0+lora", "q2_k+lora", "hf"}
    assert ladder.report.reference == "f16" and ladder.report.rows[0].label == "f16"
    manifest = {o["file"]: o for o in json.loads((out_dir / "manifest.json").read_text())["outputs"]}
    for label in ("f16", "q8_0", "q2_k"):
        r = rows[label]
        assert r.size_bytes == (out_dir / f"tiny-run-{label}.gguf").stat().st_size
        assert r.bpw == manifest[f"tiny-run-{label}.gguf"]["bpw"]
        assert r.load_s > 0 and r.gen_tok_s > 0 and r.prompt_tok_s > 0 and r.peak_rss_mb > 50
        assert len(r.answers) == LIMIT
    assert rows["f16"].size_bytes > rows["q8_0"].size_bytes > rows["q2_k"].size_bytes
    lora_file = out_dir / "tiny-run-lora-f16.gguf"
    assert rows["q2_k+lora"].loras == [str(lora_file)]
    base_q2 = rows["q2_k+lora"].model
    assert base_q2.endswith("-base-q2_k.gguf")
    assert rows["q2_k+lora"].size_bytes == Path(base_q2).stat().st_size + lora_file.stat().st_size


def test_quality_numbers_order_as_expected(ladder):
    rows = rows_by_label(ladder.report)
    assert rows["f16"].kl == 0.0 and rows["f16"].top1 == 1.0
    assert 0 < rows["q8_0"].kl < rows["q2_k"].kl
    assert rows["q8_0"].top1 >= rows["q2_k"].top1
    # base f16 + LoRA GGUF is the merged f16 computed another way; torch's fp32 model is the unrounded one
    assert rows["f16+lora"].kl < 1e-3 and rows["f16+lora"].top1 >= 0.95
    assert rows["hf"].kl < 1e-3 and rows["hf"].top1 >= 0.95
    assert rows["hf"].perplexity == pytest.approx(rows["f16"].perplexity, rel=0.01)
    assert rows["f16"].task_score == rows["hf"].task_score


def test_perplexity_matches_transformers_own_loss(ladder, exported, eval_file):
    """Perplexity of the answers, computed independently: HF's shifted cross-entropy over
    labels masked to the answer tokens of the HF chat template."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = exported
    tok = AutoTokenizer.from_pretrained(run / "adapter")
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                      run / "adapter").eval()
    nll, n = 0.0, 0
    for row in read_eval(str(eval_file), LIMIT):
        prompt = tok.apply_chat_template(row["messages"], add_generation_prompt=True)["input_ids"]
        answer = tok(row["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + answer])
        labels = torch.tensor([[-100] * len(prompt) + answer])
        with torch.no_grad():
            nll += model(input_ids=ids, labels=labels).loss.item() * len(answer)
        n += len(answer)
    rows = rows_by_label(ladder.report)
    assert rows["hf"].perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert rows["f16"].perplexity == pytest.approx(math.exp(nll / n), rel=0.01)


def test_a_reasoning_models_answer_is_scored_after_its_think_block(tmp_path):
    """The text after </think> is what is scored (the generation prompt may already have opened
    the block); the eval set's reasoning_content is read, and room is made for it."""
    assert final_answer("<think>\nadd\n</think>\n\n6") == "6"
    assert final_answer("add 3 and 3\n</think>\n\n6") == "6" and final_answer(" 6") == " 6"
    path = write_jsonl(tmp_path / "e.jsonl", [{"messages": [
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6", "reasoning_content": "add"}]}])
    (row,) = read_eval(str(path))
    assert row["answer"] == "6" and row["reasoning"] == "add"
    assert task_result("exact", None, ["<think>\nadd\n</think>\n\n6"], [row]) == {"task_score": 1.0}
    assert task_result("exact", None, ["<think>\nadd\n</think>\n\n7"], [row]) == {"task_score": 0.0}


def test_task_score_is_the_share_of_right_answers(ladder, eval_file):
    expected = [r["answer"] for r in read_eval(str(eval_file), LIMIT)]
    assert ladder.report.expected == expected
    for r in ladder.report.rows:
        assert r.task_score == sum(a.strip() == e for a, e in zip(r.answers, expected)) / LIMIT


def test_answers_are_what_chat_answers_one_at_a_time(ladder, exported, eval_file):
    """The scored answers come from all the examples generated together (bench/gguf_row.py); each is
    the answer chat() gives that example on its own, base + LoRA rows too."""
    rows = read_eval(str(eval_file), LIMIT)
    max_tokens = ladder.report.settings["max_tokens"]
    for row in ladder.report.rows:
        if row.route == "hf":
            continue
        rt = runtime.load(row.model, loras=[(p, 1.0) for p in row.loras])
        alone = [rt.chat(r["messages"], max_tokens=max_tokens, temperature=0.0) for r in rows]
        assert row.answers == alone, row.label


def test_the_torch_rows_answers_are_the_same_generated_together(exported, eval_file, tmp_path, monkeypatch):
    """The HF row times a few prompts one at a time and generates the rest together, left-padded:
    the answers (and the scores) are those of every prompt generated alone."""
    from edgelora.bench import gguf_row, torch_row
    from edgelora.bench.candidates import Settings, discover

    _, out_dir = exported
    rows = read_eval(str(eval_file), None)
    cands = discover([str(out_dir)], ["f16"], hf=True)
    s = Settings(score="exact", max_tokens=48)
    gguf_row.measure_gguf(cands[0], rows, s, tmp_path, lambda: None)  # the reference: tokens.json and its log-probabilities
    hf = next(c for c in cands if c.route == "hf")
    results = {}
    for alone in (len(rows), 0):
        monkeypatch.setattr(torch_row, "SPEED_EXAMPLES", alone)
        monkeypatch.setattr(torch_row, "BATCH", 2)
        results[alone] = torch_row.measure_hf(hf, rows, s, tmp_path, lambda: None)
    assert results[0]["answers"] == results[len(rows)]["answers"] and len(results[0]["answers"]) == len(rows)
    assert results[0]["kl"] == results[len(rows)]["kl"] and results[0]["gen_tok_s"] > 0


def test_reports_are_written_and_reread(ladder):
    assert json.loads(ladder.files["json"].read_text()) == json.loads(json.dumps(ladder.report.as_json()))
    report = BenchReport.read(ladder.out_dir)
    assert report == ladder.report
    md = ladder.files["md"].read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(report.rows)
    best = report.recommendation["label"]
    assert f"| **{best}** |" in md and report.recommendation["text"] in md
    assert best == recommend(report.rows, report.threshold)[0].label
    png = ladder.files["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = np.frombuffer(png[16:24], dtype=">u4")
    assert width > 600 and height > 300
    assert not (ladder.out_dir / ".scratch").exists()


def test_kl_of_a_file_against_its_copy_is_zero(exported, eval_file, tmp_path):
    _, out_dir = exported
    f16 = out_dir / "tiny-run-f16.gguf"
    copy = tmp_path / "copy-f16.gguf"
    shutil.copy(f16, copy)
    res = bench([str(f16), str(copy)], str(eval_file), limit=2, out=str(tmp_path / "b"), progress=False)
    rows = rows_by_label(res.report)
    assert rows["copy-f16"].kl == 0.0 and rows["copy-f16"].top1 == 1.0
    assert rows["copy-f16"].perplexity == rows["tiny-run-f16"].perplexity
    assert rows["copy-f16"].answers == rows["tiny-run-f16"].answers


def test_chat_tokens_match_the_hf_template(exported, tiny_llama):
    from transformers import AutoTokenizer

    _, out_dir = exported
    rt = runtime.load(out_dir / "tiny-run-f16.gguf")
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    msgs = [{"role": "user", "content": "What is 7 plus 7?"}]
    prompt, answer = rt.chat_tokens(msgs, "7 plus 7 is 14.")
    assert prompt == tok.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert answer == tok("7 plus 7 is 14.<|im_end|>", add_special_tokens=False)["input_ids"]
    # logits() rows equal llama-cpp-python's own logits_all evaluation
    from edgelora.llamacpp import load_llama

    ref = load_llama(out_dir / "tiny-run-f16.gguf", n_ctx=128, logits_all=True, verbose=False)
    ref.eval(prompt + answer)
    np.testing.assert_allclose(rt.logits(prompt + answer), ref.scores[:len(prompt) + len(answer)], atol=1e-4)
    assert rt.chat(msgs, max_tokens=8) == rt.chat(msgs, max_tokens=8)  # generation is unaffected afterwards


# ---------------------------------------------------------------- pure logic

def row(label, size, score, top1=1.0, route="merged", reference=False):
    return BenchRow(label, route, label, size * 2**20, 16.0 * size / 100, score, perplexity=1.0, kl=0.0, top1=top1,
                    reference=reference)


def test_recommendation_on_constructed_numbers():
    rows = [row("f16", 100, 0.90, reference=True), row("q8_0", 53, 0.90), row("q4_k_m", 30, 0.88),
            row("q2_k", 20, 0.50), row("hf", 10, 1.0, route="hf")]
    best, text = recommend(rows, 0.97)
    assert best.label == "q4_k_m" and "0.880 vs 0.900 for f16" in text and text.startswith("recommended: q4_k_m")
    assert recommend(rows, 1.0)[0].label == "q8_0"  # the hf row never wins, however small
    assert recommend(rows, 0.5)[0].label == "q2_k"
    only_ref = [row("f16", 100, 0.9, reference=True), row("q2_k", 20, 0.1)]
    best, text = recommend(only_ref, 0.97)
    assert best.label == "f16" and "no smaller file" in text
    zero = [row("f16", 100, 0.0, reference=True), row("q8_0", 53, 0.0, top1=0.99), row("q2_k", 20, 0.0, top1=0.6)]
    best, text = recommend(zero, 0.97)
    assert best.label == "q8_0" and "top-1 agreement" in text and "task score is 0" in text


def test_scorers():
    exact, contains = make_scorer("exact"), make_scorer("contains")
    assert exact(" 42 \n", "42") and not exact("42.", "42")
    assert contains("the answer is 42.", "42") and not contains("4 2", "42")
    rx = make_scorer("regex", r'"year":\s*(\d+)')
    assert rx('{"year": 2019, "x": 1}', '{"name": "A", "year":2019}') and not rx('{"year": 2018}', '{"year": 2019}')
    assert not rx("no year", "also none")  # no match is never right
    whole = make_scorer("regex", r"\d+")
    assert whole("got 7 now", "7") and not whole("got 8", "7")
    with pytest.raises(EdgeloraError, match="needs --pattern"):
        make_scorer("regex")
    with pytest.raises(EdgeloraError, match="--pattern"):
        make_scorer("regex", "(")


def test_json_scoring_compares_fields_by_type():
    ref = '{"name": "Lena", "city": "Osaka", "year": 1952}'
    assert json_fields(ref, ref) == (True, True, 1.0)
    assert json_fields('{"name": "Lena", "city": "Osaka", "year": "1952"}', ref) == (True, False, 2 / 3)  # "1952" != 1952
    assert json_fields('{"name": "Lena", "city": "Osaka", "year": 1952"}', ref) == (False, False, 0.0)  # q2_k's stray quote
    assert json_fields('{"city": "Osaka", "name": "Lena", "year": 1952.0}', ref) == (True, True, 1.0)  # order, 2 == 2.0
    assert json_fields('{"name": "Lena", "city": "Osaka", "year": 1952, "x": 1}', ref) == (True, False, 1.0)
    assert json_fields('{"ok": 1, "tags": ["a", "b"]}', '{"ok": true, "tags": ["a", "c"]}') == (True, False, 1 / 3)
    assert json_fields('{"l": []}', '{"l": []}') == (True, True, 1.0)
    rows = [{"answer": ref}, {"answer": ref}]
    assert task_result("json", None, [ref, "nope"], rows) == {"task_score": 0.5, "json_valid": 0.5, "json_exact": 0.5}
    assert task_result("exact", None, [ref, "nope"], rows) == {"task_score": 0.5}


def test_score_auto_is_json_only_when_every_reference_is():
    json_rows = [{"source": "e.jsonl:1", "answer": '{"a": 1}'}, {"source": "e.jsonl:2", "answer": "[1]"}]
    assert pick_score("auto", json_rows) == "json" and pick_score("exact", json_rows) == "exact"
    mixed = json_rows + [{"source": "e.jsonl:3", "answer": "42"}]
    assert pick_score("auto", mixed) == "exact"
    with pytest.raises(EdgeloraError, match="--score json: the reference answer at e.jsonl:3 is not a JSON object"):
        pick_score("json", mixed)


def test_grammar_rows_hold_every_answer_to_the_schema(exported, tmp_path):
    """--json-schema: each GGUF benched again under the grammar, as NAME+grammar rows."""
    import jsonschema

    from tiny import CLOSED

    _, out_dir = exported
    rows = [{"messages": [{"role": "user", "content": f"Is {i} a dog?"},
                          {"role": "assistant", "content": json.dumps({"ok": True, "n": i, "kind": "dog"})}]}
            for i in range(3)]
    eval_json = write_jsonl(tmp_path / "eval.jsonl", rows)
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(CLOSED))
    result = bench([str(out_dir)], str(eval_json), quants=["q8_0"], hf=False, progress=False, threads=2,
                   out=str(tmp_path / "b"), json_schema=str(schema_file), max_tokens=40)
    report = result.report
    assert report.settings["score"] == "json"  # auto: every reference answer is JSON
    got = rows_by_label(report)
    assert {"f16", "f16+grammar", "q8_0", "q8_0+grammar"} <= set(got)
    for label in ("f16+grammar", "q8_0+grammar"):
        assert got[label].grammar and got[label].json_valid == 1.0
        for text in got[label].answers:
            jsonschema.validate(json.loads(text), CLOSED)
        rt = runtime.load(got[label].model)  # generated together, as chat() held to the schema gives them
        assert got[label].answers == [rt.chat(r["messages"][:1], max_tokens=40, json_schema=CLOSED) for r in rows]
    assert got["f16"].json_valid == 0.0  # the random model writes no JSON of its own
    for name in ("f16", "q8_0"):  # the same file: the grammar only shapes what is generated, its logits are the row's
        assert [getattr(got[name + "+grammar"], k) for k in ("kl", "top1", "perplexity")] == [
            getattr(got[name], k) for k in ("kl", "top1", "perplexity")]
    assert got["q8_0"].kl > 0
    md = result.files["md"].read_text()
    assert "| valid JSON | exact |" in md and "+grammar: answers held to the JSON schema" in md
    assert got["q8_0"].notes and not got["q8_0+grammar"].notes  # the same file: said once


# ---------------------------------------------------------------- CLI and bad input

def test_cli_prints_the_table_and_keeps_an_existing_report(exported, eval_file, tmp_path):
    _, out_dir = exported
    files = [out_dir / "tiny-run-f16.gguf", out_dir / "tiny-run-q2_k.gguf"]
    r = run_cli("bench", *files, "--eval-data", eval_file, "--limit", 2, "--out", tmp_path / "r", "--threads", 2)
    assert r.exit_code == 0, r.output
    assert "| tiny-run-q2_k | file |" in r.output and "recommended: " in r.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["examples"] == 2
    before = (tmp_path / "r" / "report.json").read_bytes()
    assert_one_line_error(run_cli("bench", *files, "--eval-data", eval_file, "--out", tmp_path / "r"),
                          "report.json already exists; use --force")
    assert (tmp_path / "r" / "report.json").read_bytes() == before


def test_bad_input_is_one_line(exported, eval_file, tmp_path):
    _, out_dir = exported
    f16 = out_dir / "tiny-run-f16.gguf"
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "just text"}])
    broken = write_jsonl(tmp_path / "broken.jsonl", ['{"messages": ['])
    cases = [
        (["bench", f16, "--eval-data", tmp_path / "missing.jsonl"], "missing.jsonl"),
        (["bench", f16, "--eval-data", text], "needs chat or instruction examples"),
        (["bench", f16, "--eval-data", broken], "broken.jsonl:1: malformed JSON"),
        (["bench", out_dir / "tiny-run-lora-f16.gguf", "--eval-data", eval_file], "is a LoRA adapter"),
        (["bench", f16, out_dir / "tiny-run-imatrix.gguf", "--eval-data", eval_file],
         "tiny-run-imatrix.gguf is not a model (its general.type is 'imatrix': an importance matrix?)"),
        (["bench", tmp_path / "nope.gguf", "--eval-data", eval_file], "nope.gguf: no such file"),
        (["bench", f16, "--eval-data", eval_file, "--score", "regex"], "needs --pattern"),
        (["bench", out_dir, "--eval-data", eval_file, "--quants", "q8_0,q3_k"], "q3_k not in the export (it has f16, q8_0, q2_k)"),
        (["bench", f16, "--eval-data", eval_file, "--threshold", "1.5"], "must be in (0, 1]"),
    ]
    for args, expected in cases:
        assert_one_line_error(run_cli(*args), expected)


def test_an_interrupted_export_is_benched_on_its_model_files_alone(exported, eval_file, tmp_path, caplog):
    """An export killed before its manifest leaves GGUFs of every kind: bench takes the models and
    says which files it left out (the importance matrix, the LoRA), instead of failing on them."""
    import shutil

    _, out_dir = exported
    folder = tmp_path / "interrupted"
    folder.mkdir()
    for name in ("tiny-run-f16.gguf", "tiny-run-q8_0.gguf", "tiny-run-imatrix.gguf", "tiny-run-lora-f16.gguf"):
        shutil.copy(out_dir / name, folder / name)
    with caplog.at_level("WARNING", logger="edgelora"):
        report = bench([str(folder)], str(eval_file), limit=2, hf=False, progress=False, threads=2, out=str(tmp_path / "b"))
    assert sorted(r.label for r in report.report.rows) == ["tiny-run-f16", "tiny-run-q8_0"]
    assert (f"{folder}: no manifest.json (an interrupted export?): benching its model files alone, not "
            "tiny-run-imatrix.gguf (imatrix), tiny-run-lora-f16.gguf (adapter)") in caplog.text
