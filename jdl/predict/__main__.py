"""`python -m jdl.predict`: batched inference with a trained workdir's model (see `jdl.predict`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from jdl import cli, deploy
from jdl.predict import PredictFileError, predict_with_progress, read_inputs


@cli.command
def main(argv: Sequence[str] | None = None) -> str:
    """`python -m jdl.predict`: writes the outputs and returns the output path."""
    parser = argparse.ArgumentParser(
        prog="python -m jdl.predict", description="Run a trained run's model on input files."
    )
    parser.add_argument("--workdir", required=True, help="a trained run's directory")
    parser.add_argument("--input", required=True, nargs="+", help=".npy, .npz or image files")
    parser.add_argument("--output", required=True, help="the .npy file to write")
    parser.add_argument("--step", default="latest", help="latest, best or a step number")
    parser.add_argument("--key", default=None, help="the array of an .npz file to use")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", default=None, help="fp32, bf16 or auto")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    options = parser.parse_args(argv)
    if not options.output.endswith(".npy"):
        raise PredictFileError(f"--output {options.output}: the output is a .npy file")
    try:
        shape, _ = deploy.input_spec(options.workdir)
    except deploy.ExportError:
        shape = None  # images then keep their own size and RGB channels
    x = read_inputs(options.input, shape, options.key)
    if shape is not None and x.shape[1:] != shape:
        raise PredictFileError(
            f"the input examples have shape {x.shape[1:]} but the model in {options.workdir} "
            f"takes {shape}"
        )
    step = int(options.step) if options.step.isdigit() else options.step
    model = deploy.load_model(options.workdir, step)
    outputs = predict_with_progress(
        model,
        x,
        batch_size=options.batch_size,
        precision=options.precision,
        progress=not options.no_progress,
    )
    os.makedirs(os.path.dirname(os.path.abspath(options.output)), exist_ok=True)
    np.save(options.output, outputs)
    print(f"wrote {options.output}: outputs {outputs.shape} for {len(x)} inputs", flush=True)
    return options.output


if __name__ == "__main__":
    main()
