"""`edgelora serve` (edgelora.serve): the OpenAI-compatible server on a tiny base GGUF plus its LoRA GGUF,
checked with the real `openai` client and raw HTTP against edgelora.runtime's answers for the same files."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import uvicorn

from edgelora import runtime
from edgelora.serve import build_app, listen, open_models
from tiny import assert_one_line_error, ctrl_c_default, run_cli

KEY = "sk-test-key"
LIMIT = 24  # --max-tokens-limit: also every answer's length here, which keeps the module fast
BODY_LIMIT = 16_384
QUESTION = [{"role": "user", "content": "What is 3 plus 3?"}]


@pytest.fixture(scope="module")
def gguf(tiny_export):
    return tiny_export


@pytest.fixture(scope="module")
def server(gguf):
    """The app on a free loopback port, uvicorn in a thread: base served as its file stem, the LoRA as 'tuned'."""
    models = open_models(gguf["base:f16"], [(f"tuned={gguf['lora']}", 1.0)])
    app = build_app(models, api_key=KEY, max_tokens_limit=LIMIT, max_request_bytes=BODY_LIMIT)
    sock = listen("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert uv.started
    base = gguf["base:f16"].stem
    yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", base=base, names=[base, "tuned"],
                          models=models)
    uv.should_exit = True
    thread.join(30)
    assert not thread.is_alive()


@pytest.fixture(scope="module")
def reference(gguf, server):
    """Model name -> a fresh edgelora.runtime load of the same files."""
    return {server.base: runtime.load(gguf["base:f16"]),
            "tuned": runtime.load(gguf["base:f16"], loras=[(gguf["lora"], 1.0)])}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def call(server, path, body=None, *, key=KEY, data=None, method=None):
    """(status, JSON) of a raw request; `body` is sent as JSON, `data` as given."""
    if body is not None:
        data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server.url + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def chat(client, model, messages=QUESTION, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=LIMIT, temperature=0, **kw)


# ---------------------------------------------------------------- answers

def test_models_lists_the_base_and_the_loras(client, server):
    assert [m.id for m in client.models.list()] == server.names == [server.base, "tuned"]


def test_chat_answers_like_the_runtime_and_adapters_switch_cleanly(client, server, reference):
    expected = {name: rt.chat(QUESTION, max_tokens=LIMIT) for name, rt in reference.items()}
    assert expected["tuned"] != expected[server.base]  # the adapter really changes the answer
    for name in [server.base, "tuned", server.base, "tuned", "tuned"]:  # each switch must drop the KV cache
        r = chat(client, name)
        assert (r.model, r.choices[0].message.content) == (name, expected[name])
        assert r.usage.completion_tokens > 0
    status, body = call(server, "/v1/chat/completions", {"model": "tuned", "messages": QUESTION})
    assert status == 200 and body["choices"][0]["message"]["content"] == expected["tuned"]  # defaults: greedy, LIMIT


def test_streams_join_to_the_same_answer(client, server, reference):
    for name, rt in reference.items():
        chunks = list(chat(client, name, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "".join(rt.chat(QUESTION, max_tokens=LIMIT, stream=True))  # bytes split like the runtime's
        pieces = client.completions.create(model=name, prompt="What is 3", max_tokens=12, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in pieces) == "".join(rt.complete("What is 3", max_tokens=12,
                                                                                 stream=True))


def test_completions_answer_like_the_runtime(client, server, reference):
    for name, rt in reference.items():
        r = client.completions.create(model=name, prompt="What is 3", max_tokens=12, temperature=0)
        assert r.model == name and r.choices[0].text == rt.complete("What is 3", max_tokens=12)


# ---------------------------------------------------------------- errors

def assert_error(status_body, status, *words):
    got, body = status_body
    assert got == status, body
    error = body["error"]
    assert set(error) >= {"message", "type", "code"} and isinstance(error["message"], str), body
    for word in words:
        assert word in error["message"], body
    return error


def test_errors_are_openai_shaped_and_the_server_keeps_serving(server, client, reference):
    chat_body = {"model": server.base, "messages": QUESTION, "max_tokens": 4}
    long = {"model": "tuned", "messages": [{"role": "user", "content": "hi " * 2000}], "max_tokens": 4}
    assert_error(call(server, "/v1/models", key=None), 401, "API key")
    assert_error(call(server, "/v1/chat/completions", chat_body, key="wrong"), 401)
    assert_error(call(server, "/v1/chat/completions", data=b"{nope", key=None), 401)  # the key is checked first
    e = assert_error(call(server, "/v1/chat/completions", {**chat_body, "model": "gpt-4"}), 404,
                     "'gpt-4'", server.base, "tuned")
    assert e["code"] == "model_not_found"
    assert_error(call(server, "/v1/completions", {"model": "nope", "prompt": "hi"}), 404, server.base)
    e = assert_error(call(server, "/v1/chat/completions", {**chat_body, "max_tokens": LIMIT + 1}), 400, str(LIMIT))
    assert e["code"] == "max_tokens_over_limit"
    assert_error(call(server, "/v1/completions", {"prompt": "hi", "max_tokens": 0}), 400, "max_tokens")
    for stream in (False, True):  # a stream fails before its 200 too
        e = assert_error(call(server, "/v1/chat/completions", {**long, "stream": stream}), 400,
                         "context window of 1024")
        assert e["code"] == "context_length_exceeded"
    assert_error(call(server, "/v1/completions", {"prompt": "hi " * 2000, "max_tokens": 4}), 400, "context window")
    assert_error(call(server, "/v1/chat/completions", data=b'{"model": '), 400, "not valid JSON")
    assert_error(call(server, "/v1/chat/completions", {"messages": "hi"}), 400, "messages")
    assert_error(call(server, "/v1/chat/completions", {**chat_body, "n": 2}), 400, "n > 1")
    assert_error(call(server, "/v1/completions", {"prompt": "hi", "grammar": "root ::= x ("}), 400, "invalid grammar")
    assert_error(call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * BODY_LIMIT}]}),
                 413, str(BODY_LIMIT))
    assert_error(call(server, "/v1/nothing", method="GET"), 404)
    assert_error(call(server, "/v1/models", data=b"{}"), 405)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError, match="served models"):
        chat(client, "gpt-4")
    with pytest.raises(openai.BadRequestError, match="exceed context window") as e:
        chat(client, "tuned", messages=long["messages"], stream=True)
    assert e.value.code == "context_length_exceeded"
    # After all of that: the right answers still, by default to the base model.
    status, body = call(server, "/v1/chat/completions", {"messages": QUESTION, "temperature": 0})
    assert status == 200 and body["model"] == server.base
    assert body["choices"][0]["message"]["content"] == reference[server.base].chat(QUESTION, max_tokens=LIMIT)


def test_concurrent_requests_wait_their_turn(client, server, reference):
    questions = [[{"role": "user", "content": f"What is {i} plus {i}?"}] for i in range(6)]
    jobs = [(server.names[i % 2], q, i % 3 == 0) for i, q in enumerate(questions)]

    def ask(job):
        name, messages, stream = job
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in chat(client, name, messages, stream=True))
        return chat(client, name, messages).choices[0].message.content

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == ["".join(reference[name].chat(messages, max_tokens=LIMIT, stream=stream))
                       for name, messages, stream in jobs]
    assert chat(client, "tuned").choices[0].message.content == reference["tuned"].chat(QUESTION, max_tokens=LIMIT)


def test_grammar_constrains_the_answer(server):
    status, body = call(server, "/v1/completions", {"model": "tuned", "prompt": "hi", "max_tokens": 8,
                                                    "grammar": 'root ::= "x" [a-z ]*'})
    assert status == 200 and re.fullmatch("x[a-z ]*", body["choices"][0]["text"]), body


def test_a_client_that_leaves_mid_stream_frees_the_model(client, server, reference, monkeypatch):
    """A stream whose client goes away stops at the chunk being computed, then the next request runs.

    The model is far too fast to leave mid-answer, so this first stream is a stand-in that yields
    one chunk, then waits on `gate` while the client leaves, then would go on forever."""
    gate, closed = threading.Event(), threading.Event()

    def endless(**kwargs):
        try:
            while True:
                yield {"choices": [{"text": "x", "index": 0, "finish_reason": None}]}
                gate.wait()
        finally:
            closed.set()

    real = server.models.activate

    def activate_once(name):  # the next request gets the real model again
        monkeypatch.setattr(server.models, "activate", real)
        return SimpleNamespace(create_completion=endless)

    monkeypatch.setattr(server.models, "activate", activate_once)
    body = json.dumps({"model": "tuned", "prompt": "hi", "stream": True}).encode()
    try:
        with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: "
                         b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
            received = b""
            while b"data: " not in received:
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200 OK")
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(chat, client, "tuned")
            time.sleep(0.5)
            assert not answer.done()  # the chunk in flight still owns the llama context
            gate.set()
            assert closed.wait(30)  # the client left: the stream was closed, not drained
            assert answer.result(60).choices[0].message.content == reference["tuned"].chat(QUESTION, max_tokens=LIMIT)
    finally:
        gate.set()


# ---------------------------------------------------------------- start-up and CLI

def test_bad_start_ups_are_one_line_errors(gguf, wider_gguf):
    base, lora = gguf["base:f16"], gguf["lora"]
    cases = [
        ((base, "--lora", f"{base.stem}={lora}"), f"model name '{base.stem}' is used twice (LoRA {lora})"),
        ((base, "--lora", f"a={lora}", "--lora", f"a={lora}"), "model name 'a' is used twice"),
        ((base, "--lora", lora, "--lora", lora), f"model name '{lora.stem}' is used twice"),
        ((base, "--lora", f"x={base}"), f"LoRA {base} is a GGUF model, not a LoRA adapter"),
        ((wider_gguf, "--lora", lora), f"LoRA {lora} does not fit model {wider_gguf.name}: failed to apply lora"),
        ((base, "--lora", lora, "--lora-scale", "1", "--lora-scale", "2"), "2 --lora-scale values for 1 --lora files"),
        ((lora,), f"model {lora} is a LoRA adapter"),
    ]
    for args, message in cases:
        assert_one_line_error(run_cli("serve", *args, "--port", 0), message)
    with listen("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("serve", base, "--port", port),
                              f"cannot listen on 127.0.0.1:{port}")


def test_serve_command_serves_until_ctrl_c(gguf, reference, server):
    env = {**os.environ, "EDGELORA_API_KEY": "env-key", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "serve", str(gguf["base:f16"]), "--name", "base",
                             "--lora", str(gguf["lora"]), "--lora-scale", "1", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=ctrl_c_default)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        url = re.fullmatch(r"serving (http://127\.0\.0\.1:\d+/v1) \(OpenAI-compatible; Ctrl-C stops\)\n", lines[0])
        assert url and lines[1:] == [f"models: base, {gguf['lora'].stem}\n", "device: cpu (0 layers offloaded)\n"], \
            lines
        local = openai.OpenAI(base_url=url[1], api_key="env-key", max_retries=0, timeout=60)
        assert [m.id for m in local.models.list()] == ["base", gguf["lora"].stem]  # the socket listens already
        answer = chat(local, gguf["lora"].stem).choices[0].message.content
        assert answer == reference["tuned"].chat(QUESTION, max_tokens=LIMIT)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr


def test_serve_without_its_extra_says_what_to_install():  # torch-free imports: tests/test_runtime.py
    light = "import sys; sys.modules['starlette'] = None; from edgelora.cli import main; main(['serve', 'm.gguf'])"
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True)
    assert (out.returncode, out.stderr) == (1, "error: edgelora serve needs starlette: pip install 'edgelora[serve]'\n")


def test_json_schemas_hold_answers_per_request_and_by_default(gguf, server, tmp_path):
    """--json-schema: the model's default schema, which a request's response_format replaces
    (OpenAI's json_schema shape too) or turns off ("text"); unusable schemas are 400s."""
    import shutil

    import jsonschema
    from starlette.testclient import TestClient

    from tiny import CLOSED

    lora = shutil.copy(gguf["lora"], tmp_path / "tuned.gguf")
    (tmp_path / "schema.json").write_text(json.dumps(CLOSED))
    auto = open_models(gguf["base:f16"], [(f"tuned={lora}", 1.0)], json_schema="auto")
    assert auto.schemas == {"tuned": CLOSED}  # only the LoRA has a schema.json beside it
    even = {"type": "object", "properties": {"even": {"type": "boolean"}}, "required": ["even"],
            "additionalProperties": False}
    with TestClient(build_app(auto, max_tokens_limit=64)) as http:
        def ask(model="tuned", **extra):
            return http.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, **extra})

        def answer(response) -> str:
            assert response.status_code == 200, response.text
            return response.json()["choices"][0]["message"]["content"]

        jsonschema.validate(json.loads(answer(ask())), CLOSED)
        with pytest.raises(ValueError):
            json.loads(answer(ask(response_format={"type": "text"})))
        with pytest.raises(ValueError):
            json.loads(answer(ask(server.base)))  # the base has no schema of its own
        given = ask(response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": even, "strict": True}})
        jsonschema.validate(json.loads(answer(given)), even)
        for response_format, words in (
                ({"type": "json_schema", "json_schema": {"name": "e", "schema": {"type": "objekt"}}},
                 "response_format.schema: not a valid JSON schema at type"),
                ({"type": "json_schema", "json_schema": {"name": "e"}}, "must be an object with a 'schema'")):
            bad = ask(response_format=response_format)
            assert bad.status_code == 400 and words in bad.json()["error"]["message"], bad.text
        jsonschema.validate(json.loads(answer(ask())), CLOSED)  # still serving, default intact
