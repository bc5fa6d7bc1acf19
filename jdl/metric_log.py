"""Where metrics go: `metrics.jsonl`, TensorBoard event files, a progress bar, PNG curves.

Every record is a flat dict of scalars keyed "<split>/<name>" (e.g.
"train/loss", "eval/accuracy") plus "step". Only the writing process (process
0 in a multi-host run) writes files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from jdl.tensorboard import EventWriter

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


class MetricLogger:
    """Writes metric records to a workdir and shows progress on the console.

    Args:
      workdir: run directory; None writes no files (console only).
      total_steps: for the progress bar's ETA.
      start_step: the step a resumed run starts from. Records of later steps left
        by an interrupted earlier run are dropped, so the files read as one run.
      progress: show a tqdm progress bar with throughput and ETA.
      tensorboard: also write TensorBoard event files under workdir/tensorboard.
      enabled: False on non-writing processes: nothing is written or shown.
    """

    def __init__(
        self,
        workdir: str | None,
        *,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.workdir = workdir if enabled else None
        self._jsonl = None
        self._tb = None
        self._bar = None
        if self.workdir is not None:
            os.makedirs(self.workdir, exist_ok=True)
            path = os.path.join(self.workdir, METRICS_FILE)
            _drop_records_after(path, start_step)
            self._jsonl = open(path, "a", buffering=1)
            if tensorboard:
                self._tb = EventWriter(
                    os.path.join(self.workdir, "tensorboard"),
                    purge_step=start_step + 1 if start_step else None,
                )
        if enabled and progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records `metrics` (keys "<split>/<name>") at `step`."""
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({name: _to_float(value) for name, value in metrics.items()})
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in record.items():
                if name not in ("step", "time") and math.isfinite(value):
                    self._tb.scalar(name, value, int(step))

    def image(self, name: str, image: ArrayLike, step: int, *, rescale: bool = False) -> None:
        """Writes `image` to TensorBoard's image dashboard under `name` at `step`.

        Args:
          name: the tag, e.g. "eval/confusion_matrix" or "samples/grid".
          image: an array of shape (H, W) or (H, W, C), C in 1..4 (grey, grey+alpha,
            RGB, RGBA): uint8 as it is, floats read as [0, 1] (clipped), other integers in
            [0, 255], bool as black/white. Several images: arrange them in one grid.
          step: the training step it belongs to.
          rescale: map the array's own [min, max] to the full range first (heatmaps,
            counts).

        Does nothing on non-writing processes or without TensorBoard files
        (`tensorboard=False` or no workdir).

        Raises:
          jdl.tensorboard.TensorBoardValueError: another shape, dtype or non-finite values.
        """
        if self._tb is not None:
            self._tb.image(name, np.asarray(image), int(step), rescale=rescale)

    def histogram(self, name: str, values: ArrayLike, step: int, *, bins: int | str = 30) -> None:
        """Writes a histogram of `values` (any array, e.g. a layer's weights) under `name`.

        The histogram counts the finite entries (NaN and infinities are left out; nothing
        is written when none is finite) in `bins` equal buckets from their minimum to
        their maximum (`bins` as in `np.histogram`, e.g. 30 or "auto"). Does nothing on
        non-writing processes or without TensorBoard files.
        """
        if self._tb is not None:
            self._tb.histogram(name, np.asarray(values), int(step), bins=bins)

    def advance(self, steps: int, *, samples_per_second: float, loss: float | None) -> None:
        """Moves the progress bar by `steps` and shows throughput and the latest loss."""
        if self._bar is None:
            return
        postfix = {"samples/s": f"{samples_per_second:,.0f}"}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(steps)

    def message(self, text: str) -> None:
        """Prints one line without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        """Closes the progress bar and flushes and closes the metric and event files."""
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_metrics(path: str) -> list[dict]:
    """The records of a `metrics.jsonl` file, skipping a torn last line."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return records


def plot_curves(workdir: str, *, output: str | None = None) -> str | None:
    """Plots train and eval curves of every metric in `workdir/metrics.jsonl` to a PNG.

    One panel per metric name, train and eval on the same axes, step on x.

    Returns:
      The PNG path, or None when there is nothing to plot.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    records = read_metrics(path)
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for record in records:
        for key, value in record.items():
            if "/" not in key or value is None:
                continue
            split, name = key.split("/", 1)
            series.setdefault(name, {}).setdefault(split, []).append((record["step"], value))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(series)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for split, points in sorted(series[name].items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=split, marker="." if len(steps) < 30 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    output = output or os.path.join(workdir, CURVES_FILE)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def _drop_records_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for record in kept:
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)


def _to_float(value) -> float:
    return float(np.asarray(value))
