"""Command-line overrides, durations and their errors."""

from __future__ import annotations

import json
import re
import textwrap

import ml_collections
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jdl
from jdl.config import ConfigError, check_choices, parse_command_line, parse_duration


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


def strict_json(path):
    """Parses a JSON file, refusing NaN and Infinity (as jq and JavaScript do)."""

    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_help_lists_docstring_keys_types_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as info:
        parse_command_line(
            ["--config.seed=3", "--help"],
            get_config,
            choices={"name": ("run", "walk"), "missing": ("a",)},
            description="My experiment: what it does.",
        )
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("My experiment: what it does.")
    for line in [
        r"--config.learning_rate +float, default 0.001\n",
        r"--config.optim.nesterov +bool, default False\n",
        r"--config.name +str, default 'run'; one of: run, walk\n",
        r"--config.sizes +tuple, default \(128, 64\)\n",
    ]:
        assert re.search(line, out), line
    assert "missing" not in out
    assert "JDL_DEBUG=1" in out


def test_help_defaults_to_the_docstring_of_get_configs_module(capsys):
    with pytest.raises(SystemExit):
        parse_command_line(["-h"], get_config)
    assert capsys.readouterr().out.startswith(__doc__)


def test_check_choices_suggests_the_closest_name():
    config, _ = parse_command_line(["--config.name=rnu"], get_config)
    with pytest.raises(
        ConfigError, match=r"config.name='rnu' must be run or walk \(did you mean 'run'\?\)"
    ):
        check_choices(config, {"name": ("run", "walk"), "not_a_key": ()})
    check_choices(config, {"name": ("rnu",)})


def write_config_file(tmp_path, body, name="my_config.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def test_config_file_with_arg_and_overrides_on_top(tmp_path):
    path = write_config_file(
        tmp_path,
        """
        import ml_collections

        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.learning_rate = 0.5
            c.sizes = [8, 8]
            c.name = arg or "no arg"
            c.optim = ml_collections.ConfigDict({"momentum": 0})
            return c
        """,
    )
    config, _ = parse_command_line([f"--config={path}:big", "--config.seed=7"], get_config)
    assert config.name == "big" and config.learning_rate == 0.5 and config.seed == 7
    assert config.sizes == (8, 8) and isinstance(config.sizes, tuple)
    assert config.optim.momentum == 0.0 and isinstance(config.optim.momentum, float)
    assert config.use_bias is True and config.variant == "default"  # the defaults stay
    config, _ = parse_command_line([f"--config={path}"], get_config)
    assert config.name == "no arg"


def test_config_file_without_arg_calls_get_config_with_none(tmp_path):
    path = write_config_file(
        tmp_path,
        """
        import ml_collections

        def get_config():
            return ml_collections.ConfigDict({"seed": 11})
        """,
    )
    config, _ = parse_command_line(["--config", str(path)], get_config)
    assert config.seed == 11


@pytest.mark.parametrize(
    "body, message",
    [
        (None, r"no such config file"),
        ("x = 1\n", r"defines no get_config\(\)"),
        ("def get_config(:\n", r"loading .* failed: SyntaxError"),
        (
            "def get_config():\n    return {'lerning_rate': 1.0}\n",
            r"unknown config key 'lerning_rate' \(did you mean 'learning_rate'\?\)",
        ),
        ("def get_config():\n    return {'seed': 'zero'}\n", r"'seed' expects a int"),
        ("def get_config():\n    return 3\n", r"returned a int"),
    ],
)
def test_config_file_errors_are_one_line(tmp_path, body, message):
    path = tmp_path / "cfg.py"
    if body is not None:
        path.write_text(body)
    with pytest.raises(ConfigError, match=message) as info:
        parse_command_line([f"--config={path}"], get_config)
    assert "\n" not in str(info.value)


def test_unknown_override_on_a_config_file_is_an_error(tmp_path):
    path = write_config_file(tmp_path, "def get_config():\n    return {'seed': 1}\n")
    with pytest.raises(ConfigError, match="unknown config key 'sed'"):
        parse_command_line([f"--config={path}", "--config.sed=2"], get_config)


def test_a_value_that_is_not_a_path_still_reaches_get_config():
    config, _ = parse_command_line(["--config=small:variant"], get_config)
    assert config.variant == "small:variant"


def test_resume_keeps_every_earlier_record(tmp_path):
    first = ml_collections.ConfigDict({"seed": 3, "width": 8, "lr": float("nan")})
    jdl.write_run_record(str(tmp_path), first, ["--config.width=8"])
    run = strict_json(tmp_path / "run.json")
    assert run["previous"] == [] and run["config"]["width"] == 8
    assert strict_json(tmp_path / "config.json")["nonfinite"] == {"lr": "nan"}

    second = ml_collections.ConfigDict({"seed": 3, "width": 16, "lr": 0.1})
    jdl.write_run_record(str(tmp_path), second, ["--config.width=16"])
    jdl.write_run_record(str(tmp_path), {"seed": 3, "width": 32, "lr": 0.1}, ["--w=32"])
    assert strict_json(tmp_path / "config.json") == {"seed": 3, "width": 32, "lr": 0.1}
    run = strict_json(tmp_path / "run.json")
    assert run["argv"] == ["--w=32"] and run["config"]["width"] == 32
    assert [r["config"]["width"] for r in run["previous"]] == [8, 16]
    assert [r["argv"] for r in run["previous"]] == [["--config.width=8"], ["--config.width=16"]]
    assert all("previous" not in r for r in run["previous"])


def test_a_record_from_before_configs_were_kept_per_start_gets_its_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"width": 4}))
    (tmp_path / "run.json").write_text(json.dumps({"argv": ["old"]}))
    jdl.write_run_record(str(tmp_path), {"width": 5}, ["new"])
    run = strict_json(tmp_path / "run.json")
    assert run["previous"] == [{"argv": ["old"], "config": {"width": 4}}]
