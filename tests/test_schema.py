"""Structured answers: a JSON schema inferred from the data, grammar-constrained decoding in
run / chat / the Python API, the schema carried from the run through the export."""
from __future__ import annotations

import json

import jsonschema
import pytest
from tiny import CLOSED, cfg, run_cli, write_jsonl

from edgelora import schema as S
from edgelora.errors import EdgeloraError


def answers(*values) -> list[tuple[str, str]]:
    return [(f"data.jsonl:{i + 1}", v if isinstance(v, str) else json.dumps(v)) for i, v in enumerate(values)]


def test_keys_keep_their_order_and_only_keys_in_every_answer_are_required():
    schema, found = S.infer(answers({"name": "A", "age": 3, "nick": "a"}, {"name": "B", "age": 4}))
    assert found == "JSON schema inferred from 2 answers"
    assert list(schema["properties"]) == ["name", "age", "nick"]
    assert schema["required"] == ["name", "age"] and schema["additionalProperties"] is False
    assert schema["properties"]["age"] == {"type": "integer"}


def test_mixed_numbers_nulls_and_nested_arrays():
    schema, _ = S.infer(answers({"x": 1, "tags": [["a"], []], "note": None, "items": [{"id": 1}, {"id": 2, "ok": True}]},
                                {"x": 2.5, "tags": [], "note": "n", "items": []}))
    props = schema["properties"]
    assert props["x"] == {"type": "number"}  # int and float together
    assert props["tags"] == {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}
    assert props["note"] == {"anyOf": [{"type": "null"}, {"type": "string"}]}
    item = props["items"]["items"]
    assert item["required"] == ["id"] and list(item["properties"]) == ["id", "ok"]
    for _, text in answers({"x": 1, "tags": [["a"], []], "note": None, "items": [{"id": 1}]}):
        jsonschema.validate(json.loads(text), schema)
    with pytest.raises(jsonschema.ValidationError):  # the schema is closed: no extra keys
        jsonschema.validate({"x": 1, "tags": [], "note": None, "items": [], "extra": 1}, schema)


def test_enums_only_for_clearly_categorical_strings():
    rows = [{"level": lv, "who": f"person {i}"} for i, lv in enumerate(["low", "high", "mid"] * 4)]
    schema, _ = S.infer(answers(*rows))
    assert schema["properties"]["level"] == {"type": "string", "enum": ["low", "high", "mid"]}
    assert schema["properties"]["who"] == {"type": "string"}  # every value seen once: free text
    rare = S.infer(answers(*rows, {"level": "extreme", "who": "x"}))[0]  # one value seen once: not a closed set
    assert rare["properties"]["level"] == {"type": "string"}
    assert S.infer(answers(*rows), enums=False)[0]["properties"]["level"] == {"type": "string"}


@pytest.mark.parametrize("values, why", [
    (({"a": 1}, "plain words"), "the answer at data.jsonl:2 is not JSON (Expecting value at column 1)"),
    (({"a": 1}, '{"a": 1'), "the answer at data.jsonl:2 is not JSON"),
    ((42, 43), "the answer at data.jsonl:1 is a bare integer, not an object or array"),
    (({"a": 1}, [1]), "some answers are objects and some are arrays"),
])
def test_answers_that_are_not_json_objects_give_no_schema_and_say_why(values, why):
    schema, found = S.infer(answers(*values))
    assert schema is None and found.startswith("no JSON schema:") and why in found


def test_an_unusable_schema_is_one_error_naming_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    for text, why in ([json.dumps({"type": "objekt"}), "bad.json: not a valid JSON schema at type:"],
                      ["[1, 2]", "bad.json: damaged JSON schema, not a JSON object"],
                      ['{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}', "cannot be turned into a grammar"],
                      ["{not json", "bad.json"]):
        bad.write_text(text)
        with pytest.raises(EdgeloraError, match=why.replace("[", r"\[")):
            S.load(bad)


def test_the_grammar_keeps_control_characters_out_of_strings():
    text = S.grammar_text({"type": "object", "properties": {"s": {"type": "string"}}}, "x")
    char = next(line for line in text.splitlines() if line.startswith("char ::="))
    assert r"\x00-\x1F" in char


def test_schema_command_prints_the_schema_or_why_not(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": f"q{i}", "output": json.dumps({"n": i, "ok": True})}
                                                 for i in range(3)])
    r = run_cli("schema", good)
    assert r.exit_code == 0, r.output
    schema = json.loads(r.stdout)
    assert schema["properties"] == {"n": {"type": "integer"}, "ok": {"type": "boolean"}}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": "{}"}, {"instruction": "q", "output": "no"}])
    r = run_cli("schema", bad)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip() == f"error: no JSON schema: the answer at {bad}:2 is not JSON (Expecting value at column 1)"


def test_what_inference_gives_a_grammar_can_hold_or_it_says_why_not(tmp_path):
    """Answers nested 600 deep, or objects of 5,000 keys no answer always has: no schema, and why
    (no RecursionError); at the bounds, a schema the grammar converter takes."""
    deep = "[" * 600 + "]" * 600
    schema, found = S.infer([("data.jsonl:1", deep)])
    assert schema is None and found == (f"no JSON schema: the answer at data.jsonl:1 is nested 600 levels deep; a "
                                        f"grammar holds at most {S.MAX_DEPTH}")
    nested = 1
    for _ in range(S.MAX_DEPTH - 1):
        nested = {"a": nested}
    schema, _ = S.infer([("x", json.dumps(nested))])
    assert "root ::=" in S.grammar_text(schema, "x")
    sparse = [("x", json.dumps({f"k{i}": i, f"k{i + 1}": 0})) for i in range(0, 5000, 2)]  # 5,000 keys, each in one
    schema, found = S.infer(sparse)
    assert schema is None and found == ("no JSON schema: the objects at the top have 5,000 keys that not every answer "
                                        f"has; a grammar holds at most {S.MAX_OPTIONAL} such keys in one object")
    flat = [("x", json.dumps({f"k{i}": i for i in range(5000)}))] * 2  # 5,000 keys every answer has: fine
    schema, _ = S.infer(flat)
    assert len(schema["required"]) == 5000 and "root ::=" in S.grammar_text(schema, "x")
    r = run_cli("schema", write_jsonl(tmp_path / "deep.jsonl", [{"instruction": "q", "output": deep}]))
    assert r.exit_code == 1 and "Traceback" not in r.output and "nested 600 levels deep" in r.output


def test_training_on_answers_nested_600_deep_trains_and_says_why_no_schema(tiny_llama, tmp_path, caplog):
    import logging

    from edgelora.trainer import train

    deep = "[" * 600 + "]" * 600
    data = write_jsonl(tmp_path / "deep.jsonl", [{"instruction": f"q{i}", "output": deep} for i in range(8)])
    with caplog.at_level(logging.INFO, logger="edgelora"):
        result = train(cfg(tiny_llama, data, tmp_path / "run", max_steps=2, eval_split=0.0))
    assert result.summary.json_schema is None and not (tmp_path / "run" / S.SCHEMA_FILE).exists()
    assert f"no JSON schema: the answer at {data}:1 is nested 600 levels deep" in caplog.text


def test_a_flat_schema_of_5000_keys_as_inference_makes_it_is_applied(tiny_export, tmp_path):
    """What `schema` / `train` infer, `run --json-schema` must be able to apply."""
    schema, _ = S.infer([("x", json.dumps({f"k{i}": i for i in range(5000)}))] * 2)
    path = tmp_path / "wide.json"
    path.write_text(json.dumps(schema))
    r = run_cli("run", tiny_export["merged:q8_0"], "-p", "hi", "--json-schema", path, "--max-tokens", 4)
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines()[-1].startswith('{"k0"'), r.output


@pytest.mark.parametrize("schema, why", [
    ({"enum": []}, "part of this JSON schema admits no value at all (an empty enum?), and llama.cpp cannot parse the "
                   "grammar made of it (rule root is empty)"),
    ({"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(300)}},
     f"the object at the root has 300 properties that are not required; a grammar holds at most {S.MAX_OPTIONAL} "
     "of those in one object"),
])
def test_a_schema_llama_cpp_cannot_use_is_refused_naming_the_file(tmp_path, tiny_export, schema, why):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(schema))
    with pytest.raises(EdgeloraError) as e:
        S.load(path)
    assert str(e.value) == f"{path}: {why}"
    r = run_cli("run", tiny_export["merged:q8_0"], "-p", "hi", "--json-schema", path)
    assert r.exit_code == 1 and r.output.strip() == f"error: {path}: {why}"


def test_serve_refuses_at_start_up_a_schema_beside_the_model_it_cannot_use(tiny_export, tmp_path):
    import shutil

    model = shutil.copy(tiny_export["merged:q8_0"], tmp_path / "m.gguf")
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"a": {"enum": []}},
                                                      "required": ["a"]}))
    r = run_cli("serve", model, "--json-schema", "auto", "--port", 0)
    assert r.exit_code == 1 and r.output.strip().startswith(f"error: {tmp_path / 'schema.json'}: part of this JSON "
                                                            "schema admits no value")


# ---------------------------------------------------------------- constrained decoding on a tiny model

def test_constrained_answers_always_parse_and_validate(tiny_export):
    from edgelora.runtime import load

    rt = load(tiny_export["merged:f16"], n_ctx=256)
    prompts = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(4)]
    free = [rt.chat(m, max_tokens=40) for m in prompts]
    held = [rt.chat(m, max_tokens=40, json_schema=CLOSED) for m in prompts]
    streamed = "".join(rt.chat(prompts[0], max_tokens=40, json_schema=CLOSED, stream=True))

    def parses(text):
        try:
            json.loads(text)
            return True
        except ValueError:
            return False

    assert not any(map(parses, free))  # the random model writes no JSON of its own
    for text in held + [streamed]:
        jsonschema.validate(json.loads(text), CLOSED)
    assert streamed == held[0]


def test_a_run_with_json_answers_carries_its_schema_to_the_export_and_run(tmp_path, tiny_llama):
    from edgelora.exporter import export
    from edgelora.trainer import train

    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"},
                          {"role": "assistant", "content": json.dumps({"n": i, "even": i % 2 == 0})}]}
            for i in range(16)]
    data = write_jsonl(tmp_path / "json.jsonl", rows)
    run = tmp_path / "run"
    result = train(cfg(tiny_llama, data, run, max_steps=2))
    schema = json.loads((run / "schema.json").read_text())
    assert result.summary.json_schema == "schema.json"
    assert schema["properties"] == {"n": {"type": "integer"}, "even": {"type": "boolean"}}
    res = export(str(run), quants=["f16"])
    manifest = json.loads(res.manifest.read_text())
    assert manifest["json_schema"]["file"] == "schema.json"
    assert json.loads((res.out_dir / "schema.json").read_text()) == schema
    assert 'as "format"' in (res.out_dir / "Modelfile").read_text()
    model = res.out_dir / res.files[0].file
    r = run_cli("run", model, "-p", "Is 7 even?", "--json-schema", "auto", "--max-tokens", 64)
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout.strip().splitlines()[-1]), schema)

    off = tmp_path / "off"
    train(cfg(tiny_llama, data, off, max_steps=1, json_schema=False))
    assert not (off / "schema.json").exists()


def test_json_schema_auto_without_a_schema_beside_the_model_is_one_error(tiny_export):
    r = run_cli("run", tiny_export["merged:f16"], "-p", "hi", "--json-schema", "auto")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "--json-schema auto: no schema.json beside" in r.output
