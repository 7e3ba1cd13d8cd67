"""The library's import boundaries (docs/pipeline.md, "Development"): dependencies point cli -> pipelines -> digiq,
never back, and Feast is reached through one store-client module only. Imports inside functions count too."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIBRARY = sorted((REPO / "digiq").rglob("*.py"))
STAGES = sorted((REPO / "pipelines").glob("*.py"))
STORE_CLIENT = REPO / "digiq" / "store_client.py"


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(REPO)))
def test_library_modules_import_neither_stages_nor_cli_nor_dvc(path):
    bad = {name for name in imported_modules(path)
           if any(_under(name, package) for package in ("digiq.pipelines", "digiq.cli", "dvc", "dvclive"))}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_only_the_store_client_imports_feast():
    importers = [str(path.relative_to(REPO)) for path in [*LIBRARY, *STAGES, *sorted((REPO / "cli").glob("*.py"))]
                 if any(_under(name, "feast") for name in imported_modules(path))]
    assert importers == [str(STORE_CLIENT.relative_to(REPO))]


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_no_stage_imports_another_stage(path):
    others = {name for name in imported_modules(path) if _under(name, "digiq.pipelines")}
    assert not others, f"{path.name} imports {sorted(others)}"


def test_the_import_checker_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from digiq.pipelines import critic\n    import feast.types\n")
    assert {"os", "digiq.pipelines", "digiq.pipelines.critic", "feast.types"} <= imported_modules(module)


@pytest.mark.parametrize("path", [*LIBRARY, *sorted((REPO / "cli").glob("*.py"))], ids=lambda p: str(p.relative_to(REPO)))
def test_modules_stay_readable(path):
    assert len(path.read_text().splitlines()) <= 450, "split it along a real seam"


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stages_are_thin(path):
    assert len(path.read_text().splitlines()) <= 150, "a stage reads params, calls the library and writes outputs"
