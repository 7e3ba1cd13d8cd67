"""The Feast feature store, for real: DuckDB offline store, SQLite online store, `feast` CLI, `feast serve`.

One synthetic project (the embed/label/collect contracts exactly, random vectors) is materialized
once per module through the CLI; the tests read it back and compare with the source tables.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import copy_feature_repo, project_params, write_params, write_synthetic_sources
from digiq import feature_contract as fc
from digiq import feature_sources as sources
from digiq import store_client as client
from digiq.cli.features import app
from digiq.errors import DigiqError

ROOT = Path(__file__).resolve().parents[1]
FEATURE_REPO = ROOT / "features"
N_STATES, K, DIM = 40, 64, 8
FEAST = str(Path(sys.executable).with_name("feast"))


def _materialize_args(project: Path, text: str = "") -> list[str]:
    """`digiq features materialize` of ``project`` (its paths and ``text`` in its params.yaml)."""
    return ["materialize", "--params", str(write_params(project, text))]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder (features/ copied from the repo, data/ synthetic) materialized by `digiq features materialize`."""
    project = tmp_path_factory.mktemp("project")
    copy_feature_repo(project)
    write_synthetic_sources(project / "data", n_states=N_STATES, k=K, dim=DIM, seed=3)
    result = CliRunner().invoke(app, _materialize_args(project))
    assert result.exit_code == 0, result.output
    return project


@pytest.fixture(scope="module")
def store(project):
    return client.open_store(project / "features", "finetuned")


def _sources(project: Path) -> dict[str, pd.DataFrame]:
    data = project / "data"
    return {
        "states": pq.read_table(data / "embeddings" / "finetuned" / "states.parquet").to_pandas().set_index("state_key"),
        "candidates": pq.read_table(data / "embeddings" / "finetuned" / "candidates.parquet").to_pandas().set_index("cand_key"),
    }


# ----------------------------------------------------------------------------- stage output

def test_materialize_writes_metrics_and_runtime_state(project):
    metrics = json.loads((project / "metrics" / "features.json").read_text())
    n_labels = pq.read_metadata(project / "data" / "labels.parquet").num_rows
    assert metrics["rows"] == {"state_embedding": N_STATES, "candidate_embedding": N_STATES * K, "candidate_block": N_STATES,
                               "transition": N_STATES, "eps_label": n_labels}
    assert metrics["dim"] == DIM and metrics["candidates_per_state"] == {"min": K, "max": K}
    assert metrics["models"] == [{"model_hash": "synthetic0", "layer": 4}]
    assert set(metrics["timings_s"]) >= {"apply", "materialize_candidate_block", "total"}
    assert "materialize_candidate_embedding" not in metrics["timings_s"]  # offline only: served online by candidate_block
    state_dir = project / "features" / "data" / "finetuned"
    assert {p.name for p in state_dir.iterdir()} == {"registry.db", "online_store.db", "sources.json", "feature_store.yaml"}
    applied = json.loads((state_dir / "sources.json").read_text())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in applied.values())
    assert applied == fc.source_paths(project / "data" / "embeddings", project / "data" / "features", "finetuned")
    assert {p.name for p in (project / "data" / "features" / "finetuned").iterdir()} == {f"{name}.parquet" for name in fc.DERIVED}


def test_state_and_action_features_of_different_sizes(tmp_path):
    """no_vlm's f(s) and f(s, a) differ in size (384 and 795 on the default data); a table whose size is not the
    one its embedding run recorded is refused."""
    project = tmp_path / "p"
    copy_feature_repo(project)
    paths = write_synthetic_sources(project / "data", n_states=12, k=4, dim=DIM, dim_candidate=DIM + 5, seed=1)
    result = CliRunner().invoke(app, _materialize_args(project))
    assert result.exit_code == 0, result.output
    assert json.loads((project / "metrics" / "features.json").read_text())["dim_candidate"] == DIM + 5
    frame = client.training_frame(client.open_store(project / "features", "finetuned"))
    assert frame.state.shape[1] == frame.next_state.shape[1] == DIM
    assert frame.candidates.shape[2] == frame.action.shape[1] == DIM + 5
    manifest = paths["states"].parent / "embedding.json"
    manifest.write_text(json.dumps({"dim_state": DIM, "dim_candidate": DIM}))
    with pytest.raises(DigiqError, match=f"embedding size {DIM + 5} differs from the {DIM} that embedding.json records"):
        sources.check_and_derive(sources.FeatureInputs.from_params(project_params(project)))


def test_an_unreadable_embedding_manifest_is_one_error_naming_it(tmp_path):
    states, candidates = tmp_path / "states.parquet", tmp_path / "candidates.parquet"
    sources.check_recorded_dims(states, candidates, 4, 7)  # no manifest: any sizes
    for text in ("{not json", json.dumps({"dim_state": 4})):
        (tmp_path / "embedding.json").write_text(text)
        with pytest.raises(DigiqError, match="re-run `digiq embed`") as err:
            sources.check_recorded_dims(states, candidates, 4, 7)
        assert err.value.file == str(tmp_path / "embedding.json") and err.value.field == "dim_state"


def test_committed_repo_has_no_absolute_paths():
    for path in FEATURE_REPO.iterdir():
        if path.is_file():
            text = path.read_text()
            assert not re.search(r"""["'\s:](/(work|tmp|home|root|Users)/)""", text), f"absolute path committed in {path}"
    assert (FEATURE_REPO / ".feastignore").read_text().count("data/") == 1


# ----------------------------------------------------------------------------- online store

def test_online_state_and_its_64_candidates_equal_the_sources(project, store):
    src = _sources(project)
    key = "traj00002/0"
    traj, step = key.split("/")
    row = client.online_state(store, traj, int(step), candidates=True)
    np.testing.assert_array_equal(row["embedding"], src["states"].loc[key, "embedding"])
    assert row["embedding"].dtype == np.float32
    cand_keys = [f"{key}/{k}" for k in range(K)]
    expected = np.stack(src["candidates"].loc[cand_keys, "embedding"].to_list())
    assert row["candidates"]["embedding"].shape == (K, DIM)
    assert np.array_equal(row["candidates"]["embedding"], expected)  # bit-exact float32
    assert row["candidates"]["action"] == src["candidates"].loc[cand_keys, "action"].to_list()
    assert row["candidates"]["cand_idx"] == list(range(K))
    steps = duckdb.sql(f"SELECT * FROM read_parquet('{project}/data/raw/steps/*.parquet') WHERE traj_id = ? AND step_id = ?",
                       params=[traj, int(step)]).df().iloc[0]
    assert (row["reward"], row["done"], row["mc_return"], row["action"]) == (steps.reward, steps.done, steps.mc_return, steps.action)
    assert row["candidates"]["action"][0] == steps.action
    table = pq.read_table(project / "data" / "candidates.parquet").to_pandas().set_index(["traj_id", "step_id"]).loc[(traj, int(step))]
    assert row["candidates"]["semantic_key"] == table["semantic_key"].to_list()  # the candidates stage's classes
    assert row["candidates"]["draws"] == table["draws"].to_list() and sum(row["candidates"]["draws"]) == K


def test_online_unknown_state_is_one_clear_error(project, store):
    with pytest.raises(DigiqError, match="no features online for state 'nope/0'"):
        client.online_state(store, "nope", 0)
    result = CliRunner().invoke(app, ["get", "--traj", "t", "--step", "0", "--variant", "absent", "-S", f"features.repo={project / 'features'}"])
    assert result.exit_code == 2
    assert "features materialize --variant absent" in result.output and "registry.db" in result.output


def test_cli_get_json_is_the_online_row(project):
    result = CliRunner().invoke(app, ["get", "--traj", "traj00001", "--step", "0", "--candidates", "--json",
                                      "--params", str(project / "params.yaml")])
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)
    src = _sources(project)
    assert np.array_equal(np.asarray(row["embedding"], dtype=np.float32), src["states"].loc["traj00001/0", "embedding"])
    assert len(row["candidates"]["embedding"]) == K


# ----------------------------------------------------------------------------- offline store: training sets

def _direct_join(project: Path) -> pd.DataFrame:
    """The same training rows straight from the source tables with DuckDB (no Feast, no derived tables)."""
    data = project / "data"
    return duckdb.sql(f"""
        WITH steps AS (SELECT * FROM read_parquet('{data}/raw/steps/*.parquet')),
             st AS (SELECT * FROM read_parquet('{data}/embeddings/finetuned/states.parquet')),
             ca AS (SELECT state_key, list(embedding ORDER BY cand_idx) AS cands, list(action ORDER BY cand_idx) AS actions
                    FROM read_parquet('{data}/embeddings/finetuned/candidates.parquet') GROUP BY state_key),
             lb AS (SELECT * FROM read_parquet('{data}/labels.parquet'))
        SELECT s.traj_id || '/' || s.step_id AS state_key, st.embedding AS state, nx.embedding AS next_state,
               s.reward, s.done, s.mc_return, ca.cands, ca.actions, lb.label
        FROM steps s
        JOIN st ON st.traj_id = s.traj_id AND st.step_id = s.step_id
        LEFT JOIN st nx ON NOT s.done AND nx.traj_id = s.traj_id AND nx.step_id = s.step_id + 1
        JOIN ca ON ca.state_key = st.state_key
        LEFT JOIN lb ON lb.traj_id = s.traj_id AND lb.step_id = s.step_id""").df().set_index("state_key")


def test_training_frame_equals_a_direct_join_row_by_row(project, store):
    expected = _direct_join(project)
    order = list(expected.index[::-1])  # not the sources' order: rows must come back as asked
    frame = client.training_frame(store, pd.DataFrame({"state_key": order}))
    assert list(frame.state_key) == order
    assert frame.candidates.shape == (N_STATES, K, DIM) and frame.candidate_mask.all()
    for i, key in enumerate(order):
        want = expected.loc[key]
        assert np.array_equal(frame.state[i], want.state), key
        cands = np.stack(want.cands)
        assert np.array_equal(frame.candidates[i], cands), key
        assert np.array_equal(frame.action[i], cands[0]), key
        assert list(frame.candidate_actions[i]) == list(want.actions), key
        has_next = isinstance(want.next_state, np.ndarray)  # DuckDB gives NA for a missing array
        assert frame.has_next[i] == has_next, key
        assert np.array_equal(frame.next_state[i], want.next_state if has_next else np.zeros(DIM, np.float32)), key
        assert (frame.reward[i], frame.done[i], frame.mc_return[i]) == (want.reward, want.done, want.mc_return), key
        assert frame.label[i] == (want.label if isinstance(want.label, str) else None), key
    assert frame.done.any() and (~frame.has_next & ~frame.done).any()  # terminal and cut-off steps both present
    draws = pq.read_table(project / "data" / "candidates.parquet").to_pandas().groupby(["traj_id", "step_id"])["draws"].agg(list)
    assert [list(row) for row in frame.candidate_draws] == [draws[(k.rsplit("/", 1)[0], int(k.rsplit("/", 1)[1]))] for k in order]


def test_training_frame_takes_traj_step_columns_and_honours_as_of(store):
    frame = client.training_frame(store, pd.DataFrame({"traj_id": ["traj00001", "traj00000"], "step_id": [0, 0]}))
    assert list(frame.state_key) == ["traj00001/0", "traj00000/0"]
    with pytest.raises(DigiqError, match="no state embedding for 'traj00001/0'"):
        client.training_frame(store, pd.DataFrame({"state_key": ["traj00001/0"]}), as_of=fc.EPOCH.replace(year=2000))


# ----------------------------------------------------------------------------- bad input

def test_missing_or_malformed_source_names_the_file(tmp_path):
    from digiq.pipelines import features as stage

    paths = write_synthetic_sources(tmp_path / "data", n_states=6, k=2, dim=4)
    copy_feature_repo(tmp_path)
    params = project_params(tmp_path, features={"metrics": str(tmp_path / "m.json")})
    paths["candidates"].unlink()
    with pytest.raises(DigiqError) as err:
        stage.run(params)
    assert str(paths["candidates"].resolve()) in str(err.value) and "missing input table" in str(err.value)
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "features" / "data").exists()
    assert not (tmp_path / "data" / "features").exists()

    states = pq.read_table(paths["states"])
    as_list = states.set_column(4, "embedding", states["embedding"].cast(pa.list_(pa.float32())))
    pq.write_table(as_list, paths["states"])
    with pytest.raises(DigiqError, match=r"states\.parquet: embedding: expected fixed_size_list<float32>\[d\]"):
        stage.run(params)

    result = CliRunner().invoke(app, _materialize_args(tmp_path))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "states.parquet: embedding: expected fixed_size_list" in result.output


def test_a_candidate_table_older_than_the_semantic_key_is_refused(tmp_path):
    paths = write_synthetic_sources(tmp_path / "data", n_states=4, k=3, dim=4)
    copy_feature_repo(tmp_path)
    pq.write_table(pq.read_table(paths["candidate_table"]).drop_columns(["semantic_key", "draws"]), paths["candidate_table"])
    with pytest.raises(DigiqError, match=r"candidates\.parquet: semantic_key: missing column .*re-run `digiq candidates`"):
        sources.check_and_derive(sources.FeatureInputs.from_params(project_params(tmp_path)))
    table = pq.read_table(paths["candidates"])
    pq.write_table(table.set_column(5, "action", pa.array(["other"] * table.num_rows)), paths["candidates"])
    write_synthetic_sources(tmp_path / "fresh", n_states=4, k=3, dim=4)
    with pytest.raises(DigiqError, match=r"candidates\.parquet: action: candidate 'traj00000/0/0' of the embeddings is not this table's"):
        sources.check_candidate_table(paths["candidates"], tmp_path / "fresh" / "candidates.parquet")


def test_candidate_blocks_concatenate_each_version_in_cand_idx_order(tmp_path):
    paths = write_synthetic_sources(tmp_path, n_states=3, k=4, dim=2, seed=1)
    cands = pq.read_table(paths["candidates"])
    later = cands.filter(pc.field("state_key") == cands["state_key"][0].as_py())
    later = later.set_column(later.schema.get_field_index("event_timestamp"), "event_timestamp",
                             pc.add(later["event_timestamp"], pa.scalar(3600 * 10**6, pa.duration("us"))))
    shuffled = pa.concat_tables([cands, later]).take(np.random.default_rng(0).permutation(cands.num_rows + later.num_rows))
    pq.write_table(shuffled, paths["candidates"])

    blocks = sources.derive_candidate_blocks(paths["candidates"], paths["candidate_table"])
    assert blocks.schema == fc.CANDIDATE_BLOCKS_SCHEMA
    assert blocks.num_rows == pc.count_distinct(cands["state_key"]).as_py() + 1  # the re-embedded state has two versions
    source = shuffled.to_pandas()
    for row in blocks.to_pylist():
        rows = source[(source.state_key == row["state_key"]) & (source.event_timestamp == row["event_timestamp"])].sort_values("cand_idx")
        assert row["actions"] == rows.action.to_list()
        assert sum(row["draws"]) == len(rows) and len(row["semantic_keys"]) == len(rows)
        assert np.array_equal(np.asarray(row["embeddings"], dtype=np.float32), np.concatenate(rows.embedding.to_list()))


def test_keys_must_follow_the_contract(tmp_path):
    paths = write_synthetic_sources(tmp_path, n_states=4, k=3, dim=4)
    cands = pq.read_table(paths["candidates"]).filter(pc.field("cand_idx") != 1)
    pq.write_table(cands, paths["candidates"])
    with pytest.raises(DigiqError, match=r"candidates\.parquet: cand_idx: the candidates of state .* are not numbered 0\.\.K-1"):
        sources.check_keys(paths["states"], paths["candidates"])


# ----------------------------------------------------------------------------- plain Feast CLI

def test_feast_feature_views_list_in_the_repo(project):
    out = subprocess.run([FEAST, "feature-views", "list"], cwd=project / "features", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    served = fc.served_views(json.loads((fc.runtime_dir(project / "features", "finetuned") / "sources.json").read_text()))
    assert {view.name for view in served} == {view.name for view in fc.VIEWS if view.source not in fc.CHANNEL_SOURCES}
    for view in fc.VIEWS:  # the channel views only where `digiq channels` wrote their sources (tests/test_channels.py)
        assert bool(re.search(rf"^{view.name}\s", out.stdout, re.M)) == (view in served), out.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_feast_serve_answers_an_online_request(project):
    port = _free_port()
    server = subprocess.Popen([FEAST, "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log"], cwd=project / "features",
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        body = json.dumps({"feature_service": "state_features", "entities": {"state_key": ["traj00002/0"]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/get-online-features", data=body,
                                         headers={"Content-Type": "application/json"})
        deadline, answer = time.monotonic() + 90, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    answer = json.loads(response.read())
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        assert answer is not None, f"feast serve did not answer: {server.stderr.read1().decode() if server.poll() is not None else 'timeout'}"
        names = answer["metadata"]["feature_names"]
        embedding = answer["results"][names.index("embedding")]["values"][0]
        assert np.array_equal(np.asarray(embedding, dtype=np.float32), _sources(project)["states"].loc["traj00002/0", "embedding"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


# ----------------------------------------------------------------------------- the documented snippets

def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "docs" / "features.md").read_text(), re.S)


def test_docs_python_snippet_runs(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    (snippet,) = _blocks("python")
    namespace: dict = {}
    exec(compile(snippet, "docs/features.md", "exec"), namespace)
    frame = namespace["frame"]
    assert len(frame) == N_STATES and namespace["row"]["candidates"]["embedding"].shape == (K, DIM)
    assert f"({N_STATES}, {K}, {DIM})" in capsys.readouterr().out


def test_docs_cli_lines_run(tmp_path, monkeypatch):
    """The documented commands, run with the default (relative) paths in a fresh project with two variants."""
    copy_feature_repo(tmp_path)
    write_synthetic_sources(tmp_path / "data", n_states=N_STATES, k=K, dim=DIM, seed=3)
    other = write_synthetic_sources(tmp_path / "other", n_states=N_STATES, k=K, dim=4, seed=3, variant="off_the_shelf")
    shutil.copytree(other["states"].parent, tmp_path / "data" / "embeddings" / "off_the_shelf")
    monkeypatch.chdir(tmp_path)
    lines = [line.split("#")[0].split(">")[0].strip() for line in _blocks("bash")[0].splitlines()]
    commands = [line.replace('"$TRAJ"', "traj00001").split()[2:] for line in lines if line.startswith("digiq features")]
    assert [c[0] for c in commands] == ["materialize", "materialize", "get", "get"]
    for command in commands:
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, (command, result.output)
    assert json.loads(result.output)["state_key"] == "traj00001/0"
    other = client.training_frame(client.open_store("features", "off_the_shelf"))
    assert other.state.shape == (N_STATES, 4)
