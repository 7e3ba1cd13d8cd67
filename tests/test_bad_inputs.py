"""A catalogue of malformed inputs: each one goes through the real `digiq` CLI and must fail cleanly.

For every case: a non-zero exit code; exactly one line on stderr, ``error: …``, that names the offending
file and then the field (column, key or parameter; a truncated Parquet file has lost the footer that holds
its schema, so those cases ask for the word "truncated" instead), with no traceback; no output left behind (neither
the output the command was asked to write nor a ``.name.*.tmp`` sibling); and, for hostile pickles, no
sign that code from the file ran.

Valid inputs are built once (an imported official file, synthetic feature sources, a copy of the Feast
repository); each case copies what it needs into its own folder and breaks one thing.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from digiq.cli.main import app
from digiq.params_file import load_params
from digiq.importer import ImportOptions, import_official
from conftest import write_synthetic_sources
from fixtures_official import make_screenshots, official_trajectories, save_official, write_hostile

torch.set_num_threads(1)
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SHARD = Path("raw/steps/part-00000.parquet")  # the imported dataset's step table
SYNTHETIC_SHARD = Path("fs/raw/steps/synthetic.parquet")  # the feature sources' step table
EMBEDDINGS = Path("fs/embeddings/finetuned")
TRUNCATED = None  # a truncated Parquet file has lost its footer, which holds the schema: no field exists to name


@dataclasses.dataclass
class Case:
    args: list[str]  # the digiq command line
    file: str  # the offending file (path or name) the error line must name
    field: str | None  # the field it must name after the file (None: see TRUNCATED)
    outs: list[Path] = dataclasses.field(default_factory=list)  # outputs the command was asked to write: none may exist afterwards
    says: str = ""  # more text the line must hold
    marker: Path | None = None  # created only if code from the input ran


# --------------------------------------------------------------------------- valid inputs, built once


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/ + official.pt, raw/ (its import: screenshots, candidates.parquet), fs/ (feature sources), features/."""
    root = tmp_path_factory.mktemp("base")
    make_screenshots(root / "images", 12)
    save_official(_official(root), root / "official.pt")
    import_official(root / "official.pt", root / "images", root / "raw", ImportOptions())
    write_synthetic_sources(root / "fs", n_states=6, k=2, dim=4)
    shutil.copytree(REPO / "features", root / "features", ignore=shutil.ignore_patterns("data", "__pycache__"))
    return root


def _shots(root: Path) -> list[Path]:
    return sorted((root / "images").glob("*.png"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))


def _official(root: Path) -> list[list[dict[str, Any]]]:
    """Two official-format trajectories of 3 and 2 steps (image features [8], K = 3 candidates, q_rep_out [4])."""
    return official_trajectories(_shots(root), 2, lengths=[3, 2], image_dim=8, candidates=3, rep_dim=4)


def _copy(base: Path, tmp: Path, *names: str) -> None:
    for name in names:
        (shutil.copytree if (base / name).is_dir() else shutil.copy)(base / name, tmp / name)


# --------------------------------------------------------------------------- ways to break a file


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_middle(path: Path) -> None:
    """Overwrite the middle third with garbage (a PNG keeps its header; its chunk CRCs no longer match)."""
    data = bytearray(path.read_bytes())
    third = len(data) // 3
    data[third : 2 * third] = b"\xff" * third
    path.write_bytes(bytes(data))


def _garble_column(path: Path, column: str) -> None:
    """Overwrite the pages of one column (every row group) with garbage; the footer stays intact."""
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            if chunk.path_in_schema.split(".")[0] == column:
                start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))


def _set_value(path: Path, column: str, row: int, value: Any) -> None:
    """Rewrite a Parquet file with one cell changed (same types)."""
    table = pq.read_table(path)
    values = table[column].to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(values, table.schema.field(index).type)), path)


def _step_values(path: Path, row: int, **values: Any) -> None:
    for column, value in values.items():
        _set_value(path, column, row, value)


def _first_screenshot(tmp: Path) -> Path:
    return tmp / "raw" / pq.read_table(tmp / SHARD, columns=["screenshot"])["screenshot"][0].as_py()


def _official_shot(tmp: Path, trajectories: list[list[dict[str, Any]]], t: int = 0, s: int = 0) -> Path:
    """The file under tmp/images/ that step s of trajectory t names as its screenshot."""
    return tmp / "images" / trajectories[t][s]["image_path"].rsplit("/", 1)[1]


# --------------------------------------------------------------------------- commands


def _label(tmp: Path) -> tuple[list[str], list[Path]]:
    (tmp / "label.yaml").write_text("label:\n  yes_band: [0.0, 1.0]\n")  # no balance gate in the way
    outs = [tmp / "labels.parquet", tmp / "label.json", tmp / "checks", tmp / "plots"]
    args = ["label", "-S", f"collect.out={tmp / 'raw'}", "--out", str(outs[0]), "-S", f"label.metrics={outs[1]}",
            "-S", f"label.checks={outs[2]}", "-S", f"label.plots={outs[3]}", "--params", str(tmp / "label.yaml")]
    return args, outs


def _candidates(tmp: Path, params: Path | None = None) -> tuple[list[str], list[Path]]:
    outs = [tmp / "candidates.parquet", tmp / "metrics", tmp / "data"]  # metrics/ and data/checks/: the params defaults
    return ["candidates", "-S", f"collect.out={tmp / 'raw'}", "--out", str(outs[0]), "--params", str(params or tmp / "none.yaml")], outs


def _feature_sources(tmp: Path) -> list[str]:
    """-S overrides pointing the feature store at the synthetic sources fs/ and the repository features/."""
    fs = tmp / "fs"
    return [f"features.repo={tmp / 'features'}", f"features.embeddings={fs / 'embeddings'}", f"features.derived={tmp / 'derived'}",
            f"collect.out={fs / 'raw'}", f"label.out={fs / 'labels.parquet'}", f"candidates.out={fs / 'candidates.parquet'}"]


def _materialize(tmp: Path) -> tuple[list[str], list[Path]]:
    outs = [tmp / "features.json", tmp / "features" / "data", tmp / "derived"]
    sets = [arg for override in [*_feature_sources(tmp), f"features.metrics={outs[0]}"] for arg in ("-S", override)]
    return ["features", "materialize", *sets, "--params", str(tmp / "none.yaml")], outs


def _import(tmp: Path, source: Path) -> tuple[list[str], list[Path]]:
    out = tmp / "imported"
    return ["import-digiq", str(source), "--images", str(tmp / "images"), "--out", str(out), "--params", str(tmp / "none.yaml")], [out]


def _label_case(base: Path, tmp: Path, file: Callable[[Path], Path], damage: Callable[[Path], None], field: str | None, says: str = "") -> Case:
    _copy(base, tmp, "raw")
    path = file(tmp)
    damage(path)
    args, outs = _label(tmp)
    return Case(args, str(path), field, outs, says)


def _materialize_case(base: Path, tmp: Path, file: Path, damage: Callable[[Path], None], field: str | None, says: str = "") -> Case:
    _copy(base, tmp, "fs", "features")
    damage(tmp / file)
    args, outs = _materialize(tmp)
    return Case(args, file.name, field, outs, says)


def _official_case(base: Path, tmp: Path, edit: Callable[[list[list[dict[str, Any]]]], None], field: str, says: str = "") -> Case:
    _copy(base, tmp, "images")
    trajectories = _official(base)
    edit(trajectories)
    source = save_official(trajectories, tmp / "digiq.pt")
    args, outs = _import(tmp, source)
    return Case(args, source.name, field, outs, says)


def _hostile_case(base: Path, tmp: Path, name: str, how: str) -> Case:
    _copy(base, tmp, "images")
    marker = tmp / "code-ran"
    source = write_hostile(tmp / name, marker, how)  # type: ignore[arg-type]
    args, outs = _import(tmp, source)
    return Case(args, source.name, "pickle", outs, "nothing from the file was executed", marker=marker)


# --------------------------------------------------------------------------- the catalogue: step tables


def shard_corrupt_column(base: Path, tmp: Path) -> Case:
    return _label_case(base, tmp, lambda t: t / SHARD, lambda p: _garble_column(p, "screenshot"), "screenshot")


def shard_truncated(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    _truncate(tmp / SHARD)
    args, outs = _candidates(tmp)
    return Case(args, SHARD.name, TRUNCATED, outs, "truncated")


def shard_missing_column(base: Path, tmp: Path) -> Case:
    def drop(path: Path) -> None:
        pq.write_table(pq.read_table(path).drop_columns(["action"]), path)

    return _label_case(base, tmp, lambda t: t / SHARD, drop, "action", "missing column")


def shard_null_reward(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    _set_value(tmp / SHARD, "reward", 1, None)
    args, outs = _candidates(tmp)
    return Case(args, SHARD.name, "reward", outs)


def shard_nan_reward(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, SYNTHETIC_SHARD, lambda p: _set_value(p, "reward", 0, math.nan), "reward")


def shard_inf_mc_return(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, SYNTHETIC_SHARD, lambda p: _set_value(p, "mc_return", 2, -math.inf), "mc_return")


def shard_unknown_action_type(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    action = pq.read_table(tmp / SHARD)["action"][1].as_py()
    bad = action.replace('"action_type": "', '"action_type": "CLICK_', 1)
    _step_values(tmp / SHARD, 1, action=bad)
    return Case(["data", "show", str(tmp / "raw"), "--traj", "000000"], SHARD.name, "action", [], 'unknown action_type "CLICK_')


def shard_out_of_range_tap(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    _step_values(tmp / SHARD, 0, action='"action_type": "DUAL_POINT", "touch_point": "[1.5000, 0.2000]", '
                 '"lift_point": "[1.5000, 0.2000]", "typed_text": ""', action_type="DUAL_POINT", action_kind="tap",
                 touch_y=1.5, touch_x=0.2, lift_y=1.5, lift_x=0.2, typed_text="")
    args, outs = _candidates(tmp)
    return Case(args, SHARD.name, "action", outs, "outside [0, 1]")


def manifest_wrong_schema_version(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    manifest = tmp / "raw" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "schema_version": 99}))
    args, outs = _label(tmp)
    return Case(args, "manifest.json", "schema_version", outs)


# --------------------------------------------------------------------------- screenshots


def _rehashed(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage a screenshot and record the damaged bytes' sha256 in the step table (a writer that stored a broken
    PNG): only decoding can notice."""
    def damage_and_rehash(path: Path) -> None:
        old = hashlib.sha256(path.read_bytes()).hexdigest()
        damage(path)
        new = hashlib.sha256(path.read_bytes()).hexdigest()
        shard = path.parents[2] / SHARD.relative_to("raw")
        table = pq.read_table(shard)
        for column in ("screenshot_sha256", "next_screenshot_sha256"):
            index = table.schema.get_field_index(column)
            values = [new if value == old else value for value in table[column].to_pylist()]
            table = table.set_column(index, table.schema.field(index), pa.array(values, pa.string()))
        pq.write_table(table, shard)

    return damage_and_rehash


def png_corrupt(base: Path, tmp: Path) -> Case:
    return _label_case(base, tmp, _first_screenshot, _rehashed(_garble_middle), "screenshot", "not a readable PNG")


def png_truncated(base: Path, tmp: Path) -> Case:
    return _label_case(base, tmp, _first_screenshot, _rehashed(_truncate), "screenshot", "not a readable PNG")


def png_corrupt_hash_mismatch(base: Path, tmp: Path) -> Case:
    return _label_case(base, tmp, _first_screenshot, _garble_middle, "screenshot_sha256", "does not match its sha256")


def png_missing(base: Path, tmp: Path) -> Case:
    return _label_case(base, tmp, _first_screenshot, Path.unlink, "screenshot", "missing")


def png_replaced(base: Path, tmp: Path) -> Case:
    """A valid PNG, but not the one the step table's sha256 names."""
    def replace(path: Path) -> None:
        make_screenshots(tmp / "other", 1, seed=9)[0].replace(path)

    return _label_case(base, tmp, _first_screenshot, replace, "screenshot_sha256", "does not match its sha256")


# --------------------------------------------------------------------------- the candidate table of a dataset


def candidates_corrupt_column(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    _garble_column(tmp / "raw" / "candidates.parquet", "action")
    args, outs = _candidates(tmp)
    return Case(args, "candidates.parquet", "action", outs)


def candidates_truncated(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    _truncate(tmp / "raw" / "candidates.parquet")
    args, outs = _candidates(tmp)
    return Case(args, "candidates.parquet", TRUNCATED, outs, "truncated")


def candidates_unknown_action_type(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    path = tmp / "raw" / "candidates.parquet"
    action = pq.read_table(path)["action"][1].as_py()
    _set_value(path, "action", 1, action.replace('"action_type": "', '"action_type": "SWIPE_', 1))
    args, outs = _candidates(tmp)
    return Case(args, "candidates.parquet", "action", outs, 'unknown action_type "SWIPE_')


# --------------------------------------------------------------------------- feature sources: labels and embeddings


def labels_corrupt_column(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, Path("fs/labels.parquet"), lambda p: _garble_column(p, "mse"), "mse")


def labels_truncated(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, Path("fs/labels.parquet"), _truncate, TRUNCATED, "truncated")


def states_corrupt_column(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, EMBEDDINGS / "states.parquet", lambda p: _garble_column(p, "embedding"), "embedding")


def states_truncated(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, EMBEDDINGS / "states.parquet", _truncate, TRUNCATED, "truncated")


def embedded_candidates_corrupt_column(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, EMBEDDINGS / "candidates.parquet", lambda p: _garble_column(p, "embedding"), "embedding")


def embedded_candidates_truncated(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, EMBEDDINGS / "candidates.parquet", _truncate, TRUNCATED, "truncated")


def _resize_embeddings(path: Path, dim: int) -> None:
    table = pq.read_table(path)
    rows = np.asarray(table["embedding"].combine_chunks().flatten()).reshape(table.num_rows, -1)
    resized = np.resize(rows, (table.num_rows, dim)).astype(np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(resized.reshape(-1)), dim)
    pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), path)


def embedding_dimension_mismatch(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, EMBEDDINGS / "candidates.parquet", lambda p: _resize_embeddings(p, 3), "embedding",
                             "differs from the 4 that embedding.json records")


def embedding_nan(base: Path, tmp: Path) -> Case:
    def poison(path: Path) -> None:
        table = pq.read_table(path)
        values = np.asarray(table["embedding"].combine_chunks().flatten()).copy()
        values[5] = np.nan
        column = pa.FixedSizeListArray.from_arrays(pa.array(values), table["embedding"].type.list_size)
        pq.write_table(table.set_column(table.schema.get_field_index("embedding"), "embedding", column), path)

    return _materialize_case(base, tmp, EMBEDDINGS / "states.parquet", poison, "embedding", "NaN")


def feature_repo_missing_definitions(base: Path, tmp: Path) -> Case:
    return _materialize_case(base, tmp, Path("features/digiq_feature_repo.py"), Path.unlink, "features.repo")


def feature_store_source_missing(base: Path, tmp: Path) -> Case:
    """A materialized feature repository whose registered states table has since been deleted."""
    _copy(base, tmp, "fs", "features")
    from digiq.pipelines import features as stage

    stage.run(load_params(tmp / "none.yaml", [*_feature_sources(tmp), f"features.metrics={tmp / 'features.json'}"]))
    states = tmp / EMBEDDINGS / "states.parquet"
    states.unlink()
    out = tmp / "critic"
    overrides = [*_feature_sources(tmp), "critic.updates=2", f"critic.metrics={tmp / 'critic.json'}", f"critic.live_dir={tmp / 'live'}"]
    args = ["critic", *[arg for override in overrides for arg in ("-S", override)], "--out", str(out), "--params", str(tmp / "none.yaml")]
    return Case(args, str(states), "features.embeddings", [out, tmp / "critic.json", tmp / "live"], "missing")


# --------------------------------------------------------------------------- official files


def official_png_missing(base: Path, tmp: Path) -> Case:
    case = _official_case(base, tmp, lambda t: None, "image_path", "not found")
    _official_shot(tmp, _official(base)).unlink()
    return case


def official_png_corrupt(base: Path, tmp: Path) -> Case:
    case = _official_case(base, tmp, lambda t: None, "image_path", "not a readable image")
    _garble_middle(_official_shot(tmp, _official(base)))
    return case


def official_png_truncated(base: Path, tmp: Path) -> Case:
    case = _official_case(base, tmp, lambda t: None, "image_path", "not a readable image")
    _truncate(_official_shot(tmp, _official(base)))
    return case


def official_nan_reward(base: Path, tmp: Path) -> Case:
    return _official_case(base, tmp, lambda t: t[0][1].update(reward=np.float64("nan")), "reward", "not a finite number")


def official_inf_reward(base: Path, tmp: Path) -> Case:
    return _official_case(base, tmp, lambda t: t[1][0].update(reward=float("inf")), "reward", "not a finite number")


def official_unknown_action_type(base: Path, tmp: Path) -> Case:
    def edit(trajectories: list[list[dict[str, Any]]]) -> None:
        step = trajectories[0][1]
        step["action"] = step["action"].replace('"action_type": "', '"action_type": "LONG_PRESS_', 1)
        step.pop("action_list")  # candidate 0 must equal the action: the action itself is what is checked here
        step.pop("q_rep_out_list")

    return _official_case(base, tmp, edit, "action", 'unknown action_type "LONG_PRESS_')


def official_out_of_range_coordinates(base: Path, tmp: Path) -> Case:
    def edit(trajectories: list[list[dict[str, Any]]]) -> None:
        step = trajectories[1][0]
        step["action"] = ('Action Plan: [DUAL_POINT] ; Action Decision: "action_type": "DUAL_POINT", '
                          '"touch_point": "[0.5000, -0.2000]", "lift_point": "[0.5000, -0.2000]", "typed_text": ""')

    return _official_case(base, tmp, edit, "action", "outside [0, 1]")


def official_bad_candidate(base: Path, tmp: Path) -> Case:
    def edit(trajectories: list[list[dict[str, Any]]]) -> None:
        step = trajectories[0][0]
        candidates = step["action_list"].split("<split>")
        candidates[2] = "tap the big button"
        step["action_list"] = "<split>".join(candidates)

    return _official_case(base, tmp, edit, "action_list[2]", "malformed action decision")


def official_wrong_embedding_dimension(base: Path, tmp: Path) -> Case:
    def edit(trajectories: list[list[dict[str, Any]]]) -> None:  # one screenshot's features, where they appear: s' of step 1, s of step 2
        trajectories[0][1]["next_image_features"] = trajectories[0][2]["image_features"] = np.zeros(7, dtype=np.float32)

    return _official_case(base, tmp, edit, "next_image_features", "shape [7] differs from [8]")


def official_wrong_candidate_representations(base: Path, tmp: Path) -> Case:
    def edit(trajectories: list[list[dict[str, Any]]]) -> None:
        trajectories[1][1]["q_rep_out_list"] = np.zeros((2, 4), dtype=np.float32)  # 3 candidates, 2 rows

    return _official_case(base, tmp, edit, "q_rep_out_list", "one row per candidate")


def official_nan_features(base: Path, tmp: Path) -> Case:
    def edit(trajectories: list[list[dict[str, Any]]]) -> None:
        trajectories[0][0]["next_image_features"][3] = np.inf

    return _official_case(base, tmp, edit, "next_image_features", "NaN or infinite")


def official_extra_objects(base: Path, tmp: Path) -> Case:
    """The trajectory list carries run metadata after the trajectories."""
    return _official_case(base, tmp, lambda t: t.append({"run": "digiq", "epoch": 3}), "trajectory", "expected a list of step dicts")


def official_extra_unlisted_object(base: Path, tmp: Path) -> Case:
    """A step carries an extra object whose class is not on the allow-list (harmless here, refused all the same)."""
    from datetime import datetime

    return _official_case(base, tmp, lambda t: t[0][1].update(saved_at=datetime(2024, 6, 1)), "pickle", "datetime.datetime")


def pickle_runs_os_system(base: Path, tmp: Path) -> Case:
    return _hostile_case(base, tmp, "digiq.pt", "os.system")


def pickle_hidden_in_a_step(base: Path, tmp: Path) -> Case:
    return _hostile_case(base, tmp, "digiq.pt", "hidden-in-step")


def pickle_raw_exec_pkl(base: Path, tmp: Path) -> Case:
    return _hostile_case(base, tmp, "digiq.pkl", "raw-pickle")


# --------------------------------------------------------------------------- params.yaml


def params_typo(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    args, outs = _label(tmp)
    (tmp / "label.yaml").write_text("label:\n  epsilonn: 20\n")
    return Case(args, "label.yaml", "label.epsilonn", outs, "did you mean 'epsilon'")


def params_wrong_type(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "raw")
    (tmp / "params.yaml").write_text("candidates:\n  k: many\n")
    args, outs = _candidates(tmp, tmp / "params.yaml")
    return Case(args, "params.yaml", "candidates.k", outs, "'many'")


def params_not_yaml(base: Path, tmp: Path) -> Case:
    _copy(base, tmp, "fs", "features")
    args, outs = _materialize(tmp)
    (tmp / "none.yaml").write_text("features: [repo: features\n")
    return Case(args, "none.yaml", "line 2", outs, "invalid YAML")


CASES: list[Callable[[Path, Path], Case]] = [
    shard_corrupt_column, shard_truncated, shard_missing_column, shard_null_reward, shard_nan_reward, shard_inf_mc_return,
    shard_unknown_action_type, shard_out_of_range_tap, manifest_wrong_schema_version,
    png_corrupt, png_truncated, png_corrupt_hash_mismatch, png_missing, png_replaced,
    candidates_corrupt_column, candidates_truncated, candidates_unknown_action_type,
    labels_corrupt_column, labels_truncated, states_corrupt_column, states_truncated,
    embedded_candidates_corrupt_column, embedded_candidates_truncated, embedding_dimension_mismatch, embedding_nan,
    feature_repo_missing_definitions, feature_store_source_missing,
    official_png_missing, official_png_corrupt, official_png_truncated, official_nan_reward, official_inf_reward,
    official_unknown_action_type, official_out_of_range_coordinates, official_bad_candidate,
    official_wrong_embedding_dimension, official_wrong_candidate_representations, official_nan_features,
    official_extra_objects, official_extra_unlisted_object,
    pickle_runs_os_system, pickle_hidden_in_a_step, pickle_raw_exec_pkl,
    params_typo, params_wrong_type, params_not_yaml,
]


def test_the_catalogue_is_complete():
    assert len(CASES) >= 32 and len({c.__name__ for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_fails_with_one_line_naming_file_and_field(build: Callable[[Path, Path], Case], base: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # default outputs (metrics/, data/checks/) land here, never in the repository
    case = build(base, tmp_path)
    result = runner.invoke(app, case.args)

    assert result.exit_code != 0, f"accepted:\n{result.output}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # a traceback, not one line
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    line = lines[0]
    assert "Traceback" not in result.output
    assert case.file in line, f"the line does not name {case.file}: {line}"
    if case.field is not None:  # "file: field: message", the field part possibly "trajectory 0, step 1, reward"
        located = line.split(case.file, 1)[1].removeprefix(": ").split(": ", 1)[0]
        assert case.field in [part.strip() for part in located.split(",")], f"the line does not name the field {case.field}: {line}"
    assert case.says in line, line

    for out in case.outs:
        assert not out.exists(), f"{out} was left behind"
        assert not list(out.parent.glob(f".{out.name}.*tmp")), f"a temporary sibling of {out} was left behind"
    if case.marker is not None:
        assert not case.marker.exists(), "code from the file ran"
