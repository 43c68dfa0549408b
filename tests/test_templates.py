"""edgelora.templates: a chat template from a stranger renders sandboxed and bounded, or fails in one line."""
import time

import pytest

from edgelora import templates as T

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HI = [{"role": "user", "content": "hi"}]


def test_renders_as_llama_cpp_python_does():
    """Same output as llama-cpp-python's own formatter, its filters and tags included."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    source = CHATML + "{% generation %}{{ messages | tojson }}{% endgeneration %}{% for m in messages %}{% break %}{% endfor %}"
    theirs = Jinja2ChatFormatter(source, eos_token="</s>", bos_token="<s>")(messages=HI).prompt
    ours = T.chat_formatter("x.gguf")(source, eos_token="</s>", bos_token="<s>")(messages=HI).prompt
    assert ours == theirs == T.render(source, "x.gguf", messages=HI, add_generation_prompt=True)
    assert '[{"role": "user", "content": "hi"}]' in ours


@pytest.mark.parametrize("source,message", [
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "tried what the sandbox forbids: access to attribute '__class__'"),
    ("{{ cycler.__init__.__globals__ }}", "tried what the sandbox forbids: access to attribute '__init__'"),
    ("{% set x = [] %}{{ x.append(1) }}", "tried what the sandbox forbids: access to attribute 'append'"),
    ("{% for i in range(10**8) %}x{% endfor %}", "asked for too much: Range too big"),
    ("{{ 'x' * 100000000 }}", "a repetition of 100,000,000 items is larger than a template needs"),
    ("{{ 10 ** 100000000 }}", "is larger than a template needs"),
    ("{% for m in messages %}{{ m.content }", "does not parse: unexpected '}' (line 1)"),
    ("{{ raise_exception('Only user and assistant roles are supported!') }}",
     "refuses this conversation: Only user and assistant roles are supported!"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    ("{{ messages[5].content }}", "failed: UndefinedError: list object has no element 5"),
    ("{% for i in range(99999) %}{{ 'y' * 100 }}{% endfor %}" * 2, "wrote more than 8,388,608 characters"),
])
def test_a_hostile_or_broken_template_is_one_line_naming_the_file(source, message):
    with pytest.raises(T.TemplateError) as e:
        T.render(source, "model.gguf", messages=HI)
    assert str(e.value).startswith("model.gguf: the chat template ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_loop_that_writes_nothing_is_stopped_in_time(monkeypatch):
    """Two nested loops of 99,999 (10^10 steps, no output) end at the deadline, and the thread's
    previous trace function is back afterwards."""
    import sys

    monkeypatch.setattr(T, "RENDER_SECONDS", 0.3)
    before = sys.gettrace()
    start = time.monotonic()
    with pytest.raises(T.TemplateError, match=r"model.gguf: the chat template ran for more than 0.3 s"):
        T.render("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "model.gguf")
    assert time.monotonic() - start < 5
    assert sys.gettrace() is before
    assert T.render(CHATML, "model.gguf", messages=HI) == "<|im_start|>user\nhi<|im_end|>\n"  # and renders again


def test_a_formatter_built_from_a_broken_template_fails_when_used_not_when_built():
    """What Llama() builds for each template in a GGUF at load: a broken one must not stop the load."""
    formatter = T.chat_formatter("broken.gguf")("{% for %}", eos_token="</s>", bos_token="<s>")
    with pytest.raises(T.TemplateError, match=r"^broken.gguf: the chat template does not parse"):
        formatter(messages=HI)


# ---------------------------------------------------------------- GGUFs with such templates, in every command

HOSTILE = {  # name -> (tokenizer.chat_template, what the one-line error says it did)
    "escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "the chat template tried what the sandbox forbids"),
    "syntax": ("{% for m in messages %}{{ m.content }", "the chat template does not parse: unexpected '}'"),
    "endless": ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
                "the chat template ran for more than"),
    "refuses": ("{{ raise_exception('this template talks to nobody') }}",
                "the chat template refuses this conversation: this template talks to nobody"),
}
PICKY = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m.content == 'forbidden' %}"
                       "{{ raise_exception('forbidden is not a word here') }}{% endif %}")  # refuses one message


def with_template(src, dst, template):
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails

    from tiny import with_metadata

    return with_metadata(src, dst, {"tokenizer.chat_template": MetadataDetails(gguf.GGUFValueType.STRING, template)})


@pytest.fixture(scope="module")
def hostile(tiny_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    return {name: with_template(tiny_export["merged:q8_0"], folder / f"{name}.gguf", template)
            for name, (template, _) in HOSTILE.items()}


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(T, "RENDER_SECONDS", 0.3)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_run_loads_the_file_and_fails_in_one_line_naming_it(hostile, quick, name):
    from tiny import assert_one_line_error, run_cli

    path = hostile[name]
    assert_one_line_error(run_cli("run", path, "-p", "hi", "--max-tokens", 4), f"{path}: {HOSTILE[name][1]}")
    r = run_cli("run", path, "-p", "1 plus 1 is", "--raw", "--max-tokens", 4)  # no template: it still completes
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("name", list(HOSTILE))
def test_chat_refuses_at_start_a_template_that_renders_no_conversation(hostile, quick, name):
    from tiny import assert_one_line_error, run_cli

    path = hostile[name]
    assert_one_line_error(run_cli("chat", path, input="hi\n"), f"{path}: {HOSTILE[name][1]}")


def test_chat_says_a_refused_message_in_one_line_and_goes_on(tiny_export, tmp_path):
    from tiny import run_cli

    path = with_template(tiny_export["merged:q8_0"], tmp_path / "picky.gguf", PICKY)
    r = run_cli("chat", path, "--max-tokens", 4, input="forbidden\nhello\n")
    assert r.exit_code == 0 and "Traceback" not in r.output, r.output
    refused = [line for line in r.output.splitlines() if line.startswith("error: ")]
    assert refused == [f"error: {path}: the chat template refuses this conversation: forbidden is not a word here; "
                       "/reset starts a new conversation"], r.output
    assert r.output.rstrip().splitlines()[-1] not in refused  # "hello" was answered after it


@pytest.mark.parametrize("name", list(HOSTILE))
def test_doctor_gives_a_verdict_not_a_crash(hostile, quick, name):
    from test_doctor import doctor

    r, checks = doctor(hostile[name])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    passed, figure = checks["chat_template"]
    assert not passed and f"{hostile[name]}: {HOSTILE[name][1]}" in figure
    assert checks["loads"][0] and "stops" not in checks  # nothing after it renders a conversation


def test_doctor_passes_a_template_that_refuses_only_system_messages(tiny_export, tmp_path):
    from test_doctor import doctor

    no_system = CHATML.replace("{% for m in messages %}", "{% for m in messages %}{% if m.role == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}")
    r, checks = doctor(with_template(tiny_export["merged:q8_0"], tmp_path / "nosys.gguf", no_system))
    assert checks["chat_template"] == (True, f"renders a conversation without a system message ({tmp_path}/nosys.gguf:"
                                             " the chat template refuses this conversation: System role not supported)")


def test_serve_refuses_at_start_up_a_template_that_cannot_render(hostile, quick):
    from tiny import assert_one_line_error, run_cli

    for name in ("escape", "syntax", "endless"):
        assert_one_line_error(run_cli("serve", hostile[name], "--port", 0), f"{hostile[name]}: {HOSTILE[name][1]}")


def test_serve_answers_a_refused_conversation_in_openais_shape_and_keeps_serving(tiny_export, tmp_path):
    from starlette.testclient import TestClient

    from edgelora.serve import build_app, open_models

    models = open_models(with_template(tiny_export["merged:q8_0"], tmp_path / "picky.gguf", PICKY))
    with TestClient(build_app(models, max_tokens_limit=8), raise_server_exceptions=False) as http:
        def ask(content):
            return http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})

        refused = ask("forbidden")
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == {
            "message": f"{tmp_path}/picky.gguf: the chat template refuses this conversation: forbidden is not a word here",
            "type": "invalid_request_error", "param": None, "code": "chat_template_error"}
        assert ask("hello").status_code == 200


def test_a_real_serve_process_answers_a_refused_conversation_400_and_keeps_serving(tiny_export, tmp_path):
    import signal

    from test_faults_serve import QUESTION, post, start_server

    picky = with_template(tiny_export["base:f16"], tmp_path / "picky.gguf", PICKY)
    log = tmp_path / "server.log"
    proc, port = start_server({"base:f16": picky, "lora": tiny_export["lora"]}, log)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(2):
            status, body = post(url, {"model": "picky", "messages": [{"role": "user", "content": "forbidden"}]})
            assert status == 400 and body["error"]["code"] == "chat_template_error", body
            assert body["error"]["message"] == (f"{picky}: the chat template refuses this conversation: "
                                                "forbidden is not a word here")
            status, body = post(url, {"model": "picky", "messages": QUESTION})
            assert status == 200 and body["choices"][0]["message"]["content"], body
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
