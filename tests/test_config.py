"""params.yaml validation: typos get a did-you-mean hint, wrong types name the field, the file mirrors the models."""

from pathlib import Path

import pytest
import yaml

from digiq.config import Params
from digiq.params_file import load_params, params_yaml
from digiq.errors import DigiqError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    on_disk = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(on_disk) == set(Params.model_fields), "params.yaml must list every section"
    assert params.gamma == 0.5


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


def test_an_unknown_behaviour_weight_names_the_file_and_the_weight(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("collect:\n  behavior: {submit_parital: 1.5}\n")
    with pytest.raises(DigiqError) as err:
        load_params(path)
    assert str(path) in str(err.value) and "collect.behavior" in str(err.value) and "submit_parital" in str(err.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("collect: [unclosed\n")
    with pytest.raises(DigiqError, match="invalid YAML"):
        load_params(path)


def test_the_llava_7b_preset_applies_through_dvcs_own_override_parser(tmp_path):
    """`digiq model preset P | xargs dvc exp run`: the flags, applied by DVC's `-S` code to params.yaml, give the
    preset's values (a regex with parentheses included) and a params.yaml that still validates."""
    import shlex
    import subprocess
    import sys

    from dvc.utils.hydra import apply_overrides

    from digiq.params_file import dvc_set_flags, preset_overrides

    preset = REPO / "profiles" / "llava-1.5-7b.yaml"
    overrides = preset_overrides(preset, REPO / "params.yaml")
    assert overrides["finetune.base_dtype"] == "bfloat16" and overrides["embed.models.off_the_shelf"] == overrides["model.base"]
    params_path = tmp_path / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    regex = r".*language_model.*\.(q_proj|v_proj)"
    flags = dvc_set_flags({**overrides, "finetune.target_modules": regex, "critic.hidden": [64, 64]})
    apply_overrides(params_path, flags[1::2])
    applied = load_params(params_path)
    assert (applied.finetune.device, applied.finetune.base_dtype, applied.finetune.batch_size) == ("cuda", "bfloat16", 8)
    assert applied.embed.models["no_vlm"] == "models/llava-1.5-7b-hf" and applied.embed.layer == 16
    assert applied.finetune.target_modules == regex and applied.critic.hidden == [64, 64]
    assert applied.collect == load_params(REPO / "params.yaml").collect  # untouched sections stay

    cli = subprocess.run([sys.executable, "-m", "digiq.cli.main", "model", "preset", str(preset), "--params",
                          str(REPO / "params.yaml")], capture_output=True, text=True, check=True)
    assert [arg for line in cli.stdout.splitlines() for arg in shlex.split(line)] == dvc_set_flags(overrides)


@pytest.mark.parametrize("text, field, hint", [
    ("finetune:\n  base_dtyp: bfloat16\n", "finetune.base_dtyp", "did you mean 'base_dtype'"),
    ("finetune:\n  mode: full\n  base_dtype: bfloat16\n", "finetune.base_dtype", "use mode lora"),
])
def test_a_bad_preset_is_refused_naming_file_and_key(tmp_path, text, field, hint):
    from digiq.params_file import preset_overrides

    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    with pytest.raises(DigiqError) as err:
        preset_overrides(preset, REPO / "params.yaml")
    assert str(preset) in str(err.value) and field in str(err.value) and hint in str(err.value)


def test_the_documented_patient_behaviour_override_gives_the_patient_policy(tmp_path):
    """docs/experiments.md: `dvc exp run -S collect.behavior.submit_partial=-2.5` (DVC merges a `{}` override into the
    existing mapping, so setting the weight is how to get the patient π_β back)."""
    from dvc.utils.hydra import apply_overrides

    from digiq.envs.behavior import Scores, scores_with

    assert "-S collect.behavior.submit_partial=-2.5" in (REPO / "docs" / "experiments.md").read_text()
    params_path = tmp_path / "params.yaml"
    params_path.write_text((REPO / "params.yaml").read_text())
    apply_overrides(params_path, ["collect.behavior.submit_partial=-2.5"])
    assert scores_with(load_params(params_path).collect.behavior) == Scores()



def test_overrides_in_dvcs_grammar_set_typed_values(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("critic:\n  updates: 3000\n")
    params = load_params(path, ["critic.updates=500", "critic.hidden=[64,64]", "collect.tasks=[click-button,enter-text]",
                                "finetune.target_modules='.*(q_proj|v_proj)'", "collect.behavior={}", "gamma=0.9"])
    assert params.critic.updates == 500 and params.critic.hidden == [64, 64] and params.gamma == 0.9
    assert params.collect.tasks == ["click-button", "enter-text"] and params.collect.behavior == {}
    assert params.finetune.target_modules == ".*(q_proj|v_proj)"
    assert load_params(path).critic.updates == 3000, "the file is not changed"


@pytest.mark.parametrize("override, message", [
    ("critic.updatess=5", "-S critic.updatess=5: critic.updatess: unknown key; did you mean 'updates'?"),
    ("critc.updates=5", "-S critc.updates=5: critc: unknown key; did you mean 'critic'?"),
    ("critic.updates=abc", "-S critic.updates=abc: critic.updates: Input should be a valid integer"),
    ("label.epsilon=-1", "-S label.epsilon=-1: label.epsilon: Input should be greater than 0 (got -1)"),
    ("critic.updates", "-S critic.updates: not a section.key=value override"),
    ("~critic.updates", "-S ~critic.updates: only plain section.key=value overrides are supported"),
])
def test_a_bad_override_gets_one_line_naming_it(override, message):
    with pytest.raises(DigiqError) as err:
        load_params(REPO / "params.yaml", [override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_every_override_dvc_accepts_digiq_reads_the_same(tmp_path):
    """What `dvc exp run -S` writes into params.yaml and what `digiq <stage> -S` applies in memory agree."""
    from dvc.utils.hydra import apply_overrides

    overrides = ["critic.hidden=[32,16]", "collect.behavior={submit_partial: 2.0}", "actor.threshold=0.25",
                 "finetune.target_modules='.*(q_proj)'", "evaluate.episodes_per_task=3"]
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    in_memory = load_params(path, overrides)
    apply_overrides(path, overrides)
    assert load_params(path) == in_memory


def test_params_yaml_is_generated_from_the_configs():
    """Each setting is declared once, in digiq/config.py; params.yaml is its output (`digiq params --defaults`)."""
    assert (REPO / "params.yaml").read_text() == params_yaml(), "regenerate: digiq params --defaults > params.yaml"
