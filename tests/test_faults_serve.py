"""`edgelora serve` against hostile and broken clients: a real server process on a loopback port, real
HTTP (urllib and raw sockets). After every hostile request the server is still alive and answers a
normal request; errors are OpenAI-shaped 4xx naming the field; the log holds no traceback."""
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]
REQUEST_TIMEOUT = 2  # --request-timeout, seconds


def start_server(gguf, log_path, *extra):
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgelora.cli", "serve", str(gguf["base:f16"]), "--lora", f"tuned={gguf['lora']}",
         "--port", "0", "--max-tokens-limit", "8", "--request-timeout", str(REQUEST_TIMEOUT), *extra],
        stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"serving http://127\.0\.0\.1:(\d+)/v1", log_path.read_text())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"server did not start: {log_path.read_text()}")


@pytest.fixture(scope="module")
def server(tiny_export, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("faults-serve") / "server.log"
    proc, port = start_server(tiny_export, log_path)
    yield type("Server", (), {"proc": proc, "port": port, "log": log_path, "url": f"http://127.0.0.1:{port}"})
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def post(url, body, path="/v1/chat/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_still_serving(server):
    assert server.proc.poll() is None, server.log.read_text()[-3000:]
    status, body = post(server.url, {"model": "tuned", "messages": QUESTION})
    assert status == 200 and body["choices"][0]["message"]["content"], body


TOOL_WITH_QUOTE = {"type": "function", "function": {
    "name": "f", "parameters": {"type": "object", "properties": {'a"b': {"type": "string"}}}}}
DEEP_SCHEMA = json.loads('{"type": "array", "items": ' * 400 + "{}" + "}" * 400)

HOSTILE = [  # (name, path, body, status, words in the message, param)
    ("schema llama.cpp cannot parse", "chat", {"response_format": {"type": "json_object", "schema": {"enum": []}}},
     400, ["response_format.schema", "admits no value at all (an empty enum?)"], "response_format.schema"),
    ("schema with a bad $ref", "chat", {"response_format": {"type": "json_object", "schema": {"$ref": "#/nope"}}},
     400, ["response_format.schema", "cannot be turned into a grammar"], "response_format.schema"),
    ("schema that is not an object", "chat", {"response_format": {"type": "json_object", "schema": [1]}},
     400, ["response_format.schema: a JSON schema must be an object"], "response_format.schema"),
    ("schema nested 400 deep", "chat", {"response_format": {"type": "json_object", "schema": DEEP_SCHEMA}},
     400, ["response_format.schema"], "response_format.schema"),
    ("tool parameter named a\"b", "chat", {"tools": [TOOL_WITH_QUOTE],
                                          "tool_choice": {"type": "function", "function": {"name": "f"}}},
     400, ["tools[0].parameters", "invalid grammar"], "tools[0].parameters"),
    ("legacy function parameter named a\"b", "chat", {"functions": [TOOL_WITH_QUOTE["function"]],
                                                     "function_call": {"name": "f"}},
     400, ["functions[0].parameters", "invalid grammar"], "functions[0].parameters"),
    ("tool_choice naming no tool", "chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
                                           "tool_choice": {"type": "function", "function": {"name": "g"}}},
     400, ["'g' not found"], None),
    ("grammar that does not parse", "chat", {"grammar": "root ::= ("}, 400, ["grammar", "invalid grammar"], "grammar"),
    ("grammar nested 20000 deep", "chat", {"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000},
     400, ["nested more than 256"], "grammar"),
    ("grammar and response_format", "chat", {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}},
     400, ["not both"], "response_format"),
    ("no messages", "chat", {"messages": None}, 400, ["messages must be a non-empty list"], "messages"),
    ("empty messages", "chat", {"messages": []}, 400, ["messages must be a non-empty list"], "messages"),
    ("an image part", "chat", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, 400, ["only text parts", "image_url"], "messages"),
    ("logit_bias outside the vocabulary", "chat", {"logit_bias": {"999999": 5}},
     400, ["999999", "outside this model's vocabulary"], "logit_bias"),
    ("logit_bias key not a number", "chat", {"logit_bias": {"abc": 5}}, 400, ["'abc' is not a token id"], "logit_bias"),
    ("JSON nested 200000 deep", "chat", b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
     400, ["nested too deeply"], None),
    ("NaN in JSON", "chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
     400, ["NaN is not a JSON number"], None),
    ("invalid UTF-8 body", "chat", b'{"messages": "\xff\xfe"}', 400, ["not valid JSON"], None),
    ("max_tokens 0", "chat", {"max_tokens": 0}, 400, ["max_tokens must be between 1"], None),
    ("completion prompt list", "completions", {"prompt": ["a", "b"]}, 400, ["one prompt"], None),
]


@pytest.mark.parametrize("name, path, body, status, words, param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_is_a_4xx_and_the_server_keeps_serving(server, name, path, body, status, words, param):
    if isinstance(body, dict):
        defaults = {"model": "tuned", "messages": QUESTION} if path == "chat" else {"model": "tuned", "prompt": "3"}
        body = {k: v for k, v in {**defaults, **body}.items() if v is not None}
    got, answer = post(server.url, body, "/v1/chat/completions" if path == "chat" else "/v1/completions")
    assert got == status, answer
    error = answer["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, answer
    for word in words:
        assert word in error["message"], answer
    assert_still_serving(server)


def test_text_parts_are_joined_like_a_plain_message(server):
    parts = [{"type": "text", "text": "What is 3 "}, {"type": "text", "text": "plus 3?"}]
    status, joined = post(server.url, {"model": "tuned", "messages": [{"role": "user", "content": parts}]})
    assert status == 200
    _, plain = post(server.url, {"model": "tuned", "messages": QUESTION})
    assert joined["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]


def test_a_valid_schema_still_constrains_the_answer(server):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    status, body = post(server.url, {"model": "tuned", "messages": QUESTION,
                                     "response_format": {"type": "json_object", "schema": schema}})
    assert status == 200
    text = body["choices"][0]["message"]["content"]
    _, free = post(server.url, {"model": "tuned", "messages": QUESTION})
    assert text.startswith("{") and not free["choices"][0]["message"]["content"].startswith("{"), (text, free)


def raw_connection(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_response(s: socket.socket) -> str:
    """One whole HTTP response from a raw socket: headers, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += s.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def partial_request(body_announced: int, body_sent: bytes) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_announced}\r\n\r\n").encode() + body_sent


def test_a_client_stalling_mid_body_gets_408_after_the_timeout(server):
    with raw_connection(server) as s:
        s.sendall(partial_request(1000, b'{"messages": ['))
        t0 = time.monotonic()
        reply = read_response(s)
        waited = time.monotonic() - t0
    assert reply.startswith("HTTP/1.1 408"), reply
    assert "did not arrive within 2 s" in reply
    assert REQUEST_TIMEOUT - 0.5 < waited < REQUEST_TIMEOUT + 10
    assert_still_serving(server)


def test_a_client_hanging_up_mid_body_is_one_log_line(server):
    before = server.log.read_text()
    with raw_connection(server) as s:
        s.sendall(partial_request(1000, b'{"messages": ['))
        time.sleep(0.2)
    time.sleep(0.5)
    assert_still_serving(server)
    new = server.log.read_text()[len(before):]
    assert "hung up before sending its whole request" in new
    assert "Traceback" not in server.log.read_text()


def test_an_idle_connection_is_closed(server):
    with raw_connection(server) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s).startswith("HTTP/1.1 200")  # the connection is kept alive, then closed for idling
        t0 = time.monotonic()
        s.settimeout(30)
        assert s.recv(1) == b""
        assert time.monotonic() - t0 < 15


def test_sigterm_ends_the_server_even_with_a_client_stalled_mid_body(tiny_export, tmp_path):
    proc, port = start_server(tiny_export, tmp_path / "server.log", "--request-timeout", "600")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(partial_request(1000, b'{"messages": ['))
            time.sleep(0.5)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            assert time.monotonic() - t0 < 30
    finally:
        proc.kill()
    log = (tmp_path / "server.log").read_text()
    assert proc.returncode == -signal.SIGTERM, log  # uvicorn shuts down, then re-raises the signal it caught
    assert "timeout graceful shutdown exceeded" in log
    assert "Traceback" not in log, log


def test_no_traceback_in_the_log_after_every_hostile_request(server):
    # runs last in this module: everything above was sent to the same process
    assert server.proc.poll() is None
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]
