"""Hooks: periodic actions at chunk boundaries (user hooks, extra eval sets, predictions,
custom stopping, profiling) without changing what the fused chunks compute."""

from __future__ import annotations

import glob
import json

import jax
import numpy as np
import pytest
from support import blobs, mlp_state

import jdl
from jdl.hooks import EvalSet, Hook, HookError, Profile, SavePredictions, StopWhen

_LOSS = jdl.classification_loss()
_TRAIN_STEP = jdl.make_train_step(_LOSS)
_EVAL_STEP = jdl.make_eval_step(_LOSS)


def _fit(workdir=None, num_steps=30, **kwargs):
    options = dict(
        train_step=_TRAIN_STEP,
        train_data=jdl.InMemoryData(blobs(), batch_size=32, seed=0),
        num_steps=num_steps,
        log_every=10,
        workdir=None if workdir is None else str(workdir),
        steps_per_dispatch=5,
        progress=False,
    )
    options.update(kwargs)
    return jdl.fit(mlp_state(), **options)


def _params(result):
    return [np.asarray(x) for x in jax.tree.leaves(result.state.params)]


def test_a_user_hook_runs_at_its_steps_and_changes_nothing_computed():
    seen = []

    class Record(Hook):
        def __call__(self, context):
            seen.append((context.step, round(context.train_metrics["loss"], 6)))
            assert int(context.state.step) == context.step

    plain = _fit()
    hooked = _fit(hooks=[Record(every=7, at=(3,), at_end=True)])
    assert [step for step, _ in seen] == [3, 7, 14, 21, 28, 30]
    for a, b in zip(_params(plain), _params(hooked), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_function_hook_and_schedule_errors():
    steps = []
    _fit(num_steps=12, hooks=[Hook(every=4, fn=lambda context: steps.append(context.step))])
    assert steps == [4, 8, 12]
    with pytest.raises(HookError, match="every=N"):
        Hook(fn=print)
    with pytest.raises(HookError, match=">= 0"):
        Hook(every=-1)
    with pytest.raises(jdl.UserError, match="first <= last"):
        Profile((5, 2))


def test_an_extra_eval_set_logs_its_metrics(tmp_path):
    ood = blobs(n=90, seed=7)
    extra = EvalSet("ood", _EVAL_STEP, ood, every=10)
    result = _fit(tmp_path, hooks=[extra])
    assert [h["step"] for h in extra.history] == [10, 20, 30]
    expected = jdl.make_evaluator(_EVAL_STEP, 1000)(result.state, ood)
    assert extra.history[-1]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-7)
    records = jdl.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records if "ood/accuracy" in r] == [10, 20, 30]


def test_predictions_are_saved_at_their_steps(tmp_path):
    inputs = blobs(n=17, seed=3)["x"]
    hook = SavePredictions(inputs, every=15, transform=lambda y: y.argmax(-1))
    result = _fit(tmp_path, hooks=[hook])
    saved = sorted(glob.glob(str(tmp_path / "predictions" / "*.npy")))
    assert [p.rsplit("/", 1)[1] for p in saved] == ["step_15.npy", "step_30.npy"]
    last = np.load(tmp_path / "predictions" / "step_30.npy")
    np.testing.assert_array_equal(last, jdl.predict(result.state, inputs).argmax(-1))


def test_stop_when_ends_the_run_with_a_checkpoint_of_that_step(tmp_path):
    hook = StopWhen(lambda c: c.train_metrics["loss"] < 0.5, every=5, reason="loss below 0.5")
    result = _fit(tmp_path, num_steps=400, hooks=[hook], checkpoint_every=100)
    assert result.stopped_early and result.step < 400 and result.step % 5 == 0
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.latest_step() == result.step
    checkpointer.close()


def test_a_hook_error_stops_the_run_with_the_last_checkpoint_whole(tmp_path):
    def fail_at_25(context):
        if context.step == 25:
            raise RuntimeError("the hook broke")

    with pytest.raises(RuntimeError, match="the hook broke"):
        _fit(tmp_path, hooks=[Hook(every=5, fn=fail_at_25)], checkpoint_every=10)
    assert not (tmp_path / ".lock").exists()
    checkpointer = jdl.Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.all_steps()[-1] == 20
    assert checkpointer.restore(mlp_state()).step == 20  # whole and readable
    checkpointer.close()
    resumed = _fit(tmp_path)
    straight = _fit()
    for a, b in zip(_params(resumed), _params(straight), strict=True):
        np.testing.assert_array_equal(a, b)


def test_profile_steps_write_a_trace_and_change_no_result(tmp_path):
    traced = _fit(tmp_path, profile_steps=(11, 15))
    files = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert files, "no trace written"
    for a, b in zip(_params(traced), _params(_fit()), strict=True):
        np.testing.assert_array_equal(a, b)
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["step"] == 30


def test_experiments_take_profile_steps_from_the_config(tmp_path):
    from experiments import mnist_mlp

    mnist_mlp.main(
        [
            "--config.duration=20 steps",
            "--config.profile_steps=(5, 10)",
            "--config.download=false",
            "--config.progress=false",
            f"--workdir={tmp_path}",
        ]
    )
    assert glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    with pytest.raises(SystemExit, match="profile_steps"):
        mnist_mlp.main(["--config.profile_steps=(9, 3)", f"--workdir={tmp_path / 'bad'}"])


# --- fit's own periodic work is hooks: evaluation, best tracking, saved hook state -----

_CONSTANT_EVAL = lambda state, batch: {"const": jax.numpy.ones(batch["y"].shape)}  # noqa: E731


def test_an_eval_set_with_patience_stops_the_run_and_keeps_counting_across_a_resume(tmp_path):
    """The metric never improves after its first value (a tie is no improvement): with
    patience 2 the run stops two evaluations later — also when it was resumed between
    them, because the set's count is saved with the checkpoint."""
    ood = blobs(n=40, seed=5)

    def watched():
        return EvalSet("ood", _CONSTANT_EVAL, ood, every=5, best_metric="const", patience=2)

    straight = _fit(num_steps=40, hooks=[watched()])
    assert straight.stopped_early and straight.step == 15
    first = watched()
    _fit(tmp_path, num_steps=10, hooks=[first])
    assert [h["step"] for h in first.history] == [5, 10] and first.tracker.since_best == 1
    second = watched()
    resumed = _fit(tmp_path, num_steps=40, hooks=[second])
    assert resumed.stopped_early and resumed.step == 15
    assert [h["step"] for h in second.history] == [5, 10, 15]
    assert second.best["step"] == 5
    again = _fit(tmp_path, num_steps=40, hooks=[watched()])  # a stopped run is finished
    assert again.was_finished and again.step == 15 and again.stopped_early


def test_a_user_hook_state_is_saved_with_each_checkpoint_and_restored():
    class CountCalls(Hook):
        def __init__(self):
            super().__init__(every=5, name="count")
            self.calls = 0

        def __call__(self, context):
            self.calls += 1

        def state_dict(self):
            return {"calls": self.calls}

        def load_state_dict(self, saved):
            self.calls = saved["calls"]

    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        first = CountCalls()
        _fit(workdir, num_steps=10, hooks=[first])
        assert first.calls == 2
        second = CountCalls()
        _fit(workdir, num_steps=20, hooks=[second])
        assert second.calls == 4  # 2 restored + steps 15 and 20


def test_hooks_that_keep_state_need_distinct_names():
    ood = blobs(n=40, seed=5)
    with pytest.raises(HookError, match="'ood'"):
        _fit(hooks=[EvalSet("ood", _EVAL_STEP, ood, every=5), EvalSet("ood", _EVAL_STEP, ood)])
    with pytest.raises(HookError, match="'eval'"):
        _fit(eval_step=_EVAL_STEP, eval_data=ood, hooks=[EvalSet("eval", _EVAL_STEP, ood)])
    with pytest.raises(HookError, match="patience needs a best_metric"):
        EvalSet("ood", _EVAL_STEP, ood, patience=3)


def test_one_rule_of_best_for_the_loop_and_the_checkpointer(tmp_path):
    """A tie keeps the first step and a NaN is never best, in `BestTracker` and in what
    the checkpointer keeps and names best."""
    from jdl.checkpoint import BestTracker

    values = [0.5, 0.7, float("nan"), 0.7, 0.6]
    tracker = BestTracker("accuracy", "max")
    improved = [tracker.update(step, {"accuracy": v}) for step, v in enumerate(values, 1)]
    assert improved == [True, True, False, False, False]
    assert tracker.best["step"] == 2 and tracker.since_best == 3
    nan_first = BestTracker("loss", "min")
    assert not nan_first.update(1, {"loss": float("nan")}) and nan_first.best is None
    checkpointer = jdl.Checkpointer(tmp_path, max_to_keep=1, best_metric="accuracy")
    state = mlp_state()
    for step, value in enumerate(values, 1):
        checkpointer.save(step, state.params, metrics={"accuracy": value})
    checkpointer.wait()
    assert checkpointer.best_step() == tracker.best["step"]
    assert 2 in checkpointer.all_steps()
    checkpointer.close()


def test_checkpoints_of_the_older_run_layout_resume_with_their_eval_history(tmp_path):
    """Before hooks kept their own state, the main evaluation's history and best were
    the top level of the run item: such a checkpoint resumes with them."""
    eval_data = blobs(n=60, seed=9)
    options = dict(eval_step=_EVAL_STEP, eval_data=eval_data, eval_every=5, best_metric="accuracy")
    _fit(tmp_path, num_steps=10, **options)
    path = tmp_path / "checkpoints" / "10" / "manifest" / "metadata"
    manifest = json.loads(path.read_text())
    saved = manifest["run"]["hooks"]["eval"]
    manifest["run"] = {
        "best_tracker": saved["best_tracker"],
        "eval_history": saved["history"],
        "train_metrics": manifest["run"]["train_metrics"],
    }
    path.write_text(json.dumps(manifest))
    resumed = _fit(tmp_path, num_steps=20, **options)
    assert [e["step"] for e in resumed.eval_history] == [5, 10, 15, 20]
    straight = _fit(num_steps=20, **options)
    assert resumed.eval_history == straight.eval_history and resumed.best == straight.best
