"""The typed config: presets validate, YAML round-trips, bad values give one line naming the field."""

from __future__ import annotations

import pytest

from gptoss_webui.config import ConfigError, Recipe
from gptoss_webui.presets import PRESETS_DIR, load_preset, load_recipe, preset_names


def test_every_shipped_preset_validates_and_round_trips(tmp_path):
    names = preset_names()
    assert {"tiny-cpu-demo", "gpt-oss-20b-1xh100", "gpt-oss-20b-2x24gb", "gpt-oss-120b-8xh100"} <= set(names)
    for name in names:
        recipe = load_preset(name)
        assert recipe.description, f"{name} must say what it is for"
        out = tmp_path / f"{name}.yaml"
        recipe.save(out)
        assert Recipe.from_yaml(out) == recipe


def test_defaults_follow_the_facts_page():
    train = Recipe().train
    assert train.precision == "bf16"
    assert train.attention == "auto"
    assert train.gradient_checkpointing is True
    assert train.deepspeed.enabled and train.deepspeed.stage == 2
    assert train.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert train.lora.expert_parameters == ["gate_up_proj", "down_proj"]
    assert train.lora.dropout == 0.0


def test_overrides_parse_yaml_values():
    recipe = load_recipe("tiny-cpu-demo", ["train.lora.r=4", "train.lora.target_modules=[q_proj]",
                                           "train.gradient_checkpointing=false", "serve.port=9001"])
    assert recipe.train.lora.r == 4
    assert recipe.train.lora.target_modules == ["q_proj"]
    assert recipe.train.gradient_checkpointing is False
    assert recipe.serve.port == 9001


def test_the_small_card_presets_keep_the_experts_in_mxfp4_and_say_what_they_measured():
    # bf16 weights alone exceed 24 GB: ZeRO-2 with a full copy per card fits only with MXFP4 experts.
    for name in ("gpt-oss-20b-1x16gb", "gpt-oss-20b-1x24gb", "gpt-oss-20b-2x24gb", "gpt-oss-120b-1xh100"):
        recipe = load_preset(name)
        assert recipe.train.base_weights == "mxfp4" and recipe.train.deepspeed.stage == 2, name
        assert not recipe.train.deepspeed.offload_params, name
        assert "Measured" in recipe.description and "2026-11-30" in recipe.description, name


@pytest.mark.parametrize(("override", "expected"), [
    ("train.precision=fp8", "train.precision: got 'fp8'; input should be 'bf16', 'fp32' or 'fp16'"),
    ("train.lora.rank=8", "train.lora.rank: unknown field; allowed here: r, alpha, dropout"),
    ("train.lora.dropout=0.1", "lora.dropout must be 0 when lora.expert_parameters is set"),
    ("train.deepspeed.offload_params=true", "deepspeed.offload_params needs deepspeed.stage=3"),
    ("train.optim.learning_rate=-1", "train.optim.learning_rate: Input should be greater than 0"),
    ("train.run_name=a/b", "run_name must be a plain folder name"),
    ("train.attention=flash3", "train.attention: got 'flash3'"),
])
def test_bad_field_gives_one_line_naming_it(override, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe("tiny-cpu-demo", [override])
    message = str(err.value)
    assert expected in message
    assert len(message.splitlines()) == 1


def test_a_bad_set_value_is_blamed_on_the_set_not_the_preset_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set train.optim.max_steps=abc: train.optim.max_steps: Input should"):
        load_recipe("tiny-cpu-demo", ["train.optim.max_steps=abc"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  optim: {max_steps: abc}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml: train.optim.max_steps: Input should"):
        Recipe.from_yaml(bad, ["train.lora.r=4"])


def test_bad_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lora: {r: 8\n  precision: bf16\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        Recipe.from_yaml(bad)


def test_override_without_equals_sign_is_explained():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_recipe("tiny-cpu-demo", ["train.lora.r"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*tiny-cpu-demo"):
        load_preset("nope")
    assert PRESETS_DIR.is_dir()


def test_compile_is_refused_under_zero3_and_kept_elsewhere():
    with pytest.raises(ConfigError, match="compile is not supported with deepspeed.stage=3"):
        load_recipe("gpt-oss-120b-8xh100", ["train.compile=true"])
    assert load_preset("gpt-oss-20b-1xh100").train.compile  # ZeRO-2: measured in bench/README.md
    assert not load_preset("tiny-cpu-demo").train.compile
