import typing

import pytest

from dmlray.config import (
    Config,
    ConfigError,
    allowed_values,
    config_from_dict,
    config_to_dict,
    load_config,
    preset_names,
    validate,
)


def test_demo_preset_resolves_with_overrides():
    cfg = load_config("demo", ["train.steps=12", "memory.size=0", "optim.milestones=[5, 9]", "loss.params.beta=50"])
    assert cfg.train.steps == 12 and cfg.memory.size == 0
    assert cfg.optim.milestones == [5, 9]
    assert cfg.loss.params["beta"] == 50 and cfg.loss.params["alpha"] == 2.0  # merged, not replaced
    assert "demo" in preset_names()


def test_round_trip_through_a_dict():
    cfg = load_config("demo")
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.stepz=3", "train.stepz"),
        ("trian.steps=3", "trian"),
        ("train.steps=many", "train.steps"),
        ("train.steps=1.5", "train.steps"),
        ("run.use_gpu=maybe", "run.use_gpu"),
        ("data.samples_per_class=1", "data.samples_per_class"),
        ("loss.name=no_such_loss", "loss.name"),
        ("loss.name=adversarial", "auxiliary term"),
        ("model.backbone=no_such_net", "model.backbone"),
        ("optim.name=adagrad", "optim.name"),
    ],
)
def test_bad_keys_and_values_are_errors_that_name_them(override, named):
    with pytest.raises(ConfigError) as info:
        load_config("demo", [override])
    assert named in str(info.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="demo"):
        load_config("no-such-preset")


def test_override_needs_key_and_value():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("demo", ["train.steps"])


# the allowed values, written out by hand: the config reads them from its Literal types
CHOICES = {
    "data.channels": (1, 3),
    "model.batchnorm": ("train", "frozen", "sync"),
    "optim.name": ("adam", "adamw", "sgd"),
    "train.dtype": ("float32", "float64"),
    "train.amp": ("none", "bf16"),
}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_choice_field_takes_exactly_its_literal_values_and_names_them_when_refused(key):
    section, name = key.split(".")
    assert allowed_values(typing.get_type_hints(type(getattr(Config(), section)))[name]) == CHOICES[key]
    with pytest.raises(ConfigError) as info:
        load_config("demo", [f"{key}=no_such_choice"])
    message = str(info.value)
    assert key in message and "'no_such_choice'" in message, message
    assert all(str(v) in message for v in CHOICES[key]), message


def test_a_choice_is_matched_by_type_too_and_checked_in_a_config_built_in_code():
    with pytest.raises(ConfigError, match="data.channels"):
        load_config("demo", ["data.channels=true"])  # True == 1, but not a channel count
    assert load_config("demo", ["data.channels=3", "train.amp=bf16", "optim.name=sgd"]).data.channels == 3
    cfg = load_config("demo")
    cfg.train.amp = "fp16"  # type: ignore[assignment]  # what the check is for
    with pytest.raises(ConfigError, match="train.amp must be none or bf16, got 'fp16'"):
        validate(cfg)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"optim": {"warmup_steps": 300}}, r"optim.warmup_steps must be in \[0, train.steps=300\), got 300"),
        ({"optim": {"warmup_start": 1.5}}, r"optim.warmup_start must be in \[0, 1\], got 1.5"),
        ({"optim": {"cosine_floor": -0.1}}, r"optim.cosine_floor must be in \[0, 1\], got -0.1"),
        ({"optim": {"schedule": "linear"}}, r"optim.schedule must be step or cosine, got 'linear'"),
        ({"train": {"clip_grad_norm": -1.0}}, r"train.clip_grad_norm must be finite and >= 0 \(0 = off\), got -1.0"),
    ],
)
def test_schedule_and_clipping_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(config_from_dict(override))
