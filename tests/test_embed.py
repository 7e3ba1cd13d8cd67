"""Frozen features on a real PNG dataset with a real (tiny) LLaVA checkpoint: the Feast contract, determinism,
resume after an interruption, the no-VLM variant, and the finite / non-degenerate checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_candidates import write_tiny_dataset
from tiny_llava import save_tiny_llava

from digiq import candidates as C
from digiq import embed as E
from digiq import extractor as X
from digiq.config import EmbedParams, Params
from digiq.errors import DigiqError
from digiq.pipelines import embed as stage
from digiq.feature_contract import CANDIDATES_FILE, EPOCH, STATES_FILE, candidates_schema, states_schema
from digiq.feature_sources import check_keys, check_table

K = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("embed")
    dataset = write_tiny_dataset(root / "raw")
    cand_path = root / "candidates.parquet"
    C.write_candidates(C.make_candidates(dataset, K, seed=0), cand_path)
    model = save_tiny_llava(root / "model")
    return root, dataset, cand_path, model


def params(root: Path, cand_path: Path, model: Path, name: str, **kw) -> EmbedParams:
    return EmbedParams(models={"finetuned": str(model), "off_the_shelf": str(model), "no_vlm": str(model)},
                       candidates=str(cand_path), out=str(root / name / "emb"), parts=str(root / name / "parts"),
                       metrics=str(root / name / "metrics"), dtype="float32", device="cpu", chunk_states=4, **kw)


def run(dataset: Path, p: EmbedParams, **kw) -> stage.EmbedOutcome:
    """The stage on this dataset with these embed settings."""
    return stage.run(Params(collect={"out": str(dataset)}, embed=p), **kw)


def test_tables_match_the_feast_contract_and_repeat_exactly(setup):
    root, dataset, cand_path, model = setup
    first = run(dataset.root, params(root, cand_path, model, "a"))
    second = run(dataset.root, params(root, cand_path, model, "b"))
    states, cands = first.out / STATES_FILE, first.out / CANDIDATES_FILE
    check_table(states, states_schema(32))
    check_table(cands, candidates_schema(32))
    check_keys(states, cands)  # the Feast stage's own key checks
    s, c = pq.read_table(states), pq.read_table(cands)
    assert s.schema == states_schema(32) and c.schema == candidates_schema(32)
    assert s.num_rows == 9 and c.num_rows == 9 * K
    assert s.column("event_timestamp").to_pylist()[1] == EPOCH.replace(second=1)
    steps = {f"{r['traj_id']}/{r['step_id']}": r["action"] for r in dataset.table().to_pylist()}
    assert set(s.column("state_key").to_pylist()) == set(steps)
    assert all(row["action"] == steps[row["state_key"]] for row in c.to_pylist() if row["cand_idx"] == 0)
    assert set(s.column("layer").to_pylist()) == {2} and len(set(c.column("model_hash").to_pylist())) == 1
    assert pq.read_table(second.out / STATES_FILE).equals(s)
    assert pq.read_table(second.out / CANDIDATES_FILE).equals(c)
    m = first.metrics
    assert m["states"] == 9 and m["candidates"] == 9 * K and m["d_state"] == 32 and m["dtype"] == "float32"
    assert m["dtype_reason"] == "embed.dtype: float32"
    assert m["computed_samples"] < 9 + 9 * K  # duplicates and repeated states computed once
    assert (root / "a" / "metrics" / "embed-finetuned.json").is_file()
    assert not (root / "a" / "parts" / "finetuned").exists()  # merged, then removed
    # duplicate candidates of a state share one embedding
    emb = E.embedding_matrix(c)
    rows = c.to_pylist()
    for i, row in enumerate(rows):
        for j in range(i):
            if rows[j]["state_key"] == row["state_key"] and C.canonical(rows[j]["action"]) == C.canonical(row["action"]):
                assert np.array_equal(emb[i], emb[j])


def test_interrupted_run_resumes_after_a_deleted_chunk(setup):
    root, dataset, cand_path, model = setup
    reference = run(dataset.root, params(root, cand_path, model, "ref"))
    p = params(root, cand_path, model, "resume")

    def interrupt(chunk: int) -> None:
        if chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(dataset.root, p, on_chunk=interrupt)
    parts = Path(p.parts) / "finetuned"
    assert sorted(f.name for f in parts.glob("*.parquet")) == [
        "candidates-000000.parquet", "candidates-000001.parquet", "states-000000.parquet", "states-000001.parquet"]
    assert not Path(p.out, "finetuned").exists()
    (parts / "states-000000.parquet").unlink()  # a lost chunk is recomputed, a finished one is not
    resumed = run(dataset.root, p)
    assert resumed.metrics["resumed_chunks"] == 1 and resumed.metrics["chunks"] == 3
    for name in (STATES_FILE, CANDIDATES_FILE):
        assert pq.read_table(resumed.out / name).equals(pq.read_table(reference.out / name))


def test_no_vlm_variant(setup):
    root, dataset, cand_path, model = setup
    outcome = run(dataset.root, params(root, cand_path, model, "novlm", variant="no_vlm"))
    s = pq.read_table(outcome.out / STATES_FILE)
    c = pq.read_table(outcome.out / CANDIDATES_FILE)
    d_v = 32  # CLIP hidden size
    assert outcome.out.name == "no_vlm"
    assert s.schema.field("embedding").type.list_size == d_v
    assert c.schema.field("embedding").type.list_size == 2 * d_v + len(X.ACTION_KINDS) + 4 + X.TEXT_BUCKETS
    emb = E.embedding_matrix(c)
    np.testing.assert_allclose(emb[:, :d_v], np.repeat(E.embedding_matrix(s), K, axis=0), rtol=1e-6)
    check_keys(outcome.out / STATES_FILE, outcome.out / CANDIDATES_FILE)


def test_degenerate_layer_is_refused(setup):
    """Layer 0 + last token is the embedding of the prompt's final token: the same for every action."""
    root, dataset, cand_path, model = setup
    with pytest.raises(DigiqError, match=r"f\(s, a\) is identical for all distinct actions"):
        run(dataset.root, params(root, cand_path, model, "degenerate", layer=0))
    assert not (root / "degenerate" / "emb" / "finetuned").exists()


def test_nan_and_dimension_checks(setup):
    root, dataset, cand_path, model = setup
    out = run(dataset.root, params(root, cand_path, model, "checks")).out
    s, c = pq.read_table(out / STATES_FILE), pq.read_table(out / CANDIDATES_FILE)
    emb = E.embedding_matrix(s).copy()
    emb[3, 5] = np.nan
    bad = s.set_column(s.schema.get_field_index("embedding"), s.schema.field("embedding"),
                       pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), 32))
    with pytest.raises(DigiqError, match="1 states embedding.* not finite"):
        E.check_embeddings(bad, c, 32, 32, file="x")
    with pytest.raises(DigiqError, match="dimension 32, expected 64"):
        E.check_embeddings(s, c, 64, 32, file="x")


def test_missing_candidates_are_refused(setup, tmp_path):
    root, dataset, cand_path, model = setup
    table = pq.read_table(cand_path)
    short = tmp_path / "short.parquet"
    pq.write_table(table.slice(K), short)  # the first state loses its candidates
    p = params(root, short, model, "missing")
    with pytest.raises(DigiqError, match="has no candidates"):
        run(dataset.root, p)
    pq.write_table(table.drop_columns(["action"]), short)
    with pytest.raises(DigiqError, match="short.parquet: action: missing column"):
        run(dataset.root, p)


def test_cli_embed_runs_and_refuses_a_bad_variant(setup, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from digiq.cli.main import app

    if "embed" not in {c.name for c in app.registered_commands}:
        from digiq.cli import embed as cli

        cli.register(app)
    root, dataset, cand_path, model = setup
    monkeypatch.chdir(tmp_path)
    base = ["embed", "-S", f"collect.out='{dataset.root}'", "-S", f"embed.candidates='{cand_path}'",
            "-S", f"embed.models.off_the_shelf='{model}'", "-S", "embed.dtype=float32",
            "--params", str(tmp_path / "none.yaml")]
    bad = CliRunner().invoke(app, [*base, "--variant", "bogus"])
    assert bad.exit_code == 2 and "embed.variant" in bad.output
    ok = CliRunner().invoke(app, [*base, "--variant", "off_the_shelf", "-S", "embed.layer=1"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "data" / "embeddings" / "off_the_shelf" / CANDIDATES_FILE).is_file()
    assert (tmp_path / "metrics" / "embed-off_the_shelf.json").is_file()
