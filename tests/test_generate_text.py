"""Text in, text out: nucleus sampling against a hand computation, greedy text = `transformers`.

The reference model is a tiny randomly initialised `transformers` GPT-2 saved locally
together with a byte-level BPE tokenizer trained here (nothing is downloaded), and read
back by `jdl.hf.load_pretrained(..., with_tokenizer=True)`.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jdl
from jdl import hf
from jdl.models.transformer import generate, generate_text, sample_logits

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"

# Probabilities of six tokens, in a shuffled order so that sorting matters.
PROBS = np.array([0.06, 0.40, 0.10, 0.25, 0.04, 0.15])
DRAWS = 40_000


def draw(key_seed: int, **options) -> np.ndarray:
    """Counts of each token over DRAWS independent draws from log(PROBS)."""
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (DRAWS, len(PROBS)))
    tokens = sample_logits(jax.random.PRNGKey(key_seed), logits, **options)
    return np.bincount(np.asarray(tokens), minlength=len(PROBS))


def assert_frequencies(counts: np.ndarray, want: np.ndarray) -> None:
    """Observed frequencies within 5 binomial standard deviations of `want`."""
    freq = counts / counts.sum()
    sigma = np.sqrt(np.maximum(want * (1 - want), 1e-12) / counts.sum())
    assert np.all(np.abs(freq - want) <= 5 * sigma + 1e-12), (freq, want)


@pytest.mark.parametrize(
    "top_p, nucleus",
    [
        # Sorted: 0.40 (token 1), 0.25 (3), 0.15 (5), 0.10 (2), 0.06 (0), 0.04 (4).
        (0.5, [1, 3]),  # 0.40 < 0.5, so the second token is needed: 0.65 >= 0.5
        (0.65, [1, 3]),  # exactly reached after two tokens (the mass before token 5 is 0.65)
        (0.75, [1, 3, 5]),
        (0.3, [1]),  # the most likely token alone already holds enough
        (0.95, [1, 3, 5, 2, 0]),
    ],
)
def test_top_p_samples_the_renormalised_nucleus(top_p, nucleus):
    counts = draw(0, top_p=top_p)
    want = np.zeros_like(PROBS)
    want[nucleus] = PROBS[nucleus] / PROBS[nucleus].sum()
    outside = np.setdiff1d(np.arange(len(PROBS)), nucleus)
    assert counts[outside].sum() == 0  # never a token outside the nucleus
    assert_frequencies(counts, want)


def test_top_p_after_temperature_and_top_k():
    # Temperature 2 flattens the distribution to p^(1/2), renormalised; then the nucleus.
    flat = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    order = np.argsort(-flat)
    before = np.cumsum(flat[order]) - flat[order]
    nucleus = order[before < 0.6]
    assert len(nucleus) == 3  # a nucleus of three at 0.6 (two at temperature 1)
    want = np.zeros_like(PROBS)
    want[nucleus] = flat[nucleus] / flat[nucleus].sum()
    assert_frequencies(draw(1, temperature=2.0, top_p=0.6), want)

    # top_k=2 first: the nucleus of the two survivors (0.40 and 0.25 renormalised: 0.615).
    counts = draw(2, top_k=2, top_p=0.6)
    assert counts[[0, 2, 3, 4, 5]].sum() == 0  # 0.615 >= 0.6: only token 1
    counts = draw(3, top_k=2, top_p=0.9)
    assert_frequencies(counts, np.array([0, 0.40, 0, 0.25, 0, 0]) / 0.65)


def test_top_p_one_and_none_sample_identically_and_greedy_wins():
    logits = jax.random.normal(jax.random.PRNGKey(0), (64, 50))
    key = jax.random.PRNGKey(1)
    plain = sample_logits(key, logits)
    np.testing.assert_array_equal(sample_logits(key, logits, top_p=1.0), plain)
    # Temperature 0 is greedy whatever top_p says.
    greedy = sample_logits(key, logits, temperature=0.0, top_p=0.2)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, axis=-1))


def test_generate_with_top_p_is_the_same_cached_or_recomputed():
    model = jdl.models.gpt_tiny(rngs=nnx.Rngs(0), max_len=32)
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
    key = jax.random.PRNGKey(7)
    cached = generate(model, key, prompt, 10, temperature=1.5, top_p=0.8)
    recomputed = generate(model, key, prompt, 10, temperature=1.5, top_p=0.8, use_cache=False)
    np.testing.assert_array_equal(cached, recomputed)
    # A traced top_p: another value reuses the compiled program and changes the samples.
    other = generate(model, key, prompt, 10, temperature=1.5, top_p=1e-6)
    greedy = generate(model, key, prompt, 10, temperature=0.0)
    np.testing.assert_array_equal(other, greedy)  # a tiny nucleus is the argmax alone
    assert not np.array_equal(cached, greedy)


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    """A tiny random GPT-2 and a 300-token BPE tokenizer in one directory, and the torch model."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    directory = tmp_path_factory.mktemp("gpt2_with_tokenizer")
    trained = tokenizers.ByteLevelBPETokenizer()
    trained.train(
        [str(SHAKESPEARE)], vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False
    )
    trained.save_model(str(directory))
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=2,
        vocab_size=300,
        n_positions=48,
        bos_token_id=0,
        eos_token_id=0,
    )
    reference = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than GPT-2's 0.02: clear argmaxes, varied text
        for parameter in reference.parameters():
            parameter.mul_(8.0)
    reference.save_pretrained(directory)
    return directory, reference


def test_greedy_text_equals_transformers_generate(gpt2_checkpoint):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory, reference = gpt2_checkpoint
    model, tokenizer = hf.load_pretrained(directory, with_tokenizer=True)
    reference_tokenizer = transformers.GPT2TokenizerFast(
        vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")
    )
    for prompt in ["ROMEO:\nWhat light", "First Citizen", "a"]:
        ids = torch.tensor([reference_tokenizer.encode(prompt)])
        with torch.no_grad():
            out = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=20,
                min_new_tokens=20,  # no early stop at end-of-text
                do_sample=False,
                pad_token_id=0,
            )
        want = reference_tokenizer.decode(out[0])
        got = generate_text(model, tokenizer, prompt, 20, temperature=0.0)
        assert got == want
        assert got.startswith(prompt) and len(out[0]) == len(ids[0]) + 20
        assert len(set(out[0, len(ids[0]) :].tolist())) > 3  # a varied continuation


class RecordingTokenizer:
    """A tokenizer that remembers the ids it last decoded."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, None

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        self.decoded = list(ids)
        return self.tokenizer.decode(ids)


def test_generate_text_slides_past_the_context_and_follows_the_seed(gpt2_checkpoint):
    directory, _ = gpt2_checkpoint
    model, tokenizer = hf.load_pretrained(directory, with_tokenizer=True)
    prompt = "KING HENRY:"
    recording = RecordingTokenizer(tokenizer)
    long = generate_text(model, recording, prompt, 80, temperature=1.0, top_p=0.9, seed=3)
    assert long.startswith(prompt)
    # Random weights emit bytes that are no UTF-8, so count the ids, not the text's tokens.
    assert len(recording.decoded) == len(tokenizer.encode(prompt)) + 80  # > max_len 48
    assert long == generate_text(model, tokenizer, prompt, 80, temperature=1.0, top_p=0.9, seed=3)
    assert long != generate_text(model, tokenizer, prompt, 80, temperature=1.0, top_p=0.9, seed=4)
    assert generate_text(model, tokenizer, prompt, 0) == prompt
    # Within one context, the sliding loop is exactly one `generate` call.
    ids = tokenizer.encode(prompt)
    direct = generate(model, jax.random.split(jax.random.PRNGKey(5))[1], ids[None], 12)
    assert generate_text(model, tokenizer, prompt, 12, seed=5) == tokenizer.decode(direct[0])


def test_generate_text_with_a_character_vocabulary():
    vocab = jdl.CharVocab.from_text("abcdefgh \n")
    model = jdl.models.gpt_tiny(rngs=nnx.Rngs(0), vocab_size=vocab.size, max_len=16)
    text = generate_text(model, vocab, "abc", 30, temperature=0.8, top_k=5, seed=1)
    assert text.startswith("abc") and len(text) == 33 and set(text) <= set("abcdefgh \n")


def test_generate_text_errors():
    vocab = jdl.CharVocab.from_text("abc")
    model = jdl.models.gpt_tiny(rngs=nnx.Rngs(0), vocab_size=2, max_len=16)
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_text(model, vocab, "", 3)
    with pytest.raises(ValueError, match="model has only 2 tokens"):
        generate_text(model, vocab, "abc", 3)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate_text(model, vocab, "ab", 3, top_p=1.5)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), 3, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate_text(model, vocab, "ab", -1)
