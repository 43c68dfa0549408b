"""Export verification (edgelora.verify): every export passes, and each property broken on purpose
(chat template altered or removed, BOS doubled, an end-of-turn token llama.cpp does not stop on,
a Modelfile without the stop, a merge that lost the adapter, a zero adapter, a LoRA on another
base of the same shape, answers that do not stop) is named with the example and what differed."""
import json
import re

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails

from edgelora import data as D
from edgelora import exporter as E
from edgelora import verify as V
from edgelora.errors import EdgeloraError
from edgelora.runtime import load
from tiny import CHATML, assert_one_line_error, run_cli, with_metadata

T = gguf.Keys.Tokenizer


@pytest.fixture(scope="module")
def first(run_dir, tmp_path_factory):
    """The run's first training examples and the token ids training made of them."""
    plan = E.plan_export(str(run_dir), None, ["f16"], False, str(tmp_path_factory.mktemp("plan")))
    examples, trained = zip(*E._calibration(plan, None, V.EXAMPLES).first)
    return list(examples), list(trained)


def checks_of(path, first, stops=("<|im_end|>", "<|im_start|>")):
    return {c.name: c for c in V.token_checks(load(path, device="cpu"), *first, list(stops) if stops else None)}


def test_every_export_passes_and_says_so(tiny_export):
    manifest = json.loads((tiny_export["merged:f16"].parent / "manifest.json").read_text())
    checks = manifest["checks"]
    token = ["template", "end_of_turn", "bos", "stops"]
    assert [(c["file"], c["name"]) for c in checks] == [
        ("tiny-run-f16.gguf", "logits"), ("tiny-run-f16.gguf", "adapter"),
        *[("tiny-run-q8_0.gguf", n) for n in token], *[("tiny-run-lora-f16.gguf", n) for n in token + ["lora_route"]]]
    assert {c["name"] for c in checks} == set(V.NAMES) - {"refit"}  # no --refit here: test_refit.py
    assert 0 < manifest["seconds"]["verify"] < manifest["seconds"]["total"]
    assert all(c["passed"] for c in checks), checks
    by = {(c["file"], c["name"]): c["figure"] for c in checks}
    assert by["tiny-run-q8_0.gguf", "template"] == "8 training examples render to their training token ids"
    assert by["tiny-run-q8_0.gguf", "end_of_turn"] == ("answers end with '<|im_end|>' (2): end of generation in "
                                                      "llama.cpp and a Modelfile stop")
    kl, top1 = re.fullmatch(r"KL (\S+), top-1 agreement (\S+) with the HF base \+ adapter in torch at \d+ answer "
                            r"positions of 8 training examples", by["tiny-run-f16.gguf", "logits"]).groups()
    assert float(kl) < 1e-4 and float(top1) == 1.0  # f16 rounding only
    moved, same = map(float, re.fullmatch(r"KL (\S+) from the base without the adapter, (\S+) with it",
                                          by["tiny-run-f16.gguf", "adapter"]).groups())
    assert same == float(kl) and moved > 1000 * same
    route, alone = re.fullmatch(r"KL (\S+) \(top-1 1.000\) from the merged f16 with the LoRA on \S+-base-f16.gguf, "
                                r"(\S+) without it", by["tiny-run-lora-f16.gguf", "lora_route"]).groups()
    assert float(route) < 1e-4 and float(alone) == pytest.approx(moved, rel=0.02)  # the base f16 file is the base in torch
    stopped, in_torch = map(int, re.fullmatch(r"(\d) of 8 greedy answers stop by themselves, (\d) in torch",
                                              by["tiny-run-q8_0.gguf", "stops"]).groups())
    assert stopped >= min(in_torch / 2, in_torch - 1)  # the rule (the tiny model, 6 steps, stops now and then)


def test_fewer_examples_verified_when_asked(run_dir, tmp_path):
    """The quick demo verifies on 4 examples: the figures say how many, and fewer than one is refused."""
    result = E.export(str(run_dir), quants=["f16"], out=str(tmp_path / "o"), imatrix="none", verify_examples=2)
    logits = next(c for c in result.checks if c["name"] == "logits")
    assert logits["passed"] and logits["figure"].endswith("answer positions of 2 training examples")
    with pytest.raises(EdgeloraError, match="verify_examples must be at least 1, not 0"):
        E.export(str(run_dir), quants=["f16"], out=str(tmp_path / "p"), imatrix="none", verify_examples=0)
    assert not (tmp_path / "p").exists()


def test_an_altered_chat_template_names_the_example_and_token(tiny_export, first, tmp_path):
    altered = CHATML.replace("You are a tiny test model.", "You are a small test model.")
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "altered.gguf",
                         {T.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, altered)})
    got = checks_of(path, first)
    assert not got["template"].passed
    assert re.fullmatch(r".+/chat\.jsonl:1: token \d+ is '.+' \(\d+\) in the GGUF's rendering, '.+' \(\d+\) in training",
                        got["template"].figure), got["template"].figure
    assert got["end_of_turn"].passed and got["bos"].passed


def test_a_removed_chat_template(tiny_export, first, tmp_path):
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "bare.gguf", {}, remove=[T.CHAT_TEMPLATE])
    (check,) = V.token_checks(load(path, device="cpu"), *first, None)
    assert (check.name, check.passed) == ("template", False)
    assert check.figure == "the GGUF has no chat template (tokenizer.chat_template)"


def test_a_doubled_bos(tiny_export, first, tmp_path):
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "bos.gguf",
                         {T.ADD_BOS: MetadataDetails(gguf.GGUFValueType.BOOL, True)})
    got = checks_of(path, first)
    assert not got["bos"].passed and got["template"].passed
    assert got["bos"].figure.endswith("/chat.jsonl:1: the prompt starts with '<|im_start|>' twice: the template "
                                      "writes it and the GGUF asks llama.cpp to add it (add_bos_token)")


def test_an_end_of_turn_llama_cpp_does_not_stop_on(tiny_export, first, tmp_path):
    """A template whose turns end with plain text: training taught the model to end with it, and
    llama.cpp would never stop."""
    own = CHATML.replace("<|im_end|>", " END")
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "end.gguf",
                         {T.CHAT_TEMPLATE: MetadataDetails(gguf.GGUFValueType.STRING, own)})
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_export["merged:f16"].parent.parent / "adapter")
    tok.chat_template = own
    trained = [D.tokenize_example(tok, ex) for ex in first[0]]
    got = checks_of(path, (first[0], trained), stops=None)
    assert got["template"].passed, got["template"].figure
    assert not got["end_of_turn"].passed
    assert got["end_of_turn"].figure.startswith("training taught answers to end with ")
    assert got["end_of_turn"].figure.endswith("which llama.cpp does not treat as end of generation: answers would not stop")


def test_a_modelfile_without_the_stop(tiny_export, first):
    got = checks_of(tiny_export["merged:f16"], first, stops=["<|im_start|>"])
    assert got["template"].passed and not got["end_of_turn"].passed
    assert got["end_of_turn"].figure == ("training taught answers to end with '<|im_end|>' (2), which the Modelfile's "
                                         "stop list lacks")


def test_a_failed_check_fails_the_export_in_one_line_and_keeps_the_record(run_dir, tmp_path, monkeypatch):
    import edgelora.converters.vocab as vocab

    real = vocab.chat_template
    monkeypatch.setattr(vocab, "chat_template", lambda folder: (real(folder) or "").replace("tiny test", "tiny"))
    r = run_cli("export", run_dir, "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "o")
    assert_one_line_error(r, "tiny-run-f16.gguf: verification failed: template: ")
    assert "/chat.jsonl:1: token " in r.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [(c["name"], c["passed"]) for c in manifest["checks"]] == [
        ("logits", True), ("adapter", True), ("template", False), ("end_of_turn", True), ("bos", True), ("stops", True)]
    r = run_cli("export", run_dir, "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "n", "--no-verify")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "n" / "manifest.json").read_text())["checks"] is None


def test_without_the_runs_data_the_files_are_said_to_be_unverified(run_dir, tmp_path, caplog):
    import shutil

    run = tmp_path / "moved-run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    summary = json.loads((run / "summary.json").read_text())  # where export reads the run's data from
    (run / "summary.json").write_text(json.dumps({**summary, "data": str(tmp_path / "gone.jsonl")}))
    r = run_cli("export", run, "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "gone.jsonl is not found: the files are not verified" in caplog.text
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["checks"] == []
    r = run_cli("export", run, "--quant", "q8_0", "--out", tmp_path / "q")  # the imatrix cannot do without it
    assert_one_line_error(r, "gone.jsonl is not found; pass --imatrix-data FILE.jsonl, or --imatrix none")


def test_a_merge_that_lost_the_fine_tune(run_dir, tmp_path, monkeypatch):
    import edgelora.converters.hf_to_gguf as H

    real = H.convert
    monkeypatch.setattr(H, "convert", lambda *a, adapter_dir=None, **k: real(*a, **k))  # the adapter dropped
    r = run_cli("export", run_dir, "--quant", "q8_0", "--imatrix", "none", "--out", tmp_path / "o")
    assert_one_line_error(r, "tiny-run-f16.gguf (not kept): verification failed: logits: KL ")
    assert re.search(r"top-1 agreement [\d.]+ with the HF base \+ adapter in torch at \d+ answer positions of 8 "
                     r"training examples \(at most 0.01 and at least 0.95\)", r.output), r.output
    adapter = next(c for c in json.loads((tmp_path / "o" / "manifest.json").read_text())["checks"]
                   if c["name"] == "adapter")
    assert not adapter["passed"] and adapter["figure"].endswith("the adapter changes next to nothing (zero, or lost "
                                                                "in the merge)")


def test_an_adapter_that_changes_nothing(run_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    run = tmp_path / "zero-run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 0 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    r = run_cli("export", run, "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "o")
    assert_one_line_error(r, "zero-run-f16.gguf: verification failed: adapter: KL ")
    assert r.output.strip().endswith("with it: the adapter changes next to nothing (zero, or lost in the merge)")


def test_a_lora_on_another_base_of_the_same_shape(tiny_export, tiny_tokenizer, first, tmp_path):
    from tiny import build_model

    from edgelora.klprobe import KLProbe

    other = build_model(tmp_path / "other", "llama", tiny_tokenizer, seed=7)  # same config, other weights
    other_gguf = E.export(None, base=str(other), quants=["f16"], out=str(tmp_path / "o"), imatrix="none").files[0]
    probe = KLProbe(tiny_export["merged:f16"], [(t.input_ids, t.labels) for t in first[1]], tmp_path)
    check = V.lora_route_check(probe, tmp_path / "o" / other_gguf.file, tiny_export["lora"])
    assert not check.passed
    assert re.fullmatch(r"KL \S+ \(top-1 [\d.]+\) from the merged f16 with the LoRA on other-f16.gguf, \S+ without "
                        r"it: the LoRA does not bring this base to the fine-tuned model \(another base of the same "
                        r"shape\?\)", check.figure), check.figure
    assert V.lora_route_check(probe, tiny_export["base:f16"], tiny_export["lora"]).passed


def test_answers_that_stop_less_often_than_in_torch(tiny_export, first):
    rt = load(tiny_export["merged:q8_0"], device="cpu", sequences=8)
    check = V.stop_check(rt, *first, [True] * 8)  # as if the model in torch stopped every time
    stopped = int(check.figure.split()[0])
    # the answers generated together stop exactly where llama-cpp-python's chat answers, one at a time, do
    finishes = [rt.chat_finish(ex.messages[:D.last_answer(ex.messages)], max_tokens=D.answer_limit(t.n_targets))[1]
                for ex, t in zip(*first)]
    assert stopped == finishes.count("stop")
    runaway = first[0][finishes.index("length")].source
    assert f"; {runaway} ran to the limit of " in check.figure, (runaway, check.figure)
    assert stopped < 4 and not check.passed  # the tiny model (6 steps) rarely stops
    assert re.fullmatch(rf"{stopped} of 8 greedy answers stop by themselves, 8 in torch; .+/chat\.jsonl:\d+ ran to the "
                        r"limit of \d+ tokens", check.figure), check.figure
    once = V.stop_check(rt, *first, [True] + [False] * 7)  # a single stop in torch: one greedy decision
    assert once.passed and once.figure.startswith(f"{stopped} of 8 greedy answers stop by themselves, 1 in torch")
    never = V.stop_check(rt, *first, [False] * 8)
    assert never.passed and never.figure == (f"{stopped} of 8 greedy answers stop by themselves, 0 in torch (the model "
                                             "as trained does not stop either: train longer)")


def test_an_eos_that_occurs_inside_the_answers(tiny_export, first, tmp_path):
    """EOS set to a token the answers use: llama.cpp would end every answer there."""
    t = first[1][0]
    inner = next(t.input_ids[i] for i, label in enumerate(t.labels) if label != -100)
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "eos.gguf",
                         {T.EOS_ID: MetadataDetails(gguf.GGUFValueType.UINT32, inner)})
    got = checks_of(path, first)
    assert got["template"].passed and not got["end_of_turn"].passed
    assert re.fullmatch(rf".+/chat\.jsonl:1: '.+' \({inner}\) occurs inside the trained answer, and llama\.cpp ends "
                        r"generation at it: answers would be cut short", got["end_of_turn"].figure), got["end_of_turn"].figure


@pytest.mark.parametrize("specials, end", [(["<unk>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
                                           (["<unk>", "</s>"], "</s>")])
def test_a_base_without_a_chat_template_learns_to_end_where_llama_cpp_stops(tmp_path, chat_file, specials, end):
    """Trained with the fallback template, answers end with a token in llama.cpp's end-of-generation
    set (not ChatML's <|im_end|> spelt out in pieces), and the export says so."""
    from tiny import build_model, build_tokenizer, cfg

    from edgelora.trainer import train

    base = build_model(tmp_path / "base", "llama", build_tokenizer(tmp_path / "tok", specials=specials))
    run = tmp_path / "run"
    train(cfg(base, chat_file, run, max_steps=2, eval_split=0.0))
    r = run_cli("export", run, "--quant", "q8_0", "--imatrix", "none", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    checks = {c["name"]: c for c in json.loads((tmp_path / "o" / "manifest.json").read_text())["checks"]}
    assert checks["end_of_turn"]["passed"] and checks["template"]["passed"]
    assert checks["end_of_turn"]["figure"].startswith(f"answers end with {end!r} (")
    modelfile = (tmp_path / "o" / "Modelfile").read_text()
    assert (f'PARAMETER stop "{end}"' in modelfile) == (end == "</s>")  # Gemma's turns: Ollama's own template


def test_a_run_on_plain_text_is_verified_on_its_logits(tiny_llama, tmp_path):
    """Text data has no chat template or end of turn: those checks say so; the logits are checked."""
    from tiny import CORPUS, cfg, write_jsonl

    from edgelora.trainer import train

    data = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in CORPUS[:9]])
    train(cfg(tiny_llama, data, tmp_path / "run", max_steps=2, eval_split=0.0, lr=2e-2))
    r = run_cli("export", tmp_path / "run", "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    listed = json.loads((tmp_path / "o" / "manifest.json").read_text())["checks"]
    checks = {c["name"]: c for c in listed}
    assert len(listed) == len(checks) == 6 and checks["logits"]["passed"] and checks["adapter"]["passed"]
    assert {n: c["figure"] for n, c in checks.items() if n not in ("logits", "adapter")} == {
        "template": "not applicable: text data has no chat template", "end_of_turn": "not applicable: text data has "
        "no chat template", "bos": "not applicable: text data has no chat template",
        "stops": "not applicable: text data has no end of turn"}


def test_a_phi3_run_verifies_through_both_routes(tmp_path):
    """A tiny Phi-3 (fused qkv_proj / gate_up_proj, Phi-3's added tokens stripping the whitespace
    after them) trained with LoRA: the merged q8_0 and the LoRA GGUF pass every check, the
    template's among them, which needs llama.cpp to strip as HF does (the name says phi-3)."""
    from families import build_model, gguf_fields
    from tiny import cfg, chat_rows, write_jsonl

    from edgelora.trainer import train

    base = build_model(tmp_path / "base", "phi3")
    train(cfg(base, write_jsonl(tmp_path / "chat.jsonl", chat_rows(16)), tmp_path / "run", max_steps=3,
              eval_split=0.0))
    result = E.export(str(tmp_path / "run"), quants=["q8_0"], lora_gguf=True, imatrix="none")
    assert {(c["file"], c["name"]) for c in result.checks} >= {("run-q8_0.gguf", "template"),
                                                                ("run-lora-f16.gguf", "lora_route")}
    assert all(c["passed"] for c in result.checks), result.checks
    assert gguf_fields(result.out_dir / "run-q8_0.gguf")["general.name"] == "run (phi-3)"


def test_a_thinking_template_trains_and_exports_its_no_think_variant(tmp_path):
    """A tiny qwen3 whose template switches reasoning (Qwen3's enable_thinking), trained on answers
    without <think>: the GGUF carries the no-think default, so llama.cpp renders the prompts
    training saw (the template check passes), and the Modelfile's assistant turn opens with the
    empty think block."""
    from families import build_model, train_tokenizer
    from tiny import THINKING_TEMPLATE
    from tiny import cfg, chat_rows, write_jsonl

    from edgelora.trainer import train

    tok = train_tokenizer("qwen2")
    tok.chat_template = THINKING_TEMPLATE
    base = build_model(tmp_path / "base", "qwen3", tok=tok)
    train(cfg(base, write_jsonl(tmp_path / "chat.jsonl", chat_rows(16)), tmp_path / "run", max_steps=3,
              eval_split=0.0))
    result = E.export(str(tmp_path / "run"), quants=["q8_0"], imatrix="none")
    assert all(c["passed"] for c in result.checks), result.checks
    template = gguf.GGUFReader(result.out_dir / "run-q8_0.gguf").fields["tokenizer.chat_template"].contents()
    assert template == D.NO_THINK + THINKING_TEMPLATE
    modelfile = (result.out_dir / "Modelfile").read_text()
    assert '<|im_start|>assistant\n<think>\n\n</think>\n\n"""' in modelfile


def test_reasoning_data_trains_and_exports_with_the_thinking_template(tmp_path):
    """Answers with reasoning_content on a tiny qwen3 whose template renders it: the template is
    kept as it is (no no-think default), the reasoning is learnt, and the export's checks pass."""
    from families import build_model, train_tokenizer
    from tiny import REASONING_TEMPLATE
    from tiny import cfg, chat_rows, write_jsonl

    from edgelora.trainer import train

    tok = train_tokenizer("qwen2")
    tok.chat_template = REASONING_TEMPLATE
    base = build_model(tmp_path / "base", "qwen3", tok=tok)
    rows = chat_rows(16)
    for i, row in enumerate(rows):
        row["messages"][-1]["reasoning_content"] = f"step {i}"
    train(cfg(base, write_jsonl(tmp_path / "chat.jsonl", rows), tmp_path / "run", max_steps=3, eval_split=0.0))
    result = E.export(str(tmp_path / "run"), quants=["q8_0"], imatrix="none")
    assert all(c["passed"] for c in result.checks), result.checks
    template = gguf.GGUFReader(result.out_dir / "run-q8_0.gguf").fields["tokenizer.chat_template"].contents()
    assert template == REASONING_TEMPLATE
