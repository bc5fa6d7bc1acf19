"""benchmarks.soak: a short run prints one sample per segment and a consistent verdict."""

from __future__ import annotations

import os
import re

import jax.numpy as jnp

from benchmarks import soak

VERDICT = re.compile(
    r"SOAK (?P<verdict>PASS|FAIL) steps=(?P<steps>\d+) host_growth_mib=(?P<host>-?[\d.]+) "
    r"device_growth_mib=(?P<device>-?[\d.]+)"
)


def test_short_soak_samples_every_segment_and_passes(capsys):
    # A short run is all warm-up (imports, compiles): the growth limit here only checks
    # that the verdict follows the figures; the real check is the 20,000-step run.
    passed = soak.main(
        ["--steps", "200", "--every", "100", "--warmup", "100", "--no-workdir"]
        + ["--max-host-growth-mib", "512"]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [
        line.split() for line in lines if re.fullmatch(r"\s*\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+", line)
    ]
    assert [int(row[0]) for row in rows] == [100, 200]
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows)
    verdict = VERDICT.fullmatch(lines[-1])
    assert verdict, lines[-1]
    assert int(verdict["steps"]) == 200
    # The growth printed is the difference of the sampled rows (from step 100 to 200).
    host_growth = float(rows[-1][1]) - float(rows[0][1])
    assert abs(float(verdict["host"]) - host_growth) < 0.2
    assert float(verdict["device"]) == 0.0  # the same state and data arrays throughout
    assert passed is (verdict["verdict"] == "PASS") and passed


def test_host_rss_is_read_from_proc():
    assert 10 * soak.MIB < soak.host_rss_bytes() < 1 << 40


CHECKPOINT_LINE = re.compile(
    r"CHECKPOINT (?P<model>\S+) params=(?P<params>\d+) mib=(?P<mib>[\d.]+) save\+restore "
    r"off=(?P<off>[\d.]+) on=(?P<on>[\d.]+) ratio=(?P<ratio>[\d.]+)"
)


def test_checkpoint_overhead_times_both_models_with_and_without_checksums(capsys):
    assert soak.main(["--checkpoint-overhead", "--repeats", "1", "--mlp-hidden", "32"])
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split() for line in lines if re.search(r"\s(on|off)\s+[\d.]+\s+[\d.]+", line)]
    assert [(row[0], row[3]) for row in rows] == [
        ("mnist_cnn", "off"),
        ("mnist_cnn", "on"),
        ("mlp_1024x32x32", "off"),
        ("mlp_1024x32x32", "on"),
    ]
    loads = [line for line in lines if "load average" in line]
    assert [line.split(":")[0] for line in loads] == ["mnist_cnn", "mlp_1024x32x32"]
    assert all(re.search(r"load average [\d.]+/[\d.]+/[\d.]+ before", line) for line in loads)
    verdicts = [CHECKPOINT_LINE.fullmatch(line) for line in lines if line.startswith("CHECKPOINT")]
    assert [v["model"] for v in verdicts] == ["mnist_cnn", "mlp_1024x32x32"]
    assert int(verdicts[1]["params"]) == 1024 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    for verdict, (off, on) in zip(verdicts, [rows[0:2], rows[2:4]], strict=True):
        # The printed totals are the medians of save (call and wait) plus restore.
        assert abs(float(verdict["off"]) - float(off[5]) - float(off[6])) < 2e-4
        assert abs(float(verdict["on"]) - float(on[5]) - float(on[6])) < 2e-4
        ratio = float(verdict["on"]) / float(verdict["off"])
        assert abs(float(verdict["ratio"]) - ratio) < 1e-2


def test_checkpoint_overhead_takes_turns_at_going_first(tmp_path, monkeypatch):
    calls = []
    save = soak.jdl.Checkpointer.save

    def recording_save(self, step, state, **kwargs):
        calls.append(os.path.basename(self.directory))
        return save(self, step, state, **kwargs)

    monkeypatch.setattr(soak.jdl.Checkpointer, "save", recording_save)
    medians = soak.time_checkpoints({"w": jnp.ones(3)}, 3, str(tmp_path))
    assert calls == ["off", "on", "on", "off", "off", "on", "on", "off"]
    assert sorted(medians) == ["off", "on"] and all(m["save"] > 0 for m in medians.values())
