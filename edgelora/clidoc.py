"""docs/cli.md, the CLI reference, generated from the commands' own --help (tests/test_readme.py
checks that docs/cli.md holds exactly this text, so the two cannot drift).

    python -m edgelora.clidoc --write docs/cli.md    # regenerate the page
    python -m edgelora.clidoc                         # print it
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import click

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
WIDTH = 100
HEADER = ("# CLI reference\n\n"
          "Generated from each command's `--help` by `edgelora/clidoc.py`; do not edit by hand. "
          "Regenerate with\n`python -m edgelora.clidoc --write docs/cli.md` "
          "(`tests/test_readme.py` fails while this page is stale).\n")


def _context(cmd: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
    settings = {**cmd.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(cmd, info_name=name, parent=parent, **settings)


def render() -> str:
    """Markdown: `edgelora --help`, then each command's --help, in the group's order."""
    from .cli import main

    root = _context(main, "edgelora")
    parts = [START, "", "```text", "$ edgelora --help", main.get_help(root), "```"]
    for name in main.list_commands(root):
        cmd = main.get_command(root, name)
        parts += ["", "```text", f"$ edgelora {name} --help", cmd.get_help(_context(cmd, name, root)), "```"]
    return "\n".join(parts + ["", END])


def page() -> str:
    """The whole of docs/cli.md: a line saying it is generated and how to regenerate it, then the block."""
    return HEADER + "\n" + render() + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="FILE", help="write the page to FILE, docs/cli.md (else print it)")
    args = ap.parse_args(argv)
    if not args.write:
        sys.stdout.write(page())
        return
    path = Path(args.write)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page())


if __name__ == "__main__":
    main()
