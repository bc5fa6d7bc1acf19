"""Every experiment runs end to end for two steps and ends with a FINAL json line."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys

import pytest

EXPERIMENTS = ["iris_mlp", "mnist_mlp", "mnist_cnn"]
OFFLINE_ARGS = {"mnist_mlp": ["--config.download=false"], "mnist_cnn": ["--config.download=false"]}


@pytest.fixture(autouse=True)
def _no_real_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "no-data"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_two_step_smoke_run(name, tmp_path, capsys):
    module = importlib.import_module(f"experiments.{name}")
    assert "python -m experiments." + name in module.__doc__  # the docstring is its README
    argv = [
        "--config.duration=2",
        "--config.warmup_steps=0",
        "--config.progress=false",
        "--config.compilation_cache=false",
        "--config.steps_per_dispatch=1",
        "--workdir",
        str(tmp_path / name),
    ]
    final = module.main(argv + OFFLINE_ARGS.get(name, []))
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("FINAL ")
    assert json.loads(last_line[len("FINAL ") :]) == final
    assert final["steps"] == 2 and 0.0 <= final["test_accuracy"] <= 1.0
    for produced in ("config.json", "run.json", "metrics.jsonl", "final.json", "checkpoints"):
        assert os.path.exists(tmp_path / name / produced), produced


def test_bad_config_key_is_one_clear_line_before_compiling(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.iris_mlp",
            "--config.learning_rat=0.1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "error: unknown config key 'learning_rat' (did you mean 'learning_rate'?)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.learning_rate=-1", "learning_rate=-1.0 must be > 0"),
        ("--config.batch_size=0", "batch_size=0 must be >= 1"),
        ("--config.duration=0 steps", "must be positive"),
    ],
)
def test_impossible_values_are_rejected(override, message, tmp_path):
    module = importlib.import_module("experiments.iris_mlp")
    with pytest.raises(SystemExit, match="^error: .*" + message):
        module.main([override, "--workdir", str(tmp_path)])


def test_overfitting_demo_smoke_run(tmp_path, capsys):
    from experiments import overfitting_demo

    assert "python -m experiments.overfitting_demo" in overfitting_demo.__doc__
    argv = [
        "--config.steps=20",
        "--config.eval_every=5",
        "--config.patience=1",
        "--config.hidden_sizes=(32,)",
        "--config.download=false",
        "--config.progress=false",
        "--workdir",
        str(tmp_path / "demo"),
    ]
    final = overfitting_demo.main(argv)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line[len("FINAL ") :]) == final
    for run in ("plain", "regularised"):
        assert 0.0 <= final[run]["test_accuracy"] <= 1.0
        assert final[run]["gap"] == pytest.approx(
            final[run]["train_accuracy"] - final[run]["test_accuracy"], abs=1e-3
        )
    assert final["plain"]["steps"] == 20 and final["regularised"]["steps"] <= 20
    assert os.path.exists(tmp_path / "demo" / "curves.png")


# --- The command line users expect: one-line errors that leave the workdir as it was. ---

TINY = [
    "--config.duration=2",
    "--config.warmup_steps=0",
    "--config.progress=false",
    "--config.compilation_cache=false",
    "--config.steps_per_dispatch=1",
]
MNIST = [*TINY, "--config.download=false", "--config.hidden_sizes=(8,)"]


def snapshot(path) -> dict[str, str] | None:
    """{relative path: sha256 of the content, or "dir"} under `path`; None if it is absent."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        return {".": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    listing = {}
    for root, dirs, files in os.walk(path):
        for name in dirs:
            listing[os.path.relpath(os.path.join(root, name), path)] = "dir"
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                listing[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return listing


def run_experiment(name, *args, env=None):
    """`python -m experiments.NAME ARGS` in a fresh process, without JDL_DEBUG."""
    environment = {k: v for k, v in os.environ.items() if k != "JDL_DEBUG"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", f"experiments.{name}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
    )


def train_mnist_mlp(workdir, *extra):
    from experiments import mnist_mlp

    return mnist_mlp.main([*MNIST, *extra, "--workdir", str(workdir)])


def corrupt_every_checkpoint(workdir) -> int:
    """Flips one byte in the middle of every file of every step folder; returns the count."""
    steps = [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
    assert steps
    for step in steps:
        for root, _, files in os.walk(step):
            for name in files:
                path = os.path.join(root, name)
                data = bytearray(open(path, "rb").read())
                if data:
                    data[len(data) // 2] ^= 0xFF
                    open(path, "wb").write(bytes(data))
    return len(steps)


class ImmutableDir:
    """A directory nobody may write into: chmod for a normal user; the immutable flag for
    root (which permission bits do not stop)."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        self.path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            subprocess.run(["chattr", "+i", str(self.path)], check=True)
        else:
            os.chmod(self.path, 0o555)
        assert not os.access(self.path, os.W_OK)
        return self.path

    def __exit__(self, *exc_info):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(self.path)], check=True)
        else:
            os.chmod(self.path, 0o755)


def prepare_error_case(case, tmp_path):
    """(command-line arguments, the workdir to compare, expected text of the error line)."""
    workdir = tmp_path / "run"
    if case == "optimizer":
        return ["--config.optimizer=adamm"], workdir, "did you mean 'adam'"
    if case == "schedule":
        return ["--config.schedule=cosin"], workdir, "did you mean 'cosine'"
    if case == "hidden_sizes":
        return ["--config.hidden_sizes=(16, 0)"], workdir, "config.hidden_sizes=(16, 0)"
    if case == "batch_size":
        return ["--config.batch_size=100000"], workdir, "larger than the 4000 training"
    if case == "learning_rate":
        return ["--config.learning_rate=inf"], workdir, "learning_rate=inf must be a finite"
    if case == "workdir_is_file":
        workdir.write_text("not a directory")
        return [], workdir, "is a file"
    if case == "workdir_under_file":
        (tmp_path / "file").write_text("not a directory")
        return [], tmp_path / "file" / "run", "is a file"
    if case == "workdir_read_only":
        return [], workdir, "not writable"
    if case == "restore_mismatch":
        train_mnist_mlp(workdir)
        return ["--config.hidden_sizes=(12,)"], workdir, "checkpoint"
    if case == "all_checkpoints_corrupt":
        train_mnist_mlp(workdir, "--config.checkpoint_every=1")
        assert corrupt_every_checkpoint(workdir) == 2
        return [], workdir, "checkpoint"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "optimizer",
        "schedule",
        "hidden_sizes",
        "batch_size",
        "learning_rate",
        "workdir_is_file",
        "workdir_under_file",
        "workdir_read_only",
        "restore_mismatch",
        "all_checkpoints_corrupt",
    ],
)
def test_user_errors_are_one_line_and_leave_the_workdir_unchanged(case, tmp_path):
    args, workdir, expected = prepare_error_case(case, tmp_path)
    before = snapshot(workdir)
    command = [*MNIST, *args, "--workdir", str(workdir)]
    if case == "workdir_read_only":
        with ImmutableDir(workdir):
            before = snapshot(workdir)
            result = run_experiment("mnist_mlp", *command)
    else:
        result = run_experiment("mnist_mlp", *command)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], result.stderr
    assert expected in errors[0], errors[0]
    assert "FINAL" not in result.stdout
    assert snapshot(workdir) == before


def test_debug_adds_the_traceback_to_the_one_line(tmp_path):
    result = run_experiment(
        "mnist_mlp",
        *MNIST,
        "--config.optimizer=adamm",
        "--workdir",
        str(tmp_path / "w"),
        env={"JDL_DEBUG": "1"},
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: config.optimizer='adamm'")


def test_help_prints_docstring_and_every_key_with_choices_then_exits_0():
    result = run_experiment("cifar10_resnet", "--help")
    assert result.returncode == 0, result.stderr
    from experiments import cifar10_resnet

    assert result.stdout.startswith(cifar10_resnet.__doc__.strip())
    assert re.search(
        r"--config.model +str, default 'resnet20'; one of: resnet20, resnet32, resnet56",
        result.stdout,
    )
    assert re.search(
        r"--config.optimizer +str, default 'nesterov'; one of: sgd, momentum", result.stdout
    )
    assert re.search(r"--config.schedule +str, default 'cosine'; one of: constant", result.stdout)
    assert re.search(
        r"--config.precision +str, default 'fp32'; one of: fp32, bf16, auto", result.stdout
    )
    assert re.search(r"--config.crop_padding +int, default 4\n", result.stdout)
    assert re.search(r"--config.init_from +str, default ''\n", result.stdout)


@pytest.mark.parametrize("name", ["charlm_lstm", "mnist1d_cnn", "distill_mnist"])
def test_every_experiment_answers_help(name, capsys):
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as info:
        module.main(["-h"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(module.__doc__.strip()) and "--config.seed " in out


def test_config_file_is_honoured_with_overrides_on_top(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(
        "from experiments.iris_mlp import get_config as iris\n\n"
        "def get_config(arg=None):\n"
        "    c = iris()\n"
        "    c.hidden_sizes = (int(arg or 5),)\n"
        "    c.learning_rate = 0.05\n"
        "    return c\n"
    )
    from experiments import iris_mlp

    iris_mlp.main(
        [*TINY, f"--config={path}:7", "--config.seed=4", "--workdir", str(tmp_path / "w")]
    )
    recorded = json.loads((tmp_path / "w" / "config.json").read_text())
    assert recorded["hidden_sizes"] == [7] and recorded["learning_rate"] == 0.05
    assert recorded["seed"] == 4
    with pytest.raises(SystemExit, match="error: --config=.*defines no get_config"):
        (tmp_path / "empty.py").write_text("x = 1\n")
        iris_mlp.main([f"--config={tmp_path / 'empty.py'}", "--workdir", str(tmp_path / "e")])
    assert not os.path.exists(tmp_path / "e")


def strict_json(path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(open(path).read(), parse_constant=refuse)


def final_line(capsys) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_rerun_of_a_finished_workdir_repeats_the_first_final_line(tmp_path, capsys):
    from experiments import iris_mlp

    argv = [*TINY, "--workdir", str(tmp_path / "w")]
    first = iris_mlp.main(argv)
    first_line = final_line(capsys)
    second = iris_mlp.main(argv)
    assert final_line(capsys) == first_line and second == first
    final = strict_json(tmp_path / "w" / "final.json")
    assert {k: final[k] for k in first} == first
    assert final["step"] == 2 and final["stopped_early"] is False
    assert {"train", "eval", "best"} <= set(final)
    assert "NaN" not in open(tmp_path / "w" / "final.json").read()


def test_resume_with_changed_settings_keeps_the_earlier_record(tmp_path):
    from experiments import iris_mlp

    workdir = tmp_path / "w"
    iris_mlp.main([*TINY, "--workdir", str(workdir)])
    iris_mlp.main([*TINY, "--config.duration=4", "--workdir", str(workdir)])
    assert strict_json(workdir / "config.json")["duration"] == "4"
    run = strict_json(workdir / "run.json")
    assert run["config"]["duration"] == "4"
    assert [r["config"]["duration"] for r in run["previous"]] == ["2"]
    assert strict_json(workdir / "final.json")["steps"] == 4


def saved_params(workdir, optimizer, config_overrides=()):
    """The parameters in the latest checkpoint of an iris_mlp run trained with `optimizer`."""
    import jax
    import numpy as np
    from flax import nnx

    import jdl
    from experiments import iris_mlp

    config = iris_mlp.get_config()
    dataset = iris_mlp.load_data(config)
    model = iris_mlp.build_model(config, dataset, nnx.Rngs(params=99))
    tx, _ = jdl.make_optimizer(optimizer, learning_rate=0.1)
    state = jdl.TrainState.create(model, tx, seed=99)
    checkpointer = jdl.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        restored = checkpointer.restore(state)
    finally:
        checkpointer.close()
    return restored.step, [np.asarray(x) for x in jax.tree.leaves(restored.state.params)]


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path):
    import numpy as np

    from experiments import iris_mlp

    run_a, run_b, fresh = tmp_path / "a", tmp_path / "b", tmp_path / "fresh"
    iris_mlp.main([*TINY, "--config.optimizer=adam", "--workdir", str(run_a)])
    # SGD at 1e-30 leaves float32 weights where they start: B must end on A's weights.
    sgd = [*TINY, "--config.optimizer=sgd", "--config.learning_rate=1e-30"]
    final_b = iris_mlp.main([*sgd, f"--config.init_from={run_a}:2", "--workdir", str(run_b)])
    iris_mlp.main([*sgd, "--workdir", str(fresh)])
    step_a, params_a = saved_params(run_a, "adam")
    step_b, params_b = saved_params(run_b, "sgd")
    _, params_fresh = saved_params(fresh, "sgd")
    assert step_a == 2 and step_b == 2 and final_b["steps"] == 2
    for a, b in zip(params_a, params_b, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    assert max(np.max(np.abs(a - f)) for a, f in zip(params_a, params_fresh, strict=True)) > 1e-3
    losses = [r["train/loss"] for r in jdl_read_metrics(run_b) if "train/loss" in r]
    assert losses and all(np.isfinite(losses))
    assert strict_json(run_b / "config.json")["init_from"] == f"{run_a}:2"


def jdl_read_metrics(workdir):
    import jdl

    return jdl.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def test_init_from_a_run_without_checkpoints_is_one_clear_error(tmp_path):
    from experiments import iris_mlp

    with pytest.raises(SystemExit, match=r"error: config.init_from=.*no checkpoints in"):
        iris_mlp.main(
            [*TINY, f"--config.init_from={tmp_path / 'nothing'}", "--workdir", str(tmp_path / "w")]
        )
    assert not os.path.exists(tmp_path / "w")


def test_fit_with_config_passes_the_shared_fields_to_fit(monkeypatch):
    import jdl
    from experiments import common

    config = common.base_config()
    config.precision, config.micro_batches, config.skip_nonfinite = "bf16", 2, True
    config.eval_every, config.log_every, config.checkpoint_every = 7, 3, 9
    config.max_to_keep, config.steps_per_dispatch, config.unroll = 4, 5, 0
    config.progress, config.profile_steps = False, (2, 3)
    steps = []
    monkeypatch.setattr(
        jdl, "make_train_step", lambda loss_fn, **kwargs: steps.append(kwargs) or "train"
    )
    monkeypatch.setattr(jdl, "make_eval_step", lambda loss_fn, **kwargs: ("eval", kwargs))
    monkeypatch.setattr(jdl, "fit", lambda state, **kwargs: (state, kwargs))
    run = common.Run(config, "w", "MESH", "RULES", 0.0)
    state, fitted = common.fit_with_config(
        config, "S", loss_fn=None, train_data="D", num_steps=11, workdir="w", run=run,
        best_metric="accuracy",
    )  # fmt: skip
    assert steps == [
        dict(
            lr_schedule=None, augment_fn=None, skip_nonfinite=True, precision="bf16",
            micro_batches=2,
        )
    ]  # fmt: skip
    assert state == "S" and fitted == dict(
        train_step="train", eval_step=("eval", {"precision": "bf16"}), train_data="D",
        num_steps=11, workdir="w", eval_every=7, log_every=3, checkpoint_every=9,
        max_to_keep=4, early_stopping_patience=0, steps_per_dispatch=5, unroll=True,
        progress=False, profile_steps=(2, 3), mesh="MESH", sharding_rules="RULES",
        run_config=config, best_metric="accuracy",
    )  # fmt: skip


def test_start_run_builds_the_mesh_for_the_fit_call(tmp_path):
    from experiments import common, iris_mlp

    argv = ["--config.mesh_shape=data:-1", "--config.batch_size=16", "--workdir", str(tmp_path)]
    run = common.start_run(argv, iris_mlp.get_config, "unused", common.check_config)
    assert dict(run.mesh.shape) == {"data": 8} and run.workdir == str(tmp_path)
    assert run.config.batch_size == 16 and run.sharding_rules is not None


@pytest.mark.parametrize(
    "name, override",
    [
        ("distill_mnist", "--config.mesh_shape=data:2"),
        ("prune_mnist", "--config.validation_fraction=0.1"),
        ("transfer_digits", "--config.optimizer=sgd"),
        ("quantize_mnist", "--config.num_processes=2"),
    ],
)
def test_shared_fields_an_experiment_cannot_honour_are_one_clear_error(name, override, tmp_path):
    module = importlib.import_module(f"experiments.{name}")
    with pytest.raises(SystemExit) as raised:
        module.main([override, "--workdir", str(tmp_path / "run")])
    message = str(raised.value).strip()
    key = override.split("=")[0].removeprefix("--")
    assert message.startswith(f"error: {key}=") and "is not supported" in message
    assert "leave it at" in message and "\n" not in message
    assert not (tmp_path / "run").exists()
