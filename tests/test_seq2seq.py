"""Encoder-decoder models: shapes, masks, cached vs uncached greedy decoding, beam search
against exhaustive search, the loss, error rates, and a tiny transformer that learns to
reverse sequences through `jdl.fit`."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from jdl.models import seq2seq
from jdl.models.seq2seq import EOS_ID, Seq2SeqGRU, Seq2SeqTransformer

SRC_VOCAB, TGT_VOCAB = 11, 9


def transformer(seed=0, **overrides):
    sizes = dict(max_len=10, embed_dim=16, num_heads=2, num_encoder_layers=2)
    sizes |= dict(num_decoder_layers=2) | overrides
    return Seq2SeqTransformer(SRC_VOCAB, TGT_VOCAB, rngs=nnx.Rngs(seed), **sizes)


def gru(seed=0):
    return Seq2SeqGRU(SRC_VOCAB, TGT_VOCAB, 8, 16, num_encoder_layers=2, rngs=nnx.Rngs(seed))


BUILDERS = {"transformer": transformer, "gru": gru}


def spread(model, scale=0.5, seed=1):
    """The model with noise added to every parameter, so that its outputs vary by token
    (an untrained model tends to repeat one token, which would make decoding tests blind)."""
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(tree, noisy))
    return model


def source(batch=5, length=7, seed=2):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, SRC_VOCAB, (batch, length))
    for row in range(batch):
        src[row, rng.integers(2, length + 1) :] = 0  # right padding of varying length
    return jnp.asarray(src, jnp.int32)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_teacher_forced_logits_shape_and_causality(name):
    model = BUILDERS[name]()
    src = source()
    tgt = jax.random.randint(jax.random.key(3), (5, 6), 1, TGT_VOCAB)
    logits = model(src, tgt)
    assert logits.shape == (5, 6, TGT_VOCAB) and logits.dtype == jnp.float32
    changed = model(src, tgt.at[:, 3].set((tgt[:, 3] + 1) % TGT_VOCAB))
    np.testing.assert_allclose(changed[:, :3], logits[:, :3], atol=1e-6)
    assert not np.allclose(changed[:, 3:], logits[:, 3:])


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_source_padding_is_ignored(name):
    model = BUILDERS[name]()
    src = source(length=6)
    tgt = jax.random.randint(jax.random.key(3), (5, 4), 1, TGT_VOCAB)
    padded = jnp.concatenate([src, jnp.zeros((5, 3), jnp.int32)], axis=1)
    np.testing.assert_allclose(model(padded, tgt), model(src, tgt), atol=1e-5)


def test_transformer_untied_head_and_length_check():
    tied, untied = transformer(), transformer(tie_embeddings=False)
    count = jdl.count_params
    assert count(nnx.state(untied, nnx.Param)) - count(nnx.state(tied, nnx.Param)) == 16 * TGT_VOCAB
    with pytest.raises(ValueError, match="target length 11 exceeds max_len 10"):
        tied(source(), jnp.ones((5, 11), jnp.int32))
    with pytest.raises(ValueError, match="not a multiple"):
        transformer(num_heads=3)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_cached_greedy_equals_uncached_argmax_decoding(name):
    model = spread(BUILDERS[name]())
    src = source(batch=8)
    cached = seq2seq.greedy_decode(model, src, 10)
    uncached = seq2seq.greedy_decode(model, src, 10, use_cache=False)
    assert cached.shape == (8, 10) and cached.dtype == jnp.int32
    np.testing.assert_array_equal(cached, uncached)
    # The test is not blind: the rows differ and use several tokens.
    assert len(np.unique(np.asarray(cached))) >= 3
    assert len({tuple(row) for row in np.asarray(cached).tolist()}) >= 3
    # After <eos> only padding follows.
    for row in np.asarray(cached):
        ends = np.flatnonzero(row == EOS_ID)
        if ends.size:
            assert (row[ends[0] + 1 :] == 0).all()


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_beam_size_one_is_greedy(name, alpha):
    model = spread(BUILDERS[name]())
    src = source(batch=8)
    greedy = seq2seq.greedy_decode(model, src, 10)
    beam = seq2seq.beam_search(model, src, 10, beam_size=1, alpha=alpha)
    np.testing.assert_array_equal(beam, greedy)


def hypotheses_logp(model, src_row, hypotheses, length):
    """Summed log-probability of each hypothesis (a token tuple) after <bos>, by teacher
    forcing, all in one batch: float (N,)."""
    tokens = np.zeros((len(hypotheses), length), np.int32)
    for i, hypothesis in enumerate(hypotheses):
        tokens[i, : len(hypothesis)] = hypothesis
    tgt_in = np.concatenate([np.full((len(tokens), 1), seq2seq.BOS_ID), tokens[:, :-1]], 1)
    src = jnp.repeat(src_row[None], len(tokens), axis=0)
    logits = model(src, jnp.asarray(tgt_in, jnp.int32))  # (N, L, V)
    # Decoding never outputs <pad> or <bos>: its softmax runs over the other tokens.
    logits = logits.at[..., 0].set(-jnp.inf).at[..., seq2seq.BOS_ID].set(-jnp.inf)
    logp = jax.nn.log_softmax(logits)
    picked = np.asarray(jnp.take_along_axis(logp, tokens[..., None], axis=-1))[..., 0]
    lengths = np.array([len(h) for h in hypotheses])
    # where(): padding picks the ruled-out <pad>, whose -inf must not meet a 0 weight.
    return np.where(np.arange(length)[None] < lengths[:, None], picked, 0.0).sum(axis=1)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_finds_the_exhaustive_best_normalised_hypothesis(alpha):
    """With a beam wider than every candidate set, beam search is exhaustive search over
    the hypotheses that end in <eos> within max_len, ranked by logp / length_penalty."""
    model = spread(transformer(), scale=0.8, seed=5)
    max_len, vocab = 3, TGT_VOCAB
    src = source(batch=3, seed=7)
    best = np.asarray(
        seq2seq.beam_search(model, src, max_len, beam_size=vocab**max_len, alpha=alpha)
    )
    model.eval()
    others = [t for t in range(vocab) if t not in (0, seq2seq.BOS_ID, EOS_ID)]
    hypotheses = [
        (*prefix, EOS_ID)
        for length in range(1, max_len + 1)
        for prefix in itertools.product(others, repeat=length - 1)
    ]
    penalty = np.array([float(seq2seq.length_penalty(len(h), alpha)) for h in hypotheses])
    for row in range(3):
        scores = hypotheses_logp(model, src[row], hypotheses, max_len) / penalty
        winner = hypotheses[int(np.argmax(scores))]
        assert tuple(best[row][: len(winner)].tolist()) == winner
        assert (best[row][len(winner) :] == 0).all()
    assert seq2seq.beam_search(model, src, max_len, beam_size=2).shape == (3, max_len)


def test_beam_search_rejects_bad_arguments():
    model = transformer()
    with pytest.raises(ValueError, match="beam_size must be >= 1"):
        seq2seq.beam_search(model, source(), 5, beam_size=0)
    with pytest.raises(ValueError, match="alpha must be >= 0"):
        seq2seq.beam_search(model, source(), 5, alpha=-1.0)


def test_loss_ignores_padding_and_smooths_labels():
    model = transformer()
    src = source(batch=2)
    batch = {
        "src": src,
        "tgt_in": jnp.asarray([[1, 4, 5, 0], [1, 6, 0, 0]], jnp.int32),
        "tgt_out": jnp.asarray([[4, 5, 2, 0], [6, 2, 0, 0]], jnp.int32),
    }
    out = seq2seq.seq2seq_loss()(model, batch)
    logp = jax.nn.log_softmax(model(src, batch["tgt_in"]))
    expected = [
        -(logp[0, 0, 4] + logp[0, 1, 5] + logp[0, 2, 2]) / 3,
        -(logp[1, 0, 6] + logp[1, 1, 2]) / 2,
    ]
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)
    assert out["token_accuracy"].shape == out["sequence_accuracy"].shape == (2,)
    smoothed = seq2seq.seq2seq_loss(label_smoothing=0.1)(model, batch)["loss"]
    assert not np.allclose(smoothed, out["loss"])


def test_edit_distance_and_error_rates_with_several_references():
    assert seq2seq.edit_distance("kitten", "sitting") == 3
    assert seq2seq.edit_distance([], ["A", "B"]) == 2
    predictions = [["HH", "AH", "L", "OW"], ["K", "AE", "T"], ["D", "AO"]]
    references = [
        [("HH", "EH", "L", "OW"), ("HH", "AH", "L", "OW")],  # matches the second: 0 edits
        [("K", "AE", "T", "S")],  # 1 edit over 4
        [("D", "AO", "G"), ("D", "AA", "G", "Z")],  # closest is the first: 1 edit over 3
    ]
    rates = seq2seq.error_rates(predictions, references)
    assert rates["phoneme_error_rate"] == pytest.approx(2 / 11)
    assert rates["word_error_rate"] == pytest.approx(2 / 3)
    assert seq2seq.strip_tokens([5, 0, 6, EOS_ID, 7]) == [5, 6]
    with pytest.raises(ValueError, match="as many predictions as references"):
        seq2seq.error_rates([["A"]], [])


def reversal_data(n, seed):
    """Random digit strings (ids 3..12, length 3-6) and their reversals."""
    rng = np.random.default_rng(seed)
    src = np.zeros((n, 6), np.int32)
    tgt_in = np.zeros((n, 7), np.int32)
    tgt_out = np.zeros((n, 7), np.int32)
    for i in range(n):
        seq = rng.integers(3, 13, rng.integers(3, 7))
        src[i, : len(seq)] = seq
        tgt_in[i, : len(seq) + 1] = [seq2seq.BOS_ID, *seq[::-1]]
        tgt_out[i, : len(seq) + 1] = [*seq[::-1], EOS_ID]
    return {"src": src, "tgt_in": tgt_in, "tgt_out": tgt_out}


def test_tiny_transformer_learns_to_reverse_sequences_with_fit():
    model = Seq2SeqTransformer(13, 13, 8, 32, 4, 1, 1, mlp_ratio=2, rngs=nnx.Rngs(0))
    tx, _ = jdl.make_optimizer("adam", learning_rate=3e-3)
    state = jdl.TrainState.create(model, tx, seed=0)
    result = jdl.fit(
        state,
        train_step=jdl.make_train_step(seq2seq.seq2seq_loss()),
        train_data=jdl.InMemoryData(reversal_data(4096, 0), batch_size=64, seed=0),
        num_steps=400,
        steps_per_dispatch=50,
        unroll=1,
        progress=False,
    )
    test = reversal_data(200, 1)
    predicted = np.asarray(seq2seq.greedy_decode(result.state.model(), test["src"], 7))
    exact = np.mean(np.all(predicted == test["tgt_out"], axis=1))
    assert exact >= 0.9, exact
    beam = np.asarray(seq2seq.beam_search(result.state.model(), test["src"], 7, beam_size=3))
    assert np.mean(np.all(beam == test["tgt_out"], axis=1)) >= 0.9


def test_decoding_in_batches_equals_decoding_all_rows_at_once():
    model = spread(transformer())
    src = np.asarray(source(batch=7))
    whole_greedy = np.asarray(seq2seq.greedy_decode(model, src, 10))
    whole_beam = np.asarray(seq2seq.beam_search(model, src, 10, beam_size=3, alpha=0.6))
    # 7 rows in batches of 3: the last batch is filled up and the filling dropped.
    greedy = seq2seq.decode_in_batches(model, src, 10, batch_size=3)
    beam = seq2seq.decode_in_batches(model, src, 10, batch_size=3, beam_size=3, alpha=0.6)
    assert greedy.shape == beam.shape == (7, 10)
    np.testing.assert_array_equal(greedy, whole_greedy)
    np.testing.assert_array_equal(beam, whole_beam)
    assert len(np.unique(whole_greedy)) >= 3  # not blind: the rows use several tokens
