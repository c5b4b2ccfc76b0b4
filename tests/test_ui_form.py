"""The Train form is a view of Recipe: values round-trip, edits land on the right fields, errors name them."""

from __future__ import annotations

import pytest

from gptoss_webui.config import ConfigError, Recipe
from gptoss_webui.presets import load_preset, preset_names
from gptoss_webui.ui.form import (
    FIELD_BY_PATH,
    FIELDS,
    apply_to_form,
    form_values,
    parse_extra,
    parse_layers,
    recipe_from_form,
)


def _set(values: list, path: str, value) -> list:
    values = list(values)
    values[FIELDS.index(FIELD_BY_PATH[path])] = value
    return values


def test_every_field_is_a_real_config_path():
    data = Recipe().model_dump(mode="json")
    for f in FIELDS:
        node = data
        for part in f.path.split("."):
            assert isinstance(node, dict) and part in node, f.path
            node = node[part]


def test_choice_widgets_offer_every_value_the_config_allows():
    """A radio or dropdown whose config value is not among its choices breaks the page."""
    import typing

    from gptoss_webui.config import TrainConfig

    for f in FIELDS:
        if f.widget in ("radio", "dropdown") and f.path.startswith("train.") and f.path.count(".") == 1:
            allowed = typing.get_args(TrainConfig.model_fields[f.path.split(".")[1]].annotation)
            assert set(allowed) <= set(f.choices), f.path


@pytest.mark.parametrize("name", preset_names())
def test_presets_round_trip_through_the_form(name, tmp_path):
    recipe = load_preset(name)
    back = recipe_from_form(recipe.model_dump(mode="json"), form_values(recipe), "", str(tmp_path))
    expected = recipe.model_dump(mode="json")
    expected["train"]["runs_dir"] = str(tmp_path)  # the app decides where runs go
    assert back.model_dump(mode="json") == expected


def test_form_edits_and_free_form_lines_become_the_config(tmp_path):
    recipe = load_preset("tiny-cpu-demo")
    values = _set(form_values(recipe), "train.optim.max_steps", 6)
    values = _set(values, "train.lora.expert_layers", "0, 1")
    values = _set(values, "train.num_gpus", 0)  # 0 / empty = all visible GPUs
    values = _set(values, "train.run_name", "  ")
    extra = "# comment\noptim.warmup_ratio=0.1\nserve.max_tokens=32\n"
    out = recipe_from_form(recipe.model_dump(mode="json"), values, extra, str(tmp_path))
    assert out.train.optim.max_steps == 6
    assert out.train.lora.expert_layers == [0, 1]
    assert out.train.num_gpus is None and out.train.run_name is None
    assert out.train.optim.warmup_ratio == 0.1 and out.serve.max_tokens == 32
    assert out.train.runs_dir == str(tmp_path)


def test_invalid_values_are_refused_with_the_field_name(tmp_path):
    recipe = load_preset("tiny-cpu-demo")
    values = _set(form_values(recipe), "train.lora.dropout", 0.1)  # dropout with expert parameters
    with pytest.raises(ConfigError, match="lora.dropout"):
        recipe_from_form(recipe.model_dump(mode="json"), values, "", str(tmp_path))
    with pytest.raises(ConfigError, match="nope"):
        recipe_from_form(recipe.model_dump(mode="json"), form_values(recipe), "optim.nope=1", str(tmp_path))
    with pytest.raises(ConfigError, match="expert_layers"):
        parse_layers("7, fifteen")


def test_parse_helpers():
    assert parse_layers("all") == "all" and parse_layers("") == [] and parse_layers("7 15,23") == [7, 15, 23]
    assert parse_extra("lora.r=4\n\ntrain.seed=1\nserve.port=9") == ["train.lora.r=4", "train.seed=1",
                                                                     "serve.port=9"]


def test_the_estimates_fix_goes_into_the_widgets_and_the_rest_into_the_box():
    recipe = load_preset("gpt-oss-20b-2x24gb")
    values = _set(form_values(recipe), "train.deepspeed.stage", 2)
    new, extra = apply_to_form(values, "seed: kept", [
        "train.deepspeed.enabled=true", "train.deepspeed.stage=3", "train.deepspeed.offload_params=true"])
    assert new[FIELDS.index(FIELD_BY_PATH["train.deepspeed.stage"])] == 3
    assert new[FIELDS.index(FIELD_BY_PATH["train.deepspeed.offload_params"])] is True
    assert extra.splitlines() == ["seed: kept", "train.deepspeed.enabled=true"]
