"""CLI conventions: help works, heavy libraries are not imported to build it, errors are one line."""

import subprocess
import sys

import pytest
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


@pytest.mark.parametrize("command", [["model", "build"], ["finetune"], ["embed"]], ids=" ".join)
def test_stage_commands_take_params_overrides_and_the_everyday_flags(command, tmp_path):
    """Settings come from --params and -S; the help does not restate them, and a wrong key is one line."""
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert all(flag in result.output for flag in ("--params", "-S", "--out")) and "[params:" not in result.output
    bad = CliRunner().invoke(app, [*command, "--params", str(tmp_path / "none.yaml"), "-S", "finetune.epoch=3"])
    assert bad.exit_code == 2 and "did you mean 'epochs'?" in bad.output and "Traceback" not in bad.output
