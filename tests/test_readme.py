"""The README and docs/ stay true to the code, and the numbers stay in benchmarks/README.md.

What is checked, over README.md and docs/*.md ("the pages"; docs/cli.md, which is generated, is
checked only against --help):

1. The two set-up commands: the README has exactly `bash .ci/setup && .venv/bin/edgelora demo`
   and `bash .ci/setup && .venv/bin/python -m pytest -q -rs`, and CI (.ci/run) runs the second.
2. Every `edgelora COMMAND ... --option` a page shows, in a code block or in inline code, names a
   real command and only options that command has (click's own option names, `--no-x` forms
   and short names included). A line is cut at ` #` (a shell comment) and at `&&`, `;`, `|`;
   quoted strings are dropped before options are read, so a prompt's text is not an option.
3. docs/cli.md is exactly what `python -m edgelora.clidoc --write docs/cli.md` writes, so it is
   every command's current --help.
4. Figures live in benchmarks/README.md, with their command, commit, machine and date:
   - no page holds a commit hash (7-12 hex characters with at least one digit and one letter,
     as a word) or a date (YYYY-MM-DD);
   - a measured figure in a page's prose -- a number followed by a unit of time (`s`, `ms`,
     `min`, `minutes`, `hours`, `3m05s`), of size (`KB`, `MB`, `GB`, `KiB`, `MiB`, `GiB`), of
     speed (`tok/s`, `tokens/s`), or a ratio (`1.68x`) -- may stand only in a section (the
     text between two headings) that links to benchmarks/README.md. Code (blocks and inline)
     is not prose: commands, settings such as `--target-size 74MiB`, and program output are
     written there. A value right after the word "default" is a setting, not a measurement.
     So: write a fixed limit as code (`2 s`) or after "default", and a measurement only
     beside a link to where it was measured.
5. Every relative link in the pages and in benchmarks/README.md reaches a file, and an anchor
   (`page.md#heading`) a heading of that page (GitHub's heading slugs).
6. docs/layout.md names every module of the package, so a contributor finds each one there.
7. The README stays a front door: at most 250 lines.
"""
import re
from pathlib import Path

import pytest

from edgelora import clidoc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(p for p in DOCS.glob("*.md") if p.name != "cli.md")]
LINKED = [*PAGES, ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`[^`\n]+`")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _code(text: str) -> list[str]:
    """Every code block and inline code span of a markdown text."""
    return FENCE.findall(text) + INLINE.findall(FENCE.sub("", text))


def _outside_fences(text: str) -> list[str]:
    """The lines of a markdown text, code blocks blanked (so line numbers stay)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text).splitlines()


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside code blocks, with inline code removed."""
    return [(n, INLINE.sub("", line)) for n, line in enumerate(_outside_fences(text), 1)]


# 1. the set-up commands

def test_exactly_two_setup_commands_and_ci_runs_the_second():
    setup = [line for line in README.splitlines() if line.startswith("bash .ci/setup")]
    assert setup == ["bash .ci/setup && .venv/bin/edgelora demo",
                     "bash .ci/setup && .venv/bin/python -m pytest -q -rs"]
    assert setup[1] in (ROOT / ".ci" / "run").read_text()


# 2. commands and options the pages show

COMMAND = re.compile(r"(?<![\w./-])(?:\.venv/bin/)?edgelora(?:\.cli)?\s+([a-z][a-z-]*)(.*)")
OPTION = re.compile(r"(?<![\w=/.:-])(--?[A-Za-z][\w-]*)")
QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _invocations(text: str) -> list[tuple[str, list[str], str]]:
    """(command, options, the snippet) for each `edgelora COMMAND ...` in a page's code."""
    found = []
    for snippet in _code(text):
        for line in snippet.strip("`").splitlines():
            line = line.split(" #")[0]
            for part in re.split(r"&&|;|\|", line):
                m = COMMAND.search(part)
                if m:
                    found.append((m.group(1), OPTION.findall(QUOTED.sub("", m.group(2))), part.strip()))
    return found


def test_every_edgelora_command_in_the_pages_is_real():
    from edgelora.cli import main

    bad, seen = [], 0
    for page in PAGES:
        for name, options, snippet in _invocations(page.read_text()):
            seen += 1
            cmd = main.commands.get(name)
            if cmd is None:
                bad.append(f"{_rel(page)}: `{snippet}`: no command {name!r}")
                continue
            known = {"--help", "-h"}
            for param in cmd.params:
                known |= set(getattr(param, "opts", [])) | set(getattr(param, "secondary_opts", []))
            bad += [f"{_rel(page)}: `{snippet}`: edgelora {name} has no option {o}" for o in options if o not in known]
    assert seen > 20, "the parser found almost no edgelora commands: is it still reading the pages?"
    assert bad == []


def test_the_invocation_parser():
    text = ('```bash\nedgelora run m.gguf -p "say --hi" --stats   # a --comment\n'
            'bash .ci/setup && .venv/bin/edgelora demo --quick\n```\n'
            'and `edgelora export RUN --quant q4_k_m`, not `edgelora.load(x)`.')
    assert [(n, o) for n, o, _ in _invocations(text)] == [
        ("run", ["-p", "--stats"]), ("demo", ["--quick"]), ("export", ["--quant"])]


# 3. docs/cli.md

def test_cli_reference_is_generated_from_help():
    cli_md = (DOCS / "cli.md").read_text()
    assert cli_md == clidoc.page(), "docs/cli.md is stale: python -m edgelora.clidoc --write docs/cli.md"


def test_every_command_is_in_the_reference():
    from edgelora.cli import main

    cli_md = (DOCS / "cli.md").read_text()
    assert [name for name in main.commands if f"$ edgelora {name} --help" not in cli_md] == []


# 4. figures live in benchmarks/README.md

HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,12}\b")
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
UNIT = r"(?:ms|s|sec|seconds?|min|minutes?|hours?|[KMG]i?B|tok/s|tokens/s)"
FIGURE = re.compile(rf"(?<![\w.])\d+(?:\.\d+)?\s?{UNIT}(?![\w/])"
                    r"|(?<![\w.])\d+(?:\.\d+)?x(?!\w)"
                    r"|(?<![\w.])\d+m\d+s\b")
SETTING = re.compile(r"\bdefault:?\s*$", re.I)
BENCHMARKS = "benchmarks/README.md"


def _figures(line: str) -> list[str]:
    return [m.group(0) for m in FIGURE.finditer(line) if not SETTING.search(line[:m.start()])]


def test_the_figure_heuristic():
    assert _figures("took 3m05s, 29 minutes, 17 s, 1.68x faster, 258.3 MiB at 45 tok/s") == [
        "3m05s", "29 minutes", "17 s", "1.68x", "258.3 MiB", "45 tok/s"]
    assert _figures("60 steps of 8 examples, 5% of steps, 2 x rank, q4_k_m, 4.5 bits/weight") == []
    assert _figures("within `--request-timeout` (default 30 s), (default 1 MiB)") == []
    assert HASH.findall("at commit d87f4ea, sha 03b5f4084e41; not decade, f16, 1024 or deadbeef") == [
        "d87f4ea", "03b5f4084e41"]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_commit_hashes_or_dates(page):
    text = page.read_text()
    assert HASH.findall(text) == [], f"{_rel(page)}: commit hashes belong in {BENCHMARKS} and CHANGELOG.md"
    assert DATE.findall(text) == [], f"{_rel(page)}: dated figures belong in {BENCHMARKS}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_figure_links_to_the_benchmarks(page):
    lines = _prose_lines(page.read_text())
    sections, current = [], []
    for n, line in lines:
        if line.startswith("#") and current:
            sections.append(current)
            current = []
        current.append((n, line))
    sections.append(current)
    raw = page.read_text().splitlines()
    unlinked = []
    for section in sections:
        if any(BENCHMARKS in raw[n - 1] for n, _ in section):
            continue
        unlinked += [f"{_rel(page)}:{n}: {fig}" for n, line in section for fig in _figures(line)]
    assert unlinked == [], f"measured figures in a section without a link to {BENCHMARKS}"


# 5. links

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in _outside_fences(page.read_text()) if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("page", LINKED, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for _, line in _prose_lines(page.read_text()):
        for target in LINK.findall(line):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target}: no heading with that anchor")
    assert broken == [], _rel(page)


# 6. the module map

def test_every_module_is_in_the_layout():
    """docs/layout.md names every module, so a newcomer finds each one there."""
    package = ROOT / "edgelora"
    modules = [p.name for p in [*package.glob("*.py"), *package.glob("bench/*.py")] if p.name != "__init__.py"]
    layout = (DOCS / "layout.md").read_text()
    assert [m for m in modules if f"`{m}`" not in layout] == []


# 7. a front door

def test_the_readme_is_short():
    assert len(README.splitlines()) <= 250, "the README is a front door: move detail to docs/"
