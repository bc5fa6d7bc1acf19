"""Command-line overrides, durations and their errors."""

from __future__ import annotations

import ml_collections
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jdl
from jdl.config import ConfigError, parse_command_line, parse_duration


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.learning_rate = 1e-3
    c.name = "run"
    c.use_bias = True
    c.sizes = (128, 64)
    c.optim = ml_collections.ConfigDict({"momentum": 0.9, "nesterov": False})
    c.variant = arg or "default"
    return c


def test_overrides_convert_to_each_default_type():
    config, workdir = parse_command_line(
        [
            "--config.seed=3",
            "--config.learning_rate",
            "0.5",
            "--config.name=x",
            "--config.use_bias=false",
            "--config.sizes=(32,)",
            "--config.optim.nesterov=yes",
            "--config.optim.momentum=1",
            "--workdir",
            "/tmp/w",
        ],
        get_config,
    )
    assert config.seed == 3 and isinstance(config.seed, int)
    assert config.learning_rate == 0.5
    assert config.name == "x"
    assert config.use_bias is False
    assert config.sizes == (32,)
    assert config.optim.nesterov is True
    assert config.optim.momentum == 1.0 and isinstance(config.optim.momentum, float)
    assert workdir == "/tmp/w"


def test_config_arg_reaches_get_config():
    config, workdir = parse_command_line(["--config=big"], get_config)
    assert config.variant == "big" and workdir is None


def test_unknown_key_names_valid_keys_and_suggests():
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'lerning_rate' \(did you mean "
        r"'learning_rate'\?\); valid keys: .*optim.momentum",
    ):
        parse_command_line(["--config.lerning_rate=0.1"], get_config)


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--config.seed=1.5", "expects a int"),
        ("--config.learning_rate=fast", "expects a float"),
        ("--config.use_bias=maybe", "expects a bool"),
        ("--config.sizes=abc", "expects a tuple"),
        ("--config.optim=1", "unknown config key .optim.; valid keys: .*optim.momentum"),
        ("--lr=1", "unknown argument"),
        ("--config.seed", "needs a value"),
    ],
)
def test_bad_values_are_one_clear_error(arg, message):
    with pytest.raises(ConfigError, match=message):
        parse_command_line([arg], get_config)


def test_config_is_locked_after_parsing():
    config, _ = parse_command_line([], get_config)
    with pytest.raises(AttributeError):
        config.new_key = 1


@pytest.mark.parametrize(
    "value, steps",
    [
        (100, 100),
        ("100", 100),
        ("100 steps", 100),
        ("1 step", 1),
        ("3 epochs", 30),
        ("2.5 epochs", 25),
        ("1000 examples", 32),
        ("0.01 epochs", 1),
    ],
)
def test_parse_duration(value, steps):
    assert parse_duration(value, steps_per_epoch=10, batch_size=32) == steps


@pytest.mark.parametrize(
    "value", ["0 steps", "-1 epochs", "3 fortnights", "many steps", "1 2 3", True]
)
def test_parse_duration_rejects(value):
    with pytest.raises(ConfigError):
        parse_duration(value, steps_per_epoch=10, batch_size=32)


@given(
    amount=st.integers(1, 10**6),
    unit=st.sampled_from(["steps", "epochs", "examples"]),
    steps_per_epoch=st.integers(1, 1000),
    batch_size=st.integers(1, 512),
)
def test_parse_duration_properties(amount, unit, steps_per_epoch, batch_size):
    steps = parse_duration(
        f"{amount} {unit}", steps_per_epoch=steps_per_epoch, batch_size=batch_size
    )
    assert steps >= 1
    if unit == "steps":
        assert steps == amount
    elif unit == "epochs":
        assert steps == amount * steps_per_epoch
    else:  # enough steps to see every example at least once
        assert (steps - 1) * batch_size < amount <= steps * batch_size


@given(st.integers(-(2**40), 2**40))
def test_int_override_round_trips(value):
    config, _ = parse_command_line([f"--config.seed={value}"], get_config)
    assert config.seed == value


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_string_override_is_taken_verbatim(text):
    config, _ = parse_command_line([f"--config.name={text}"], get_config)
    assert config.name == text


def test_public_api_exports():
    assert jdl.parse_command_line is parse_command_line
    assert jdl.ConfigError is ConfigError
