"""Byte-level BPE tokenizers from a directory: exact round trips, `transformers`' own ids.

The tokenizer is trained here on tinyshakespeare with the `tokenizers` library (nothing is
downloaded) and saved in both formats: `tokenizer.json`, and GPT-2's `vocab.json` +
`merges.txt`. The reference is `transformers.GPT2TokenizerFast` on the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import jdl
from jdl import hf
from jdl.data.tokenizer import (
    BPETokenizer,
    TokenizerFormatError,
    TokenizerNotFoundError,
    has_tokenizer,
    load_tokenizer,
)

tokenizers = pytest.importorskip("tokenizers")

SHAKESPEARE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tinyshakespeare.txt"
VOCAB_SIZE = 400

TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "  leading spaces,\ttabs\n\n\nand blank lines  ",
    "Unicode: naïve café, Ελληνικά, 日本語, emoji 🙂🚀 and a combining e\u0301.",
    "def f(x):\n    return x ** 2  # code, too\n",
    "two documents<|endoftext|>joined by the end-of-text token",
    "",
    "'tis, 'll, 've, 're: GPT-2's contractions; numbers 1234567 and symbols $%^&*()",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Directories holding the same trained tokenizer: "json" (tokenizer.json) and "files"."""
    trained = tokenizers.ByteLevelBPETokenizer()
    trained.train(
        [str(SHAKESPEARE)],
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    as_json = tmp_path_factory.mktemp("tokenizer_json")
    trained.save(str(as_json / "tokenizer.json"))
    as_files = tmp_path_factory.mktemp("tokenizer_files")
    trained.save_model(str(as_files))
    return {"json": as_json, "files": as_files}


@pytest.mark.parametrize("form", ["json", "files"])
def test_round_trip_is_exact(tokenizer_dirs, form):
    tokenizer = load_tokenizer(tokenizer_dirs[form])
    assert isinstance(tokenizer, BPETokenizer)
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.eos_token_id == 0
    for text in TEXTS + [SHAKESPEARE.read_text()[:20_000]]:
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32
        assert tokenizer.decode(ids) == text
    # BPE merges at work: far fewer tokens than bytes on the training text's own style.
    sample = TEXTS[0]
    assert len(tokenizer.encode(sample)) < 0.7 * len(sample.encode())
    # The end-of-text marker in the text is one special token, not its characters.
    assert 0 in tokenizer.encode(TEXTS[4]).tolist()
    assert tokenizer.decode(tokenizer.encode(TEXTS[4]), skip_special_tokens=True) == (
        TEXTS[4].replace("<|endoftext|>", "")
    )


@pytest.mark.parametrize("form", ["json", "files"])
def test_ids_equal_transformers_gpt2_tokenizer_fast(tokenizer_dirs, form):
    transformers = pytest.importorskip("transformers")
    directory = tokenizer_dirs[form]
    if form == "json":
        reference = transformers.GPT2TokenizerFast(tokenizer_file=str(directory / "tokenizer.json"))
    else:
        reference = transformers.GPT2TokenizerFast(
            vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt")
        )
    tokenizer = load_tokenizer(directory)
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.eos_token_id == reference.eos_token_id
    texts = TEXTS + [SHAKESPEARE.read_text()[5_000:9_000]]
    for text in texts:
        want = reference.encode(text)
        np.testing.assert_array_equal(tokenizer.encode(text), want)
        assert tokenizer.decode(want) == reference.decode(want)
    batch = tokenizer.encode_batch(texts)
    assert [ids.tolist() for ids in batch] == [reference.encode(text) for text in texts]


def test_both_formats_give_the_same_ids_and_json_is_preferred(tokenizer_dirs, tmp_path):
    from_json = load_tokenizer(tokenizer_dirs["json"])
    from_files = load_tokenizer(tokenizer_dirs["files"])
    for text in TEXTS:
        np.testing.assert_array_equal(from_json.encode(text), from_files.encode(text))
    # With both present, tokenizer.json decides: a deliberately different one wins.
    both = tmp_path / "both"
    shutil.copytree(tokenizer_dirs["files"], both)
    other = tokenizers.ByteLevelBPETokenizer()
    other.train_from_iterator(["aaaa bbbb"] * 10, vocab_size=260, show_progress=False)
    other.save(str(both / "tokenizer.json"))
    assert load_tokenizer(both).vocab_size == other.get_vocab_size()
    # save() writes tokenizer.json that loads to the same tokenizer.
    saved = from_files.save(tmp_path / "saved")
    assert saved.name == "tokenizer.json"
    np.testing.assert_array_equal(
        load_tokenizer(tmp_path / "saved").encode(TEXTS[2]), from_files.encode(TEXTS[2])
    )


def test_missing_and_broken_files_are_user_errors(tokenizer_dirs, tmp_path):
    assert not has_tokenizer(tmp_path)
    with pytest.raises(TokenizerNotFoundError, match="no tokenizer.json") as caught:
        load_tokenizer(tmp_path)
    assert isinstance(caught.value, jdl.UserError) and isinstance(caught.value, FileNotFoundError)
    assert "\n" not in str(caught.value)
    with pytest.raises(TokenizerNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")

    broken_json = tmp_path / "broken_json"
    broken_json.mkdir()
    (broken_json / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerFormatError, match="cannot read") as caught:
        load_tokenizer(broken_json)
    assert isinstance(caught.value, jdl.UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)

    broken_merges = tmp_path / "broken_merges"
    shutil.copytree(tokenizer_dirs["files"], broken_merges)
    with open(broken_merges / "merges.txt", "a") as f:
        f.write("one two three\n")
    with pytest.raises(TokenizerFormatError, match="line .* is not two"):
        load_tokenizer(broken_merges)

    tokenizer = load_tokenizer(tokenizer_dirs["json"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([1, VOCAB_SIZE])


def test_load_pretrained_returns_the_checkpoints_tokenizer(tokenizer_dirs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB_SIZE, n_positions=8
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)

    # Without tokenizer files: the model alone, or (model, None) when asked.
    assert isinstance(hf.load_pretrained(tmp_path), jdl.models.GPT)
    model, tokenizer = hf.load_pretrained(tmp_path, with_tokenizer=True)
    assert isinstance(model, jdl.models.GPT) and tokenizer is None

    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer_dirs["files"] / name, tmp_path / name)
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    model, tokenizer = hf.load_pretrained(tmp_path, with_tokenizer=True)
    assert isinstance(model, jdl.models.GPT)
    assert tokenizer.vocab_size == model.vocab_size == VOCAB_SIZE
    assert tokenizer.decode(tokenizer.encode(TEXTS[0])) == TEXTS[0]
    assert isinstance(hf.load_pretrained(tmp_path), jdl.models.GPT)  # the old contract holds
