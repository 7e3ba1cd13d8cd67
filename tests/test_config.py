"""params.yaml validation: typos get a did-you-mean hint, wrong types name the field, the file mirrors the models."""

from pathlib import Path

import pytest
import yaml

from digiq.config import Params, load_params, params_yaml
from digiq.errors import DigiqError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(on_disk) == set(Params.model_fields), "params.yaml must list every section"
    assert params.gamma == 0.95


def test_generated_params_yaml_round_trips(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(params_yaml())
    assert load_params(path) == Params()


def test_typo_key_gets_did_you_mean(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("collect:\n  episodes_per_tsk: 3\n")
    with pytest.raises(DigiqError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and "collect.episodes_per_tsk" in message and "did you mean 'episodes_per_task'" in message


def test_wrong_type_names_field(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("label:\n  epsilon: lots\n")
    with pytest.raises(DigiqError, match=r"label\.epsilon"):
        load_params(path)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("collect: [unclosed\n")
    with pytest.raises(DigiqError, match="invalid YAML"):
        load_params(path)
