"""Settings that would fail late (after data preparation or training) are refused up front."""

import pytest

from train import config as config_lib
from train.optimizer import learning_rate_schedule


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "log_every", 0, r"config.train.log_every=0: must be positive"),
        ("eval", "every_steps", 0, r"config.eval.every_steps=0: must be positive"),
        ("eval", "batch_size", 0, r"config.eval.batch_size=0: must be positive"),
        ("train", "batch_size", 0, r"config.train.batch_size=0: must be positive"),
        ("train", "profile_steps", (2.5, 3), r"config.train.profile_steps=\(2.5, 3\): expected \(\) or \(first, last\), step numbers"),
        ("optimizer", "warmup_steps", 2000, r"config.optimizer.warmup_steps=2000: exceeds the run's train.steps=1000"),
        ("sample", "max_new_tokens", 100_000, r"config.sample.max_new_tokens=100000: must be positive and leave room"),
    ],
)
def test_settings_that_fail_late_are_refused_naming_the_key(section, key, value, message):
    cfg = config_lib.base_config()
    cfg[section][key] = value
    with pytest.raises(ValueError, match=message):
        config_lib.validate(cfg, n_devices=8, n_processes=1)


def test_a_wsd_decay_longer_than_the_steps_after_warmup_is_refused():
    cfg = config_lib.base_config()
    cfg.optimizer.update(schedule="wsd", decay_fraction=0.95)
    with pytest.raises(ValueError, match=r"config.optimizer.decay_fraction=0.95: must decay over at least one and at "
                                         r"most the 900 steps after warmup \(train.steps=1000"):
        config_lib.validate(cfg, n_devices=8, n_processes=1)
    cfg.optimizer.decay_fraction = 0.9  # the longest decay that fits reaches the floor at the last step
    config_lib.validate(cfg, n_devices=8, n_processes=1)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.train.steps)
    assert float(schedule(100)) == pytest.approx(cfg.optimizer.lr)
    assert float(schedule(1000)) == pytest.approx(cfg.optimizer.lr * cfg.optimizer.min_lr_ratio)
