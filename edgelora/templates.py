"""Chat templates are code from whoever made the GGUF: every one edgelora renders goes through here.

A template runs in Jinja's immutable sandbox (no attribute of Python's internals, no mutation of
what it is given), as llama-cpp-python and transformers run it, with their filters and tags, and
is bounded as theirs are not: RENDER_SECONDS of running (a line-level deadline on the template's
own code, so loops that write nothing are stopped too), OUTPUT_CHARS of output, and no `*` or
`**` whose result would exceed those bounds. Whatever goes wrong -- it does not parse, it leaves
the sandbox, it loops, it raises -- is a TemplateError: one line naming where the template came
from and what it did. `ChatFormatter` is llama-cpp-python's Jinja2ChatFormatter rendering through
here, so that chat completions, scoring and serving use the same renderer.
"""
from __future__ import annotations

import contextlib
import sys
import time
from functools import lru_cache

from .errors import EdgeloraError

RENDER_SECONDS = 2.0  # a chat template renders a conversation in milliseconds
OUTPUT_CHARS = 8 << 20  # a rendered prompt larger than this is not a chat


class TemplateError(EdgeloraError):
    """A chat template that cannot render, or refused to (`refused`: its raise_exception): the
    message names where it came from."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


class _Stopped(Exception):
    pass


@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, (int, float)) and isinstance(right, (int, float)):
                if abs(left) > 1 and right * max(abs(left), 2).bit_length() > OUTPUT_CHARS:
                    raise SecurityError(f"{left} ** {right} is larger than a template needs")
            if operator == "*":
                sized, count = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(sized, (str, list, tuple)) and isinstance(count, int) and len(sized) * count > OUTPUT_CHARS:
                    raise SecurityError(f"a repetition of {len(sized) * count:,} items is larger than a template needs")
            return super().call_binop(context, operator, left, right)

    env = Bounded(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True,
                  extensions=[Jinja2ChatFormatter.IgnoreGenerationTags, jinja2.ext.loopcontrols])
    env.filters["tojson"] = Jinja2ChatFormatter.tojson
    return env


@lru_cache(maxsize=32)
def _compiled(source: str):
    return _environment().from_string(source)


def compile_template(source: str, where: str):
    """The template compiled, or a TemplateError naming `where` and the line that does not parse."""
    from jinja2 import TemplateSyntaxError

    try:
        return _compiled(source)
    except TemplateSyntaxError as e:
        raise TemplateError(f"{where}: the chat template does not parse: {e.message} (line {e.lineno})") from None
    except (RecursionError, MemoryError):
        raise TemplateError(f"{where}: the chat template is too deeply nested to parse") from None


class Refusal(ValueError):
    """What a template's raise_exception("...") raises (a template refusing a conversation)."""


def _raise_exception(message: str):
    raise Refusal(message)


def render(source: str, where: str, **context) -> str:
    """`source` rendered with `context` (raise_exception given unless the context has one), bounded
    in time and output; every failure a TemplateError naming `where`."""
    from jinja2.exceptions import SecurityError, TemplateError as JinjaError

    template = compile_template(source, where)
    context.setdefault("raise_exception", _raise_exception)
    out, size = [], 0
    try:
        with _deadline(RENDER_SECONDS):
            for piece in template.generate(**context):
                size += len(piece)
                if size > OUTPUT_CHARS:
                    raise TemplateError(f"{where}: the chat template wrote more than {OUTPUT_CHARS:,} characters")
                out.append(piece)
    except TemplateError:
        raise
    except _Stopped:
        raise TemplateError(f"{where}: the chat template ran for more than {RENDER_SECONDS:g} s (a loop without "
                            "end?)") from None
    except Refusal as e:
        raise TemplateError(f"{where}: the chat template refuses this conversation: {e}", refused=True) from None
    except SecurityError as e:
        raise TemplateError(f"{where}: the chat template tried what the sandbox forbids: {_first_line(e)}") from None
    except OverflowError as e:  # jinja's sandbox: range() of more than MAX_RANGE items
        raise TemplateError(f"{where}: the chat template asked for too much: {_first_line(e)}") from None
    except RecursionError:
        raise TemplateError(f"{where}: the chat template recursed too deeply") from None
    except (JinjaError, TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise TemplateError(f"{where}: the chat template failed: {type(e).__name__}: {_first_line(e)}") from None
    return "".join(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


@contextlib.contextmanager
def _deadline(seconds: float):
    """Stop the template's own code (Jinja compiles it to functions in "<template>") once `seconds`
    have passed: a trace on its lines only, in this thread only; the previous trace restored."""
    end = time.monotonic() + seconds

    def on_line(frame, event, arg):
        if time.monotonic() > end:
            raise _Stopped
        return on_line

    def on_call(frame, event, arg):
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


@lru_cache(maxsize=64)
def chat_formatter(where: str):
    """llama-cpp-python's Jinja2ChatFormatter class, rendering through render() for templates from
    `where`: what Llama() builds for a GGUF's templates, and what a Runtime renders with."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    class ChatFormatter(Jinja2ChatFormatter):
        def __init__(self, template: str, eos_token: str, bos_token: str, add_generation_prompt: bool = True,
                     stop_token_ids=None):
            # not Jinja2ChatFormatter.__init__: it compiles the template unbounded, and raises at load
            self.template, self.eos_token, self.bos_token = template, eos_token, bos_token
            self.add_generation_prompt = add_generation_prompt
            self.stop_token_ids = set(stop_token_ids) if stop_token_ids is not None else None
            self._environment = _Rendering(template, where)

    return ChatFormatter


class _Rendering:
    """What Jinja2ChatFormatter.__call__ renders with (its `_environment`): render() of one template."""

    def __init__(self, source: str, where: str):
        self.source, self.where = source, where

    def render(self, **context) -> str:
        return render(self.source, self.where, **{**context, "raise_exception": _raise_exception})
