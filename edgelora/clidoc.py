"""The README's CLI reference, generated from the commands' own --help (tests/test_readme.py
checks that the README holds exactly this text, so the two cannot drift).

    python -m edgelora.clidoc --write README.md    # regenerate the block in place
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import click

START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"
WIDTH = 100


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


def replace_block(text: str, block: str) -> str:
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"no {START} ... {END} block found")
    return pattern.sub(lambda _: block, text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", metavar="README", help="replace the block in this file (else print it)")
    args = ap.parse_args(argv)
    if not args.write:
        sys.stdout.write(render() + "\n")
        return
    path = Path(args.write)
    path.write_text(replace_block(path.read_text(), render()))


if __name__ == "__main__":
    main()
