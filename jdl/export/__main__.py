"""`python -m jdl.export`: one exported file from a trained workdir (see `jdl.export`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from jdl import cli, deploy


@cli.command
def main(argv: Sequence[str] | None = None) -> str:
    """Writes the export asked for on the command line; returns its path."""
    parser = argparse.ArgumentParser(
        prog="python -m jdl.export", description="Export a trained run's model to one file."
    )
    parser.add_argument("--workdir", required=True, help="a trained run's directory")
    parser.add_argument("--format", required=True, choices=deploy.EXPORT_FORMATS)
    parser.add_argument("--output", required=True, help="the file to write")
    parser.add_argument("--step", default="latest", help="latest, best or a step number")
    parser.add_argument("--input-shape", default=None, help="one example, e.g. 28,28,1")
    parser.add_argument("--input-dtype", default=None, help="e.g. float32 or int32")
    options = parser.parse_args(argv)
    shape = None
    if options.input_shape:
        try:
            shape = tuple(int(d) for d in options.input_shape.split(","))
        except ValueError:
            raise deploy.ExportError(
                f"--input-shape {options.input_shape!r}: give sizes like 28,28,1"
            ) from None
    step = int(options.step) if options.step.isdigit() else options.step
    path = deploy.export(
        options.workdir,
        options.output,
        format=options.format,
        step=step,
        input_shape=shape,
        input_dtype=options.input_dtype,
    )
    print(f"wrote {path} ({options.format}, {os.path.getsize(path) / 1e6:.2f} MB)", flush=True)
    return path


if __name__ == "__main__":
    main()
