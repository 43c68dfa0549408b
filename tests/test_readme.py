"""The README stays true: its CLI reference is the commands' --help, its set-up commands are the two CI uses."""
import re
from pathlib import Path

from edgelora import clidoc

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_cli_reference_is_generated_from_help():
    cli_md = (ROOT / "docs" / "cli.md").read_text()
    assert cli_md == clidoc.page(), "docs/cli.md is stale: python -m edgelora.clidoc --write docs/cli.md"


def test_every_command_is_in_the_reference():
    from edgelora.cli import main

    cli_md = (ROOT / "docs" / "cli.md").read_text()
    for name in main.commands:
        assert f"$ edgelora {name} --help" in cli_md


def test_exactly_two_setup_commands_and_ci_runs_the_second():
    setup = [line for line in README.splitlines() if line.startswith("bash .ci/setup")]
    assert setup == ["bash .ci/setup && .venv/bin/edgelora demo",
                     "bash .ci/setup && .venv/bin/python -m pytest -q -rs"]
    assert setup[1] in (ROOT / ".ci" / "run").read_text()


def test_every_module_is_in_the_layout():
    """The README's module map names every module, so a newcomer finds each one there."""
    package = ROOT / "edgelora"
    modules = [p.name for p in [*package.glob("*.py"), *package.glob("bench/*.py")] if p.name != "__init__.py"]
    layout = README[README.index("## Layout"):README.index("## CLI reference")]
    assert [m for m in modules if f"`{m}`" not in layout] == []
