"""`edgelora serve`: an OpenAI-compatible HTTP server for one GGUF model and its LoRA adapters.

    models = open_models("base.gguf", loras=[("extract=extract-lora-f16.gguf", 1.0)])
    app = build_app(models, api_key="secret")      # an ASGI app: POST /v1/chat/completions,
    run(app, listen("127.0.0.1", 8000))            # POST /v1/completions, GET /v1/models

The base is loaded once (edgelora.runtime.load); each LoRA GGUF is attached to it with llama.cpp's
adapter API and served as a model of its own, chosen per request by the `model` field. There is
one llama context, so requests are answered one at a time in arrival order (a lock), and a
streamed answer holds the lock until it ends or its client goes away.

Why not llama_cpp.server.app.create_app: it keeps its model, settings and locks in module globals
(one app per process); its LlamaProxy switches models by reloading a whole file and sends an
unknown name silently to the default model; its auth, validation and streaming errors are not
OpenAI-shaped (FastAPI's {"detail": ...}, and a streamed request that overflows the context fails
after the 200 header); a grammar llama.cpp cannot parse segfaults it; and its request types
default to other sampling settings than `edgelora run` (temperature 0.8, repeat_penalty 1.1). Overriding all that takes more code than
this Starlette app, which reuses what fits: the server's pydantic request types, and Llama's
OpenAI-shaped create_chat_completion / create_completion (responses and stream chunks).

Sampling settings a request leaves out take `edgelora run`'s defaults (temperature 0, llama.cpp's
own for the rest), so an answer at temperature 0 equals edgelora.runtime's for the same files.
Only llama-cpp-python's `server` extra (starlette, uvicorn, pydantic) and no torch are imported.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as C
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import EdgeloraError
from .llamacpp import grammar_sampler, handles
from .runtime import CHAT_TEMPLATE, NO_TEMPLATE, Runtime, init_lora, load, lora_file, lora_template, set_loras
from .templates import TemplateError
from .schema import beside, grammar_text
from .schema import load as load_schema
from .serve_limits import BODY_TIMEOUT_S, MAX_REQUEST_BYTES, MAX_TOKENS_LIMIT

KEEP_ALIVE_S = 5  # an idle connection is closed after this
SHUTDOWN_TIMEOUT_S = 10  # on SIGTERM / Ctrl-C, running requests get this long before they are cancelled
# Request fields Llama's methods do not take: llama.cpp-server extras and OpenAI's `user`, `best_of`.
_NOT_FORWARDED = {"model", "n", "best_of", "user", "min_tokens", "logit_bias_type"}


# ---------------------------------------------------------------- models

@dataclass
class Lora:
    scale: float
    handle: C.llama_adapter_lora_p  # owned by the base model, freed with it
    template: str | None = None  # the chat template its run trained with, if the file carries one
    file: str | None = None  # the LoRA GGUF (named when its template fails)


class Models:
    """The base Runtime and its LoRA adapters by model name; activate() puts one in the context."""

    def __init__(self, runtime: Runtime, base: str, loras: dict[str, Lora],
                 schemas: dict[str, dict] | None = None):
        self.runtime, self.base, self.loras = runtime, base, loras
        self.schemas = schemas or {}  # model name -> the JSON schema its answers follow unless a request says
        self.active = base

    @property
    def names(self) -> list[str]:
        return [self.base, *self.loras]

    def has_chat_template(self, name: str) -> bool:
        lora = self.loras.get(name)
        return bool(lora and lora.template) or CHAT_TEMPLATE in self.runtime.llm.metadata

    def activate(self, name: str) -> llama_cpp.Llama:
        """The Llama with `name`'s adapter alone attached (none for the base).

        The KV cache holds the last prompt as computed with the previous adapters, and Llama
        would reuse its matching prefix: on a switch reset() drops it, so the next call evaluates
        its prompt from position 0 with the new adapter.
        """
        llm = self.runtime.llm
        if name != self.active:
            lora = self.loras.get(name)
            set_loras(llm, [(lora.handle, lora.scale)] if lora else [])
            self.runtime.use_chat_template(lora.template if lora else None, lora.file if lora else None)
            llm.reset()
            self.active = name
        return llm


def open_models(model: str | Path, loras: Sequence[tuple[str, float]] = (), *, name: str | None = None,
                device: str = "auto", n_ctx: int = 4096, threads: int | None = None, verbose: bool = False,
                json_schema: str | None = None) -> Models:
    """Load `model` once and attach each LoRA GGUF to it, served as model NAME.

    A LoRA is given as "NAME=FILE" or "FILE" (named by its file stem), with its scale; the base
    is named `name` or its file stem. Duplicate names, files that are not LoRA adapters and
    adapters made for another base are one-line EdgeloraErrors, raised before serving.
    json_schema: "auto" holds each model's answers to the schema.json exported beside its file
    (where there is one), a file path holds every model's to that schema; a request's own grammar
    or response_format (including {"type": "text"}) overrides it.
    """
    base = Path(model).expanduser()
    names = [name or base.stem]
    files = []
    for spec, scale in loras:
        lora_name, sep, file = spec.partition("=")
        if not sep or Path(spec).exists():  # a plain FILE, even one with '=' in its name
            lora_name, file = "", spec
        path = Path(file).expanduser()
        lora_name = lora_name or path.stem
        if lora_name in names:
            raise EdgeloraError(f"model name '{lora_name}' is used twice (LoRA {path}); name it with --lora NAME=FILE")
        names.append(lora_name)
        files.append((lora_file(path), float(scale)))
    rt = load(base, device=device, n_ctx=n_ctx, threads=threads, verbose=verbose)
    adapters = {n: Lora(scale, init_lora(rt.llm, path, base, verbose), lora_template(path), str(path))
                for n, (path, scale) in zip(names[1:], files)}
    schemas = _default_schemas(json_schema, dict(zip(names, [base, *(path for path, _ in files)])))
    for schema, where in schemas.values():  # parsed by llama.cpp now, not at the first request
        try:
            C.llama_sampler_free(grammar_sampler(handles(rt.llm)[2], grammar_text(schema, where)))
        except ValueError as e:
            raise EdgeloraError(f"{where}: {e}") from None
    models = Models(rt, names[0], adapters, {name: schema for name, (schema, _) in schemas.items()})
    _check_templates(models)
    return models


def _check_templates(models: Models) -> None:
    """Refuse to serve a model whose chat template cannot render a plain conversation (a
    TemplateError naming its file), rather than answer every chat request with its error."""
    for name in models.names:
        models.activate(name)
        models.runtime.check_chat_template()
    models.activate(models.base)


def _default_schemas(choice: str | None, files: dict[str, Path]) -> dict[str, tuple[dict, str]]:
    """--json-schema for each served model name (see open_models), with the file it came from."""
    if choice in (None, "none"):
        return {}
    if choice != "auto":
        schema = load_schema(choice)
        return {name: (schema, choice) for name in files}
    return {name: (load_schema(path), str(path)) for name, file in files.items() if (path := beside(file)) is not None}


# ---------------------------------------------------------------- HTTP

class ApiError(HTTPException):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, type: str = "invalid_request_error",
                 param: str | None = None):
        super().__init__(status, message)
        self.code, self.type, self.param = code, type, param


async def _error_response(_request: Request, exc: Exception) -> JSONResponse:
    """Every error, ours, Starlette's (404 route, 405 method) or unexpected (500), in OpenAI's shape."""
    headers = exc.headers if isinstance(exc, HTTPException) else None  # 405's Allow
    if not isinstance(exc, ApiError):
        exc = (ApiError(exc.status_code, exc.detail) if isinstance(exc, HTTPException)
               else ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))
    return JSONResponse({"error": {"message": exc.detail, "type": exc.type, "param": exc.param, "code": exc.code}},
                        status_code=exc.status_code, headers=headers)


class _EventStream(StreamingResponse):
    """Server-sent events of Llama's stream chunks, ending with `data: [DONE]`.

    Holds the model lock (calls `release` when done) until the stream ends, fails or the client
    disconnects: Starlette then cancels the stream, and anyio lets the chunk being computed in
    its worker thread finish first, so the context is idle when the next request gets it.
    """

    def __init__(self, first: dict, chunks: Iterator[dict], release):
        self.chunks, self.release = chunks, release
        super().__init__(self._events(first), media_type="text/event-stream")

    async def _events(self, first: dict):
        yield f"data: {json.dumps(first)}\n\n"
        async for chunk in iterate_in_threadpool(self.chunks):
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.chunks.close()
            self.release()


# A grammar nested deeper than this is refused: llama.cpp's parser recurses once per level and
# overflows its thread's stack (SIGSEGV) on a few thousand; real grammars nest a handful deep.
MAX_GRAMMAR_DEPTH = 256


def _grammar_depth(text: str) -> int:
    """How deep the parentheses of a GBNF grammar nest, outside its strings, classes and comments."""
    depth = deepest = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"[":  # a literal or a character class: skip to its unescaped end
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        i += 1
    return deepest


def _checked_grammar(llm: llama_cpp.Llama, text: str, field: str) -> llama_cpp.LlamaGrammar:
    """A request's GBNF grammar, checked before any sampler uses it: nesting bounded (llama.cpp's
    parser would overflow the stack), then parsed by llama.cpp itself; a 400 naming `field` if not."""
    if _grammar_depth(text) > MAX_GRAMMAR_DEPTH:
        raise ApiError(400, f"{field}: grammar nested more than {MAX_GRAMMAR_DEPTH} levels deep", param=field)
    try:
        C.llama_sampler_free(grammar_sampler(handles(llm)[2], text))
    except ValueError as e:
        raise ApiError(400, f"{field}: {e}", param=field) from None
    return llama_cpp.LlamaGrammar.from_string(text)


def _schema_grammar(llm: llama_cpp.Llama, schema, field: str) -> llama_cpp.LlamaGrammar:
    """The grammar of a JSON schema (edgelora.schema), checked; where it cannot be made
    (llama-cpp-python would silently fall back to any JSON) a 400 naming `field`."""
    try:
        text = grammar_text(schema, field)
    except EdgeloraError as e:
        raise ApiError(400, str(e), param=field) from None
    return _checked_grammar(llm, text, field)


def _openai_response_format(fields: dict) -> None:
    """OpenAI's response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    rewritten as the {"type": "json_object", "schema"} llama-cpp-python's request type takes."""
    response_format = fields.get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise ApiError(400, "response_format.json_schema must be an object with a 'schema'",
                       param="response_format.json_schema")
    fields["response_format"] = {"type": "json_object", "schema": spec["schema"]}


def _request_grammar(llm: llama_cpp.Llama, kwargs: dict, default: llama_cpp.LlamaGrammar | None = None) -> None:
    """Check, before llama.cpp sees them, every request field that becomes a grammar: `grammar`,
    `response_format` (json_object, with or without a schema) and the parameter schemas of `tools`
    / `functions`. The grammar to use is left in kwargs["grammar"] as a parsed LlamaGrammar: the
    request's own, else `default` (the model's --json-schema) unless response_format is "text"."""
    if "grammar" in kwargs:
        kwargs["grammar"] = _checked_grammar(llm, kwargs["grammar"], "grammar")
    response_format = kwargs.pop("response_format", None) or {}
    if response_format.get("type") == "json_object":
        if "grammar" in kwargs:
            raise ApiError(400, "give either grammar or response_format, not both", param="response_format")
        schema = response_format.get("schema")
        kwargs["grammar"] = (_schema_grammar(llm, schema, "response_format.schema") if schema is not None
                             else llama_cpp.LlamaGrammar.from_string(llama_cpp.llama_grammar.JSON_GBNF))
    for key in ("tools", "functions"):
        for i, tool in enumerate(kwargs.get(key) or []):
            function = tool.get("function", {}) if key == "tools" else tool
            if "parameters" in function:
                _schema_grammar(llm, function["parameters"], f"{key}[{i}].parameters")
    if default is not None and "grammar" not in kwargs and response_format.get("type") != "text":
        kwargs["grammar"] = default


def _logit_bias(bias: dict, n_vocab: int) -> dict:
    """OpenAI's logit_bias ({"token id": bias}) checked: llama-cpp-python drops unknown ids silently."""
    checked = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < n_vocab:
            raise ApiError(400, f"logit_bias: token id {token} is outside this model's vocabulary of {n_vocab}",
                           param="logit_bias")
        if not math.isfinite(value):
            raise ApiError(400, f"logit_bias: the bias of token {token} must be a finite number", param="logit_bias")
        checked[str(token)] = value
    return checked


def _text_messages(messages: list[dict]) -> list[dict]:
    """Messages with text-part lists ([{"type": "text", "text": ...}]) joined into one string, as
    chat templates expect; a 400 for an empty list and for parts other than text (images)."""
    if not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            kinds = {part.get("type") for part in content}
            if kinds - {"text"}:
                raise ApiError(400, f"messages[{i}].content: only text parts are supported, not "
                                    f"{', '.join(sorted(map(str, kinds - {'text'})))}", param="messages")
            m = {**m, "content": "".join(part.get("text", "") for part in content)}
        out.append(m)
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _ClientGone(Exception):
    """The client hung up before its request body was complete: nothing to answer."""


async def _client_gone(request: Request, _exc: Exception) -> Response:
    logging.getLogger("uvicorn.error").info("%s:%s hung up before sending its whole request",
                                            *(request.client or ("?", "?")))
    return Response(status_code=400)  # never delivered


class _Server:
    def __init__(self, models: Models, api_key: str | None, max_tokens_limit: int, max_request_bytes: int,
                 body_timeout: float):
        self.models, self.api_key = models, api_key
        self.max_tokens_limit, self.max_request_bytes, self.body_timeout = max_tokens_limit, max_request_bytes, body_timeout
        self.lock = asyncio.Lock()  # the one llama context; released by whichever task ends a stream
        self.started = int(time.time())

    def _authorize(self, request: Request) -> None:
        if not self.api_key:
            return
        given = request.headers.get("authorization", "").encode("latin-1")
        if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           "invalid_api_key")

    async def _read(self, request: Request) -> bytearray:
        data = bytearray()
        async for piece in request.stream():
            data += piece
            if len(data) > self.max_request_bytes:
                raise ApiError(413, f"request body is over the server's limit of {self.max_request_bytes} bytes",
                               "request_too_large")
        return data

    async def _body(self, request: Request, schema: type[BaseModel]) -> BaseModel:
        """The request's JSON body as `schema`; it must arrive whole within the body timeout (a
        client stalling mid-body would otherwise hold its connection, and a shutdown, for ever)."""
        try:
            data = await asyncio.wait_for(self._read(request), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                           "request_timeout") from None
        except ClientDisconnect:
            raise _ClientGone() from None
        try:
            fields = json.loads(data, parse_constant=_no_constant)
        except ValueError as e:
            raise ApiError(400, f"request body is not valid JSON: {e}") from None
        except RecursionError:
            raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
        if isinstance(fields, dict):
            _openai_response_format(fields)
        try:
            return schema.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            raise ApiError(400, f"invalid request: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def _arguments(self, body: BaseModel, name: str) -> dict:
        """Llama keyword arguments for the request: the fields it set, checked against the limits."""
        if body.n not in (None, 1):
            raise ApiError(400, "n > 1 is not supported: send one request per answer")
        kwargs = body.model_dump(exclude_unset=True, exclude=_NOT_FORWARDED)
        kwargs.update(model=name, stream=body.stream)  # `model`: the name Llama puts in the response
        kwargs.setdefault("temperature", 0.0)
        limit = self.max_tokens_limit
        asked = kwargs.get("max_tokens")
        if asked is None:
            kwargs["max_tokens"] = limit
        elif not 1 <= asked <= limit:
            raise ApiError(400, f"max_tokens must be between 1 and this server's limit of {limit}, not {asked}",
                           "max_tokens_over_limit" if asked > limit else None)
        if isinstance(kwargs.get("prompt"), list):
            if len(kwargs["prompt"]) != 1:
                raise ApiError(400, "send exactly one prompt per request")
            kwargs["prompt"] = kwargs["prompt"][0]
        llm = self.models.runtime.llm
        if isinstance(body, CreateChatCompletionRequest):
            kwargs["messages"] = _text_messages(kwargs.get("messages") or [])
        if kwargs.get("logit_bias"):
            kwargs["logit_bias"] = _logit_bias(kwargs["logit_bias"], llm.n_vocab())
        schema = self.models.schemas.get(name)
        _request_grammar(llm, kwargs, None if schema is None else self.models.runtime.grammar(schema))
        return kwargs

    async def models_list(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.started, "owned_by": "edgelora"}
            for name in self.models.names]})

    async def chat(self, request: Request):
        return await self._generate(request, CreateChatCompletionRequest, "create_chat_completion")

    async def completions(self, request: Request):
        return await self._generate(request, CreateCompletionRequest, "create_completion")

    async def _generate(self, request: Request, schema: type[BaseModel], method: str):
        self._authorize(request)
        body = await self._body(request, schema)
        name = body.model or self.models.base
        if name not in self.models.names:
            raise ApiError(404, f"model '{name}' is not served here; served models: {', '.join(self.models.names)}",
                           "model_not_found")
        if method == "create_chat_completion" and not self.models.has_chat_template(name):
            raise ApiError(400, f"{NO_TEMPLATE}; use /v1/completions")
        kwargs = self._arguments(body, name)
        await self.lock.acquire()
        held = True
        try:
            fn = getattr(self.models.activate(name), method)
            out = await run_in_threadpool(fn, **kwargs)
            if not body.stream:
                return JSONResponse(out)
            first = await run_in_threadpool(next, out)  # a prompt over the context fails here, before the 200
            held = False  # the stream releases the lock when it ends
            return _EventStream(first, out, self.lock.release)
        except TemplateError as e:  # the model's chat template: refused these messages, or failed on them
            raise ApiError(400 if e.refused else 500, str(e), "chat_template_error",
                           type="invalid_request_error" if e.refused else "server_error") from None
        except ValueError as e:  # llama-cpp-python's input errors: a prompt longer than the context
            code = "context_length_exceeded" if "exceed context window" in str(e) else None
            raise ApiError(400, str(e), code) from None
        finally:
            if held:
                self.lock.release()


def build_app(models: Models, *, api_key: str | None = None, max_tokens_limit: int = MAX_TOKENS_LIMIT,
              max_request_bytes: int = MAX_REQUEST_BYTES, body_timeout: float = BODY_TIMEOUT_S) -> Starlette:
    """The ASGI app serving `models`; with `api_key`, every request needs `Authorization: Bearer KEY`."""
    server = _Server(models, api_key, max_tokens_limit, max_request_bytes, body_timeout)
    routes = [Route("/v1/models", server.models_list, methods=["GET"]),
              Route("/v1/chat/completions", server.chat, methods=["POST"]),
              Route("/v1/completions", server.completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _error_response, _ClientGone: _client_gone,
                                                        Exception: _error_response})


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A listening socket on host:port (port 0: a free one); a port in use is a one-line EdgeloraError."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as e:
        raise EdgeloraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def run(app: Starlette, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` with uvicorn until SIGINT / SIGTERM (then KeyboardInterrupt is re-raised).

    Idle keep-alive connections close after a few seconds; on a signal, requests still running
    get SHUTDOWN_TIMEOUT_S to finish before they are cancelled, so a stalled client cannot keep
    the process alive."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT_S)
    uvicorn.Server(config).run(sockets=[sock])
