"""Settings that would fail late (after data preparation or training) are refused up front."""

import pytest

from train import config as config_lib


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "log_every", 0, r"config.train.log_every=0: must be positive"),
        ("eval", "every_steps", 0, r"config.eval.every_steps=0: must be positive"),
        ("optimizer", "warmup_steps", 2000, r"config.optimizer.warmup_steps=2000: exceeds the run's train.steps=1000"),
        ("sample", "max_new_tokens", 100_000, r"config.sample.max_new_tokens=100000: must be positive and leave room"),
    ],
)
def test_settings_that_fail_late_are_refused_naming_the_key(section, key, value, message):
    cfg = config_lib.base_config()
    cfg[section][key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg, n_devices=8, n_processes=1)
