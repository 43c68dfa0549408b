"""A JSON schema learned from a dataset's answers, and the grammar that holds a model to it.

When every assistant answer of a chat / instruction dataset is a JSON object (or every one an
array), the answers are merged into one schema: per key, the types it takes (int and float
together are "number"), whether every answer has it (required), what its objects and arrays hold,
and -- only where a string field is clearly categorical -- its closed set of values as an enum.
Keys keep the order the data first shows them in: llama-cpp-python's grammar writes them in that
order, the order the model was trained on. Objects allow no other keys.

`grammar` turns a schema into a llama.cpp grammar (llama-cpp-python's converter, then parsed by
llama.cpp itself), so run / chat / serve / bench all constrain decoding the same way.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import EdgeloraError

SCHEMA_FILE = "schema.json"  # in a run directory, and beside an export's GGUFs
MAX_ENUM_VALUES = 8  # a string field with more distinct values than this is free text
MIN_ENUM_REPEATS = 3  # ... and so is one where any value occurs fewer times than this
MAX_ENUM_LENGTH = 40  # ... or where a value is longer than this (a sentence is not a category)
MAX_DEPTH = 64  # answers nested deeper than this get no schema: grammars of such depth are not practical
MAX_OPTIONAL = 256  # an object with more keys that not every answer has: its grammar grows too large to use


@dataclass
class _Node:
    """What one position in the answers (the root, a key, an array's items) was seen holding."""

    seen: int = 0
    types: dict[str, None] = field(default_factory=dict)  # JSON types, in first-seen order
    strings: Counter = field(default_factory=Counter)
    keys: dict[str, "_Node"] = field(default_factory=dict)  # object keys, in first-seen order
    key_counts: Counter = field(default_factory=Counter)
    objects: int = 0
    items: Optional["_Node"] = None

    def add(self, value) -> None:
        self.seen += 1
        kind = _json_type(value)
        self.types[kind] = None
        if kind == "string":
            self.strings[value] += 1
        elif kind == "object":
            self.objects += 1
            for k, v in value.items():
                self.keys.setdefault(k, _Node()).add(v)
                self.key_counts[k] += 1
        elif kind == "array":
            self.items = self.items or _Node()
            for v in value:
                self.items.add(v)

    def schema(self, enums: bool) -> dict:
        kinds = list(self.types)
        if "integer" in kinds and "number" in kinds:
            kinds.remove("integer")
        parts = [self._one(kind, enums) for kind in kinds]
        return parts[0] if len(parts) == 1 else {"anyOf": parts}

    def _one(self, kind: str, enums: bool) -> dict:
        if kind == "object":
            return {"type": "object",
                    "properties": {k: node.schema(enums) for k, node in self.keys.items()},
                    "required": [k for k in self.keys if self.key_counts[k] == self.objects],
                    "additionalProperties": False}
        if kind == "array":
            return {"type": "array", "items": self.items.schema(enums)} if self.items and self.items.seen else \
                {"type": "array"}
        if kind == "string" and enums and _categorical(self.strings):
            return {"type": "string", "enum": list(self.strings)}
        return {"type": kind}


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _categorical(values: Counter) -> bool:
    """A few short values, each seen several times: a closed set, not free text."""
    return (len(values) <= MAX_ENUM_VALUES and min(values.values()) >= MIN_ENUM_REPEATS
            and max(map(len, values)) <= MAX_ENUM_LENGTH)


def infer(answers: list[tuple[str, str]], enums: bool = True) -> tuple[Optional[dict], str]:
    """(schema, what was found) from (source "file:line", answer text) pairs; the schema is None,
    and the message says why, unless every answer is JSON and all are objects or all arrays."""
    if not answers:
        return None, "no answers to learn a schema from"
    root = _Node()
    for where, text in answers:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            return None, f"no JSON schema: the answer at {where} is not JSON ({e.msg} at column {e.colno})"
        except RecursionError:
            return None, f"no JSON schema: the answer at {where} is nested too deeply"
        if not isinstance(value, (dict, list)):
            return None, f"no JSON schema: the answer at {where} is a bare {_json_type(value)}, not an object or array"
        depth = _depth(value)
        if depth > MAX_DEPTH:
            return None, f"no JSON schema: the answer at {where} is nested {depth} levels deep; a grammar holds at most {MAX_DEPTH}"
        root.add(value)
    if len(root.types) > 1:
        return None, "no JSON schema: some answers are objects and some are arrays"
    crowded = _crowded(root.schema(enums))
    if crowded:
        return None, (f"no JSON schema: the objects at {crowded[0] or 'the top'} have {crowded[1]:,} keys that not "
                      f"every answer has; a grammar holds at most {MAX_OPTIONAL} such keys in one object")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "description": f"Inferred by edgelora from {len(answers)} answers", **root.schema(enums)}
    return schema, f"JSON schema inferred from {len(answers)} answers"


def _depth(value) -> int:
    """How many arrays and objects deep `value` nests (counted without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _crowded(schema) -> Optional[tuple[str, int]]:
    """(the path, how many) of an object of `schema` with more than MAX_OPTIONAL optional properties
    (llama-cpp-python's grammar for those grows with their square, and its converter recurses once
    per property); None where none has. Without recursion."""
    stack = [(schema, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                optional = len(set(props) - set(node.get("required") or []))
                if optional > MAX_OPTIONAL:
                    return path, optional
                stack.extend((v, f"{path}/properties/{k}") for k, v in props.items())
            stack.extend((v, path) for key, v in node.items() if key in ("items", "anyOf", "oneOf", "allOf")
                         for v in (v if isinstance(v, list) else [v]))
    return None


def answers_of(examples) -> list[tuple[str, str]]:
    """(source, text) of every assistant turn of chat / instruction examples (edgelora.data)."""
    return [(ex.source, m["content"]) for ex in examples if ex.messages for m in ex.messages
            if m["role"] == "assistant"]


def from_data(path: str | Path, data_format: str = "auto", enums: bool = True) -> tuple[Optional[dict], str]:
    """infer() over a JSONL file's answers (every example: training and held-out alike)."""
    from .data import read_jsonl

    examples, shape = read_jsonl(path, data_format)
    if shape == "text":
        return None, f"no JSON schema: {path} is plain text, without answers"
    answers = answers_of(examples)
    return infer(answers, enums) if answers else (None, f"no JSON schema: {path} has no answers")


def load(path: str | Path) -> dict:
    """A JSON schema file, checked to be a JSON object that a grammar can be made from."""
    from .files import read_json

    schema = read_json(Path(path), "JSON schema")
    grammar_text(schema, str(path))
    return schema


def grammar_text(schema, where: str) -> str:
    """`schema` checked as a JSON schema (jsonschema), then as GBNF by llama-cpp-python's
    converter; an EdgeloraError naming `where` if it is not a schema or cannot be expressed
    (llama-cpp-python would otherwise fall back to any JSON, silently)."""
    import jsonschema
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    if not isinstance(schema, dict):
        raise EdgeloraError(f"{where}: a JSON schema must be an object")
    crowded = _crowded(schema)
    if crowded:
        raise EdgeloraError(f"{where}: the object at {crowded[0] or 'the root'} has {crowded[1]:,} properties that "
                            f"are not required; a grammar holds at most {MAX_OPTIONAL} of those in one object")
    try:
        jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator).check_schema(schema)
        text = json_schema_to_gbnf(json.dumps(schema))
    except jsonschema.SchemaError as e:
        at = "/".join(map(str, e.absolute_path))
        raise EdgeloraError(f"{where}: not a valid JSON schema{f' at {at}' if at else ''}: {e.message}") from None
    except RecursionError:
        raise EdgeloraError(f"{where}: JSON schema nested too deeply for a grammar") from None
    except Exception as e:  # noqa: BLE001 - the converter raises many types for schemas it cannot express
        raise EdgeloraError(f"{where}: this JSON schema cannot be turned into a grammar "
                            f"({type(e).__name__}: {e})") from None
    empty = re.search(r"^([\w-]+) ::= *$", text, re.M)
    if empty:  # llama.cpp cannot parse a rule that matches nothing
        raise EdgeloraError(f"{where}: part of this JSON schema admits no value at all (an empty enum?), and "
                            f"llama.cpp cannot parse the grammar made of it (rule {empty.group(1)} is empty)")
    # JSON strings cannot hold raw control characters; llama-cpp-python's rule lets them through
    return text.replace(_LOOSE_CHAR, _JSON_CHAR)


_LOOSE_CHAR, _JSON_CHAR = r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |'


def beside(*models: str | Path) -> Optional[Path]:
    """Where `--json-schema auto` looks: the schema.json in the folder of the first of `models`
    (the LoRA files, then the base) that has one; None if none has."""
    return next((p for m in models if (p := Path(m).parent / SCHEMA_FILE).is_file()), None)


def resolve(choice: Optional[str], *models: str | Path) -> Optional[dict]:
    """--json-schema: None/"none" -> None; "auto" -> the schema exported beside `models` (an error if
    there is none); otherwise a schema file."""
    if choice in (None, "none"):
        return None
    if choice == "auto":
        path = beside(*models)
        if path is None:
            raise EdgeloraError(f"--json-schema auto: no {SCHEMA_FILE} beside {models[0]} (export writes one when the "
                                "training answers are JSON); pass a schema file instead")
        return load(path)
    return load(choice)
