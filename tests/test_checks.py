"""The Great Expectations wrapper, run for real (ephemeral GX context, real Data Docs on disk)."""

import json

import pandas as pd
import pytest

from digiq.checks import RESULT_FILE, Expect, run_suite
from digiq.errors import DigiqError


@pytest.fixture
def frame():
    return pd.DataFrame({"score": [0.1, 0.5, 0.9, 2.5], "kind": ["tap", "tap", "type", "type"], "row": [1, 2, 3, 4]})


def in_range(column="score", low=0.0, high=1.0):
    return Expect("ExpectColumnValuesToBeBetween", {"column": column, "min_value": low, "max_value": high}, f"{column} in [{low}, {high}]")


def test_passing_suite(frame):
    result = run_suite(
        "ok",
        frame,
        [
            Expect("ExpectColumnValuesToBeInSet", {"column": "kind", "value_set": ["tap", "type"]}, "kinds are known"),
            Expect("ExpectColumnMeanToBeBetween", {"column": "score", "min_value": 0.5, "max_value": 1.5}, "mean score near 1"),
            Expect("ExpectCompoundColumnsToBeUnique", {"column_list": ["kind", "row"]}, "unique rows"),
        ],
    )
    assert result.success and result.failures == []
    assert [r["description"] for r in result.results] == ["kinds are known", "mean score near 1", "unique rows"]
    assert result.results[1]["observed"] == "observed 1"  # mean of 0.1, 0.5, 0.9, 2.5
    result.raise_for_failures("frame.parquet")  # no error


def test_failing_suite_names_expectation_and_observed_value(frame):
    result = run_suite(
        "scores",
        frame,
        [
            in_range(),
            Expect("ExpectColumnMeanToBeBetween", {"column": "score", "min_value": 0.0, "max_value": 0.5}, "mean score small"),
            Expect("ExpectColumnValuesToNotBeNull", {"column": "kind"}, "kind present"),
        ],
    )
    assert not result.success
    assert result.failures == [
        "score in [0.0, 1.0] (observed 1 of 4 rows unexpected, e.g. 2.5)",
        "mean score small (observed 1)",
    ]
    assert [r["success"] for r in result.results] == [False, False, True]  # suite order, whatever GX's order
    with pytest.raises(DigiqError) as err:
        result.raise_for_failures("data/x.parquet")
    assert str(err.value) == (
        "data/x.parquet: scores failed: score in [0.0, 1.0] (observed 1 of 4 rows unexpected, e.g. 2.5); mean score small (observed 1)"
    )


def test_row_condition_and_missing_column(frame):
    result = run_suite(
        "kinds",
        frame,
        [
            Expect(
                "ExpectColumnMeanToBeBetween",
                {"column": "score", "min_value": 0, "max_value": 1, "row_condition": 'kind=="type"', "condition_parser": "pandas"},
                "type scores in [0, 1]",
            ),
            in_range(column="nope"),
        ],
    )
    assert result.failures[0] == "type scores in [0, 1] (observed 1.7)"
    assert result.failures[1].startswith("nope in [0.0, 1.0] (error: ") and "nope" in result.failures[1][20:]


def test_data_docs_and_json_written_atomically(frame, tmp_path):
    docs = tmp_path / "checks" / "gate"
    docs.mkdir(parents=True)
    (docs / "stale.txt").write_text("from an earlier run")
    result = run_suite("docs", frame, [in_range()], docs_dir=docs)
    index = docs / "index.html"
    assert index.is_file() and "docs" in index.read_text()
    assert list((docs / "validations").rglob("*.html")), "no validation page in the Data Docs"
    assert not (docs / "stale.txt").exists(), "docs folder must be replaced, not merged"
    saved = json.loads((docs / RESULT_FILE).read_text())
    assert saved == result.to_json()
    assert saved["success"] is False and saved["results"][0]["details"]["unexpected_count"] == 1
    assert not [p for p in docs.parent.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    with pytest.raises(DigiqError, match=rf"data/x.parquet: docs failed: .* \(details: {index}\)$"):
        result.raise_for_failures("data/x.parquet")  # the one-line error points at the Data Docs page


def test_same_suite_twice_in_one_process(frame):
    first = run_suite("again", frame, [in_range(high=3.0)])
    second = run_suite("again", frame.assign(score=frame["score"] + 10), [in_range(high=3.0)])
    assert first.success and not second.success


def test_unknown_kind_is_a_clear_error(frame):
    with pytest.raises(DigiqError, match=r"kind: unknown .*'ExpectColumnValuesToBeBetwen'; did you mean 'ExpectColumnValuesToBeBetween'"):
        run_suite("bad", frame, [Expect("ExpectColumnValuesToBeBetwen", {"column": "score"}, "typo")])


def test_bad_kwargs_is_a_clear_error(frame):
    with pytest.raises(DigiqError, match=r"kwargs: invalid arguments for ExpectColumnValuesToBeBetween \(typo\)"):
        run_suite("bad", frame, [Expect("ExpectColumnValuesToBeBetween", {"colum": "score"}, "typo")])


def test_empty_suite_refused(frame):
    with pytest.raises(DigiqError, match="no expectations"):
        run_suite("empty", frame, [])
