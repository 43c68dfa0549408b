"""`edgelora doctor`: a healthy export is said to be healthy, and each property broken on purpose
(pre-tokenizer renamed or removed, an EOS id outside the vocabulary, the chat template removed, a
LoRA for another base of the same shape, answers cut short) is named, with exit 1."""
import json
import re

import gguf
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails

from tiny import assert_one_line_error, run_cli, with_metadata, write_jsonl

T = gguf.Keys.Tokenizer


@pytest.fixture(scope="module")
def numbers(tmp_path_factory):
    """Chat examples with many-digit numbers: the pre-tokenizer decides how they split."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
            for a, b in ((1999, 2024), (12345, 42), (2019, 10))]
    return write_jsonl(tmp_path_factory.mktemp("numbers") / "numbers.jsonl", rows)


def doctor(*args):
    r = run_cli("doctor", *args)
    lines = r.output.strip().splitlines()
    checks = {m[2]: (m[1] == "ok", m[3]) for line in lines if (m := re.match(r"  (ok|FAIL)\s+(\S+)\s+(.*)", line))}
    return r, checks


def test_a_healthy_export_against_its_run(tiny_export, run_dir, chat_file):
    r, checks = doctor(tiny_export["merged:q8_0"], "--data", chat_file, "--base", run_dir)
    assert r.exit_code == 0, r.output
    assert list(checks) == ["tokenizer", "special_tokens", "loads", "chat_template", "template", "end_of_turn", "bos",
                            "stops", "logits", "adapter"]
    assert all(ok for ok, _ in checks.values()), r.output
    assert checks["tokenizer"][1] == "gpt2, pre-tokenizer gpt-2"
    assert checks["special_tokens"][1] == "bos 1, eos 2"
    assert re.fullmatch(r"KL \S+, top-1 agreement 1.000 with the HF base \+ adapter in torch at \d+ answer positions of "
                        r"8 training examples", checks["logits"][1])
    assert r.output.strip().splitlines()[-1] == "verdict: healthy (10 checks)"
    (card,) = [line for line in r.output.splitlines() if line.startswith("  card  ")]
    assert card.startswith("  card  name=tiny-run, ") and ", finetune=tiny-run, " in card
    assert "base_model.count=1" in card and "edgelora.base_model.sha256=" in card and "dataset.0.name=chat.jsonl" in card
    r = run_cli("doctor", tiny_export["merged:q8_0"], "--data", chat_file, "--json")
    report = json.loads(r.output)
    assert report["name"] == "tiny-run" and report["card"]["general.finetune"] == "tiny-run"
    assert [c["name"] for c in report["checks"]] == ["tokenizer", "special_tokens", "loads", "chat_template",
                                                     "end_of_turn", "bos", "stops"]  # no --base: no ids to compare
    # without the model in torch to compare with, half the answers must stop: the tiny model (6 steps) stops in fewer
    (stops,) = [c for c in report["checks"] if not c["passed"]]
    assert r.exit_code == 1 and not report["healthy"]
    stopped = re.fullmatch(r"(\d) of 8 greedy answers stop by themselves; .+/chat\.jsonl:\d+ ran to the limit of \d+ "
                           r"tokens", stops["figure"])
    assert stopped and int(stopped[1]) < 4, stops


def test_the_base_file_is_not_the_fine_tune(tiny_export, run_dir, chat_file):
    r, checks = doctor(tiny_export["base:f16"], "--data", chat_file, "--base", run_dir)
    assert r.exit_code == 1 and not checks["logits"][0] and not checks["adapter"][0]
    # stops: whether the base ends as often as the fine-tune in torch, which on this tiny run ends
    # about one answer in eight (a single stop is one greedy decision: verify.stop_check)
    stops = "" if checks["stops"][0] else "stops, "
    assert r.output.strip().splitlines()[-1] == f"verdict: problems: {stops}logits, adapter (10 checks)"


def test_a_lora_checked_on_its_base_and_on_another(tiny_export, tiny_tokenizer, run_dir, chat_file, tmp_path):
    from tiny import build_model

    from edgelora.exporter import export

    r, checks = doctor(tiny_export["base:f16"], "--lora", tiny_export["lora"], "--data", chat_file, "--base", run_dir)
    assert r.exit_code == 0, r.output
    assert checks["lora_base"][1].startswith("the LoRA was made for this base (sha256 ")
    assert checks["logits"][0] and checks["adapter"][0]
    other = build_model(tmp_path / "other", "llama", tiny_tokenizer, seed=7)  # same shapes, other weights
    converted = export(None, base=str(other), quants=["f16"], out=str(tmp_path / "o"), imatrix="none").files[0]
    r, checks = doctor(tmp_path / "o" / converted.file, "--lora", tiny_export["lora"])
    assert r.exit_code == 1 and not checks["lora_base"][0] and checks["loads"][0]  # llama.cpp takes it: shapes match
    assert re.fullmatch(r"the LoRA was made for the base with sha256 [0-9a-f]{12}; other-f16.gguf is [0-9a-f]{12}, a "
                        r"conversion of [0-9a-f]{12}", checks["lora_base"][1]), checks["lora_base"][1]
    r, checks = doctor(tiny_export["merged:f16"], "--lora", tiny_export["lora"])  # the fine-tune, LoRA again
    made_for = re.fullmatch(r"the LoRA was made for the base with sha256 ([0-9a-f]{12}); tiny-run-f16.gguf is "
                            r"[0-9a-f]{12}, a fine-tune of ([0-9a-f]{12})", checks["lora_base"][1])
    assert not checks["lora_base"][0] and made_for and made_for[1] == made_for[2]


def test_a_renamed_pre_tokenizer(tiny_export, run_dir, numbers, tmp_path):
    unknown = with_metadata(tiny_export["merged:f16"], tmp_path / "unknown.gguf",
                            {T.PRE: MetadataDetails(gguf.GGUFValueType.STRING, "no-such-pre")})
    r, checks = doctor(unknown)
    assert r.exit_code == 1 and not checks["loads"][0]
    assert "llama.cpp cannot load it (" in checks["loads"][1] and "no-such-pre" in checks["loads"][1]
    digits = with_metadata(tiny_export["merged:f16"], tmp_path / "digits.gguf",  # splits numbers digit by digit
                           {T.PRE: MetadataDetails(gguf.GGUFValueType.STRING, "qwen2")})
    r, checks = doctor(digits, "--data", numbers, "--base", run_dir)
    assert r.exit_code == 1 and checks["tokenizer"] == (True, "gpt2, pre-tokenizer qwen2")
    assert re.fullmatch(r".+/numbers\.jsonl:1: token \d+ is ' ' \(\d+\) in the GGUF's rendering, ' 1999' \(\d+\) in "
                        r"training", checks["template"][1]), checks["template"][1]
    bare = with_metadata(tiny_export["merged:f16"], tmp_path / "bare.gguf", {}, remove=[T.PRE])
    r, checks = doctor(bare)
    assert r.exit_code == 1 and checks["tokenizer"] == (
        False, "BPE vocabulary without a pre-tokenizer (tokenizer.ggml.pre is None): llama.cpp splits text its "
               "default way, unlike the model's own tokenizer")


def test_special_tokens_outside_the_vocabulary(tiny_export, tmp_path):
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "eos.gguf",
                         {T.EOS_ID: MetadataDetails(gguf.GGUFValueType.UINT32, 9999)})
    r, checks = doctor(path)
    assert r.exit_code == 1
    assert checks["special_tokens"] == (False, "tokenizer.ggml.eos_token_id 9999 is outside the vocabulary of 505 tokens")


def test_no_chat_template(tiny_export, chat_file, tmp_path):
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "bare.gguf", {}, remove=[T.CHAT_TEMPLATE])
    r, checks = doctor(path)
    assert checks["chat_template"] == (True, "none: plain completion only (chat in Ollama or LM Studio needs a template)")
    assert "stops" not in checks  # nothing to greet it with
    r, checks = doctor(path, "--data", chat_file)
    assert r.exit_code == 1 and checks["template"] == (False, "the GGUF has no chat template (tokenizer.chat_template)")


def test_an_eos_inside_the_answers(tiny_export, tiny_tokenizer, chat_file, tmp_path):
    inner = tiny_tokenizer("0 plus 0 is 0.", add_special_tokens=False)["input_ids"][1]  # ' plus' ends generation
    path = with_metadata(tiny_export["merged:f16"], tmp_path / "eos.gguf",
                         {T.EOS_ID: MetadataDetails(gguf.GGUFValueType.UINT32, inner)})
    r, checks = doctor(path, "--data", chat_file)
    assert r.exit_code == 1 and not checks["end_of_turn"][0]
    assert checks["end_of_turn"][1].endswith("occurs inside the trained answer, and llama.cpp ends generation at it: "
                                             "answers would be cut short")


def test_bad_input_is_one_line(tiny_export, chat_file, tmp_path):
    assert_one_line_error(run_cli("doctor", tiny_export["lora"]), "is a LoRA adapter: run doctor on its base, with --lora")
    assert_one_line_error(run_cli("doctor", tiny_export["merged:f16"], "--base", tmp_path),
                          "--base compares on examples: give --data FILE.jsonl too")
    assert_one_line_error(run_cli("doctor", tiny_export["merged:f16"], "--data", chat_file, "--base", tmp_path),
                          "neither an HF model folder (config.json) nor a finished edgelora run (adapter/, summary.json)")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf")
    assert_one_line_error(run_cli("doctor", junk), "junk.gguf: not a GGUF file")
