"""Feast with a Redis online store: Debian's redis-server started here, `digiq features materialize` into it with
`features.online_store: {type: redis, ...}`, every state and its candidates read back bit-exact."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import copy_feature_repo, write_synthetic_sources
from digiq import store_client as client
from digiq.cli.features import app

from test_features import DIM, K, _materialize_args, _sources

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server (make setup)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    import redis

    port = _free_port()
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                time.sleep(0.05)
        else:
            pytest.fail("redis-server did not answer within 5 s")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_materialized_features_round_trip_through_redis(tmp_path, redis_url):
    project = tmp_path / "project"
    copy_feature_repo(project)
    write_synthetic_sources(project / "data", n_states=12, k=K, dim=DIM, seed=5)
    online = {"type": "redis", "connection_string": redis_url}
    result = CliRunner().invoke(app, _materialize_args(project, yaml.safe_dump({"features": {"online_store": online}})))
    assert result.exit_code == 0, result.output
    state_dir = project / "features" / "data" / "finetuned"
    assert not (state_dir / "online_store.db").exists()  # nothing went to SQLite
    assert yaml.safe_load((state_dir / "feature_store.yaml").read_text())["online_store"] == online

    store = client.open_store(project / "features", "finetuned")
    src = _sources(project)
    for key in src["states"].index:
        traj, step = key.rsplit("/", 1)
        row = client.online_state(store, traj, int(step), candidates=True)
        np.testing.assert_array_equal(row["embedding"], src["states"].loc[key, "embedding"])
        expected = np.stack(src["candidates"].loc[[f"{key}/{k}" for k in range(K)], "embedding"].to_list())
        assert np.array_equal(row["candidates"]["embedding"], expected)
