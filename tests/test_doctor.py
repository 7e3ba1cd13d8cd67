"""`digiq doctor`: every problem is reported with what to do, and a failing check makes the exit code 1."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from digiq.cli.main import app


def doctor(tmp_path, *args: str, env: dict[str, str] | None = None):
    result = CliRunner().invoke(app, ["doctor", "--no-browser", "--json", "--root", str(tmp_path),
                                      "--params", str(tmp_path / "params.yaml"), *args], env=env)
    return result.exit_code, {f["name"]: f for f in json.loads(result.stdout)}


def test_a_typo_in_params_fails_with_a_hint_and_outside_a_dvc_project_dvc_fails(tmp_path):
    (tmp_path / "params.yaml").write_text("critic:\n  updatez: 10\n")
    code, found = doctor(tmp_path)
    assert code == 1
    assert found["params"]["status"] == "fail" and "did you mean 'updates'" in found["params"]["detail"]
    assert "critic.updatez" in found["params"]["detail"] and found["params"]["fix"]
    assert found["dvc"]["status"] == "fail" and found["dvc"]["fix"]
    assert found["feature store"]["status"] == "warn" and "digiq features materialize" in found["feature store"]["detail"]
    assert found["python"]["status"] in ("ok", "warn") and found["disk"]["status"] in ("ok", "warn")


def test_a_missing_chromedriver_is_a_failure_naming_the_path(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    code, found = doctor(tmp_path, env={"MINIWOB_CHROMEDRIVER": str(tmp_path / "no-driver")})
    assert code == 1
    assert found["chromium"]["status"] == "fail" and str(tmp_path / "no-driver") in found["chromium"]["detail"]
    assert "make setup" in found["chromium"]["fix"]
    assert found["params"]["status"] == "ok"
