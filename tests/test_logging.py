"""Metric files: JSON lines, TensorBoard events read back by TensorBoard itself, curves."""

from __future__ import annotations

import json

import pytest

import jdl
from jdl.metric_log import MetricLogger


def _write_run(workdir, steps, start_step=0):
    logger = MetricLogger(
        str(workdir), total_steps=max(steps), start_step=start_step, progress=True
    )
    for step in steps:
        logger.write(step, {"train/loss": 1.0 / step, "train/accuracy": step / 100})
        logger.advance(10, samples_per_second=1234.0, loss=1.0 / step)
        if step % 20 == 0:
            logger.write(step, {"eval/loss": 2.0 / step, "eval/accuracy": step / 200})
    logger.close()


def test_jsonl_records(tmp_path):
    _write_run(tmp_path, [10, 20, 30])
    records = jdl.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in records] == [10, 20, 20, 30]
    assert records[0]["train/loss"] == pytest.approx(0.1)
    assert records[2]["eval/accuracy"] == pytest.approx(0.1)


def test_tensorboard_reader_sees_every_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_run(tmp_path, [10, 20, 30])
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "eval/loss", "eval/accuracy"} <= tags
    losses = accumulator.Scalars("train/loss")
    assert [e.step for e in losses] == [10, 20, 30]
    assert losses[1].value == pytest.approx(0.05)


def test_resumed_logger_drops_records_after_the_resume_step(tmp_path):
    _write_run(tmp_path, [10, 20, 30, 40])  # the run was killed after logging step 40 ...
    _write_run(tmp_path, [30, 40, 50], start_step=20)  # ... but resumed from step 20
    steps = [
        r["step"] for r in jdl.read_metrics(str(tmp_path / "metrics.jsonl")) if "train/loss" in r
    ]
    assert steps == [10, 20, 30, 40, 50]


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "train/loss": 0.5}) + "\n" + '{"step": 2, "tra')
    assert jdl.read_metrics(str(path)) == [{"step": 1, "train/loss": 0.5}]


def test_curves_png(tmp_path):
    _write_run(tmp_path, [10, 20, 30, 40])
    path = jdl.plot_curves(str(tmp_path))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_bar_shows_throughput(tmp_path, capsys):
    _write_run(tmp_path, [10, 20])
    err = capsys.readouterr().err
    assert "samples/s" in err and "1,234" in err


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricLogger(str(tmp_path / "run"), total_steps=10, enabled=False)
    logger.write(1, {"train/loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_resumed_run_purges_stale_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _write_run(tmp_path, [10, 20, 30, 40])
    _write_run(tmp_path, [30, 40, 50], start_step=20)
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    steps = [e.step for e in accumulator.Scalars("train/loss")]
    assert steps == [10, 20, 30, 40, 50]


def test_crc32c_known_value():
    from jdl.tensorboard import crc32c

    assert crc32c(b"123456789") == 0xE3069283  # the standard CRC-32C check value
