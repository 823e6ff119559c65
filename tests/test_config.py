import pytest

from dmlray.config import ConfigError, config_from_dict, config_to_dict, load_config, preset_names


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
