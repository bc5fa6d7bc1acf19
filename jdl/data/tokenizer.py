"""GPT-2 byte-level BPE tokenizers read from a local directory, with the `tokenizers` library.

A checkpoint directory (what `transformers`' `save_pretrained` writes, or what
`tokenizers.ByteLevelBPETokenizer.save_model` writes) holds either `tokenizer.json` (the
`tokenizers` library's own format, which records every setting) or the two files of the
original GPT-2 release, `vocab.json` (token -> id) and `merges.txt` (the BPE merges in
order). `load_tokenizer` reads `tokenizer.json` when it is there, else the pair, and builds
the same pipeline as `transformers`' `GPT2TokenizerFast`: GPT-2's regex splitting on
bytes mapped to printable characters, no prefix space, `<|endoftext|>` as a special token.

Byte-level BPE encodes any Unicode text and decodes it back exactly:
`decode(encode(text)) == text`.

    tokenizer = load_tokenizer("checkpoints/gpt2")
    ids = tokenizer.encode("Hello world")          # int32 (N,)
    text = tokenizer.decode(ids)
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jdl.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
# GPT-2's one special token: end of text, also its beginning-of-text and unknown token.
END_OF_TEXT = "<|endoftext|>"
# What a Hub download of a tokenizer fetches (whichever of them the repository has).
TOKENIZER_FILES = (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE, SPECIAL_TOKENS_FILE)


class TokenizerNotFoundError(UserError, FileNotFoundError):
    """A directory has neither `tokenizer.json` nor `vocab.json` with `merges.txt`."""


class TokenizerFormatError(UserError, ValueError):
    """A tokenizer file exists but cannot be read as a byte-level BPE tokenizer."""


class BPETokenizer:
    """A byte-level BPE tokenizer: text <-> int32 token ids.

    Wraps a `tokenizers.Tokenizer` (available as `.backend`). Encoding adds no special
    tokens of its own; `<|endoftext|>` written in the text becomes its single id.

    Attributes:
      vocab_size: the number of ids, special tokens included (size of a model's embedding).
      eos_token_id: the id of `<|endoftext|>`, or None when the vocabulary lacks it.
    """

    def __init__(self, backend):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = backend.token_to_id(END_OF_TEXT)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size}, eos_token_id={self.eos_token_id})"

    def encode(self, text: str) -> np.ndarray:
        """The ids of `text`: int32 (N,)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of each text (in parallel in the Rust library)."""
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(encoding.ids, np.int32) for encoding in encodings]

    def decode(
        self, ids: Sequence[int] | np.ndarray | jax.Array, *, skip_special_tokens: bool = False
    ) -> str:
        """The text of `ids` (any int sequence or 1-D array).

        Byte sequences that are not valid UTF-8 (a character cut in the middle) decode to
        U+FFFD, as in `transformers`.

        Raises:
          ValueError: an id outside `[0, vocab_size)`.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(
                f"token id {int(bad)} is outside the vocabulary [0, {self.vocab_size})"
            )
        return self.backend.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Writes `directory/tokenizer.json` (directory created if needed); returns its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path))
        return path


def has_tokenizer(directory: str | os.PathLike[str]) -> bool:
    """Whether `directory` holds `tokenizer.json`, or `vocab.json` and `merges.txt`."""
    directory = Path(directory)
    return (directory / TOKENIZER_FILE).is_file() or (
        (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file()
    )


def load_tokenizer(
    name_or_path: str | os.PathLike[str], *, revision: str | None = None
) -> BPETokenizer:
    """The byte-level BPE tokenizer stored in a directory (or a Hub repository).

    Args:
      name_or_path: a local directory with `tokenizer.json`, or with `vocab.json` and
        `merges.txt` (used when there is no `tokenizer.json`); or a Hub repository id,
        whose tokenizer files are downloaded with `huggingface_hub` when online.
      revision: the Hub branch, tag or commit (ignored for local directories).

    Raises:
      TokenizerNotFoundError: the directory has no tokenizer files, or does not exist
        and the name cannot be downloaded.
      TokenizerFormatError: a file is there but is not a readable tokenizer.
    """
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        directory = _download(str(name_or_path), revision)
    if (directory / TOKENIZER_FILE).is_file():
        return BPETokenizer(_read_tokenizer_json(directory / TOKENIZER_FILE))
    if (directory / VOCAB_FILE).is_file() and (directory / MERGES_FILE).is_file():
        return BPETokenizer(_from_vocab_and_merges(directory))
    raise TokenizerNotFoundError(
        f"{directory} has no {TOKENIZER_FILE} and no {VOCAB_FILE} + {MERGES_FILE}; "
        "pass the directory that holds the tokenizer files"
    )


def _read_tokenizer_json(path: Path):
    import tokenizers

    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust library raises plain Exception on bad files
        raise TokenizerFormatError(
            f"cannot read {path} as a tokenizer: {_first_line(error)}"
        ) from error


def _from_vocab_and_merges(directory: Path):
    """GPT-2's original files -> the pipeline `transformers`' GPT2TokenizerFast builds."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab_path, merges_path = directory / VOCAB_FILE, directory / MERGES_FILE
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
        merges = _read_merges(merges_path)
        backend = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=merges,
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
    except Exception as error:  # json, file or Rust errors: one message
        raise TokenizerFormatError(
            f"cannot read {vocab_path} and {merges_path} as GPT-2 BPE files: {_first_line(error)}"
        ) from error
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [token for token in _special_tokens(directory) if token in vocab]
    if specials:
        backend.add_special_tokens([AddedToken(token, special=True) for token in specials])
    return backend


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"line {number} is not two space-separated tokens: {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _special_tokens(directory: Path) -> list[str]:
    """`<|endoftext|>` plus the tokens named in `special_tokens_map.json`, if present."""
    tokens = [END_OF_TEXT]
    path = directory / SPECIAL_TOKENS_FILE
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            for value in json.load(f).values():
                for token in value if isinstance(value, list) else [value]:
                    content = token.get("content") if isinstance(token, dict) else token
                    if isinstance(content, str) and content not in tokens:
                        tokens.append(content)
    return tokens


def _download(repo_id: str, revision: str | None) -> Path:
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1 or "\\" in repo_id:
        raise TokenizerNotFoundError(f"tokenizer directory {repo_id} does not exist")
    try:
        import huggingface_hub

        return Path(
            huggingface_hub.snapshot_download(
                repo_id, revision=revision, allow_patterns=list(TOKENIZER_FILES)
            )
        )
    except Exception as error:  # offline, unknown repo, network: one message for people
        raise TokenizerNotFoundError(
            f"cannot download the tokenizer of {repo_id!r} from the Hugging Face Hub "
            f"({type(error).__name__}); go online or pass a local directory"
        ) from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
