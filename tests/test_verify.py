"""Export verification (edgelora.verify): every export passes, and each property broken on purpose
(chat template altered or removed, BOS doubled, an end-of-turn token llama.cpp does not stop on,
a Modelfile without the stop) is named with the example and what differed."""
import json
import re
from pathlib import Path

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from edgelora import data as D
from edgelora import exporter as E
from edgelora import verify as V
from edgelora.runtime import load
from test_cli import assert_one_line_error, run_cli
from tiny import CHATML

T = gguf.Keys.Tokenizer


@pytest.fixture(scope="module")
def run_dir(tiny_export) -> Path:
    return tiny_export["merged:f16"].parent.parent


@pytest.fixture(scope="module")
def first(run_dir, tmp_path_factory):
    """The run's first training examples and the token ids training made of them."""
    plan = E.plan_export(str(run_dir), None, ["f16"], False, str(tmp_path_factory.mktemp("plan")))
    examples, trained = zip(*E._calibration(plan, None).first)
    return list(examples), list(trained)


def with_metadata(src: Path, dst: Path, changes: dict, remove=()) -> Path:
    """A copy of the GGUF `src` with some metadata changed ({key: MetadataDetails}) or removed."""
    writer = gguf.GGUFWriter(dst, arch=gguf.GGUFReader(src).fields[gguf.Keys.General.ARCHITECTURE].contents())
    copy_with_new_metadata(gguf.GGUFReader(src), writer, dict(changes), list(remove))
    return dst


def checks_of(path, first, stops=("<|im_end|>", "<|im_start|>")):
    return {c.name: c for c in V.token_checks(load(path, device="cpu"), *first, list(stops) if stops else None)}


def test_every_export_passes_and_says_so(tiny_export):
    manifest = json.loads((tiny_export["merged:f16"].parent / "manifest.json").read_text())
    checks = manifest["checks"]
    assert [(c["file"], c["name"]) for c in checks] == [(f, n) for f in ("tiny-run-q8_0.gguf", "tiny-run-lora-f16.gguf")
                                                        for n in V.NAMES]
    assert all(c["passed"] for c in checks), checks
    assert checks[0]["figure"] == "8 training examples render to their training token ids"
    assert checks[1]["figure"] == "answers end with '<|im_end|>' (2): end of generation in llama.cpp and a Modelfile stop"


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
    assert [c["passed"] for c in manifest["checks"]] == [False, True, True]
    r = run_cli("export", run_dir, "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "n", "--no-verify")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "n" / "manifest.json").read_text())["checks"] is None


def test_without_the_runs_data_the_files_are_said_to_be_unverified(run_dir, tmp_path, caplog):
    import shutil

    run = tmp_path / "moved-run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("export"))
    config = run / "config.yaml"
    config.write_text(re.sub(r"(?m)^data: .*$", f"data: {tmp_path / 'gone.jsonl'}", config.read_text()))
    r = run_cli("export", run, "--quant", "f16", "--imatrix", "none", "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "gone.jsonl is not found: the files are not verified" in caplog.text
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["checks"] == []
    r = run_cli("export", run, "--quant", "q8_0", "--out", tmp_path / "q")  # the imatrix cannot do without it
    assert_one_line_error(r, "gone.jsonl is not found; pass --imatrix-data FILE.jsonl, or --imatrix none")
