"""CLI conventions: help works, heavy libraries are not imported to build it, errors are one line."""

import subprocess
import sys

from typer.testing import CliRunner

from digiq.cli.main import app

HEAVY = ("torch", "transformers", "feast", "great_expectations", "selenium", "peft", "duckdb")


def test_help_lists_commands():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "data" in result.output


def test_help_imports_no_heavy_library():
    code = (
        "import sys; from typer.testing import CliRunner; from digiq.cli.main import app; "
        "CliRunner().invoke(app, ['--help']); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"`digiq --help` imported heavy modules: {out}"


def test_help_offers_shell_completion():
    result = CliRunner().invoke(app, ["--help"])
    assert "--install-completion" in result.output and "--show-completion" in result.output


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("digiq ")
