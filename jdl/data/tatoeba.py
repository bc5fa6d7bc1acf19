"""English-French sentence pairs from Tatoeba, for machine translation.

Format: Tatoeba's tab-separated pair export as distributed by manythings.org/anki
(`fra-eng.zip`, member `fra.txt`): one pair per line, UTF-8,
`English \\t French \\t attribution`, e.g.
`Go.\\tVa !\\tCC-BY 2.0 (France) Attribution: tatoeba.org #2877272 (CM) & #1158250 (Wittydev)`.
The sentences are CC-BY 2.0 FR; each line carries its attribution, kept in `Pair.attribution`.
The file lists pairs by increasing English length; an English sentence with several French
translations has one line per translation.

Where the file is looked up when no `path` is given, first match wins: `$JDL_DATA_DIR/tatoeba`
(when the variable is set), the offline copy `shared/data` beside this checkout, then
`~/.cache/jdl/tatoeba`; in each, the full corpus `tatoeba-eng-fra.tsv` before the 5,000-pair
excerpt `tatoeba-eng-fra-5k.tsv` (the full file's 5,000 shortest pairs, in its
order). When none exists, `fra-eng.zip` is downloaded and its `fra.txt` is written to
`tatoeba-eng-fra.tsv` in `$JDL_DATA_DIR/tatoeba` (or `~/.cache/jdl/tatoeba`). The archive is
rebuilt by its publisher as Tatoeba grows, so no fixed checksum exists; instead every line is
parsed with the same strict rules as a local file before the result is renamed into place,
so the file is either complete and well-formed or absent.

Choices:
- `max_pairs` keeps the first pairs after a stable sort by English length (the file order
  already is): `max_pairs=5000` on the full corpus gives the excerpt.
- The split is by English sentence: all translations of a sentence are in one split, so no
  English sentence is in two splits. The distinct sentences, sorted, are permuted by `seed`
  and cut into `fractions` (default 80/10/10) of train / validation / test
  (`jdl.data.cmudict.split_words`).
- Vocabularies are character-level, one per language, built from the training split only;
  characters never seen in training map to `<unk>`. Ids 0-3 are `<pad>`, `<bos>`, `<eos>`,
  `<unk>` (0-2 as `jdl.models.seq2seq` expects).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jdl.data import download as downloads
from jdl.data.cmudict import split_words
from jdl.data.download import DatasetUnavailableError
from jdl.errors import UserError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = (PAD, BOS, EOS, UNK)

FULL_FILE = "tatoeba-eng-fra.tsv"
EXCERPT_FILE = "tatoeba-eng-fra-5k.tsv"
ARCHIVE_URLS: tuple[str, ...] = ("https://www.manythings.org/anki/fra-eng.zip",)
ARCHIVE_MEMBER = "fra.txt"
DOWNLOAD_TIMEOUT_S = 60.0
# The publisher refuses urllib's default agent; any ordinary one is accepted.
_USER_AGENT = "Mozilla/5.0 (compatible; jdl dataset loader)"
_SHARED_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


class TatoebaFormatError(UserError, ValueError):
    """A pair file has a line that is not `English \\t French \\t attribution`."""


class Pair(NamedTuple):
    """One translation: `english`, `french` (stripped of surrounding spaces), `attribution`."""

    english: str
    french: str
    attribution: str


class TranslationVocab(NamedTuple):
    """Characters <-> ids; ids 0-3 are `<pad>`, `<bos>`, `<eos>`, `<unk>`.

    Fields: `symbols`, a tuple whose position i holds the character of id i.
    """

    symbols: tuple[str, ...]

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> TranslationVocab:
        """The specials followed by the distinct characters of `texts`, sorted."""
        return cls(SPECIALS + tuple(sorted({char for text in texts for char in text})))

    @property
    def size(self) -> int:
        return len(self.symbols)

    def encode(self, text: str) -> list[int]:
        """One id per character; characters outside the vocabulary become `<unk>`."""
        index = self._index()
        return [index.get(char, UNK_ID) for char in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, stopping at the first `<eos>`; `<pad>`, `<bos>` are skipped.

        `<unk>` decodes to U+FFFD (the replacement character).
        """
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS_ID:
                break
            if i == UNK_ID:
                out.append("\ufffd")
            elif i not in (PAD_ID, BOS_ID):
                out.append(self.symbols[i])
        return "".join(out)

    def _index(self) -> dict[str, int]:
        return {symbol: i for i, symbol in enumerate(self.symbols) if i >= len(SPECIALS)}


class TranslationData(NamedTuple):
    """Split pairs with their vocabularies (see `load_tatoeba`).

    Fields: `train`, `validation`, `test` (lists of `Pair`), `source` and `target`
    (`TranslationVocab`s of the training English and French), `path` (the file read).
    """

    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]
    source: TranslationVocab
    target: TranslationVocab
    path: Path


def read_tatoeba(path: str | os.PathLike[str]) -> list[Pair]:
    """Every pair of a Tatoeba tab-separated file, in file order.

    Raises:
      DatasetUnavailableError: no file at `path`.
      TatoebaFormatError: a line without exactly three tab-separated columns, an empty
        English or French sentence, bytes that are not UTF-8, or no line at all.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetUnavailableError(
            f"no Tatoeba pair file at {path}; put an English\\tFrench\\tattribution file there "
            f"(fra.txt of {ARCHIVE_URLS[0]}) or pass path= to one"
        )
    return _read_pairs(path, str(path))


def _read_pairs(path: Path, shown: str) -> list[Pair]:
    """The pairs of `path`; messages name the file as `shown`."""
    pairs = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            pairs.append(_parse_line(raw, number, shown))
    if not pairs:
        raise TatoebaFormatError(
            f"{shown} holds no pairs; pass an English\\tFrench\\tattribution file"
        )
    return pairs


def _parse_line(raw: bytes, number: int, shown: str) -> Pair:
    where = f"{shown} line {number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TatoebaFormatError(
            f"{where} is not UTF-8 text; pass the file as exported (UTF-8)"
        ) from None
    if number == 1:
        line = line.removeprefix("\ufeff")
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 3:
        raise TatoebaFormatError(
            f"{where} has {len(fields)} tab-separated columns, expected 3 "
            "(English, French, attribution); fix or remove the line"
        )
    english, french = fields[0].strip(), fields[1].strip()
    for language, sentence in (("English", english), ("French", french)):
        if not sentence:
            raise TatoebaFormatError(
                f"{where} has an empty {language} sentence; fix or remove the line"
            )
    return Pair(english, french, fields[2].strip())


def default_path() -> Path | None:
    """The pair file `load_tatoeba` reads when no path is given, or None (see the module doc)."""
    directories = []
    if os.environ.get("JDL_DATA_DIR"):
        directories.append(downloads.default_data_dir("tatoeba"))
    directories += [_SHARED_DIR, Path.home() / ".cache" / "jdl" / "tatoeba"]
    for directory in directories:
        for name in (FULL_FILE, EXCERPT_FILE):
            if (directory / name).is_file():
                return directory / name
    return None


def load_tatoeba(
    path: str | os.PathLike[str] | None = None,
    *,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    max_pairs: int = 0,
    download: bool = True,
) -> TranslationData:
    """Tatoeba's English-French pairs split by English sentence into train / validation / test.

    Args:
      path: a pair file; None looks in the default places and downloads the full corpus
        when none holds one (see the module docstring).
      fractions: (train, validation, test) shares of the distinct English sentences.
      seed: the split's seed; the same file and seed give the same split.
      max_pairs: > 0 keeps only the shortest pairs by English length (ties in file order).
      download: with `path=None`, fetch the corpus when no file is found.

    Returns:
      A `TranslationData`; each split in file order. No English sentence is in two splits.

    Raises:
      DatasetUnavailableError: no file, and none could be downloaded.
      TatoebaFormatError: a malformed line (the message names the file and line).
      ValueError: bad `fractions` or `max_pairs`.
    """
    if len(fractions) != 3:
        raise ValueError(f"fractions must be (train, validation, test), got {tuple(fractions)}")
    if not isinstance(max_pairs, int) or max_pairs < 0:
        raise ValueError(f"max_pairs must be an integer >= 0 (0: all), got {max_pairs!r}")
    if path is None:
        path = default_path() or _download_or_explain(download)
    path = Path(path)
    pairs = read_tatoeba(path)
    if max_pairs:
        pairs = sorted(pairs, key=lambda pair: len(pair.english))[:max_pairs]
    parts = split_words(list({pair.english for pair in pairs}), fractions, seed)
    split_of = {english: i for i, part in enumerate(parts) for english in part}
    train, validation, test = ([p for p in pairs if split_of[p.english] == i] for i in range(3))
    return TranslationData(
        train,
        validation,
        test,
        TranslationVocab.from_texts(p.english for p in train),
        TranslationVocab.from_texts(p.french for p in train),
        path,
    )


def encode_pairs(
    pairs: Sequence[Pair],
    source: TranslationVocab,
    target: TranslationVocab,
    *,
    src_len: int,
    tgt_len: int,
) -> dict[str, np.ndarray]:
    """Teacher-forcing arrays for a sequence-to-sequence model, one example per pair.

    Pairs whose English is longer than `src_len` characters or whose French is longer
    than `tgt_len - 1` (the target needs room for `<eos>`) are left out.

    Returns:
      {"src": int32 (N, S) English ids, 0-padded; "tgt_in": int32 (N, T) `<bos>` then the
      French ids; "tgt_out": int32 (N, T) the French ids then `<eos>`, 0-padded}.
    """
    src, tgt_in, tgt_out = [], [], []
    for pair in pairs:
        if len(pair.english) > src_len or len(pair.french) + 1 > tgt_len:
            continue
        ids = target.encode(pair.french)
        src.append(_pad(source.encode(pair.english), src_len))
        tgt_in.append(_pad([BOS_ID, *ids], tgt_len))
        tgt_out.append(_pad([*ids, EOS_ID], tgt_len))
    shape = lambda n: (len(src), n)  # noqa: E731 - keeps an empty result 2-D
    return {
        "src": np.asarray(src, np.int32).reshape(shape(src_len)),
        "tgt_in": np.asarray(tgt_in, np.int32).reshape(shape(tgt_len)),
        "tgt_out": np.asarray(tgt_out, np.int32).reshape(shape(tgt_len)),
    }


def encode_sentences(sentences: Sequence[str], vocab: TranslationVocab, length: int) -> np.ndarray:
    """int32 (N, length): each sentence's ids, 0-padded.

    Raises:
      ValueError: a sentence longer than `length` characters.
    """
    too_long = [s for s in sentences if len(s) > length]
    if too_long:
        raise ValueError(f"sentence {too_long[0]!r} is longer than {length} characters")
    rows = [_pad(vocab.encode(s), length) for s in sentences]
    return np.asarray(rows, np.int32).reshape(len(sentences), length)


def references(pairs: Sequence[Pair]) -> dict[str, list[str]]:
    """English sentence -> its French translations, both in file order (for multi-reference
    scoring: a Tatoeba sentence often has several correct translations)."""
    grouped: dict[str, list[str]] = {}
    for pair in pairs:
        grouped.setdefault(pair.english, []).append(pair.french)
    return grouped


def _pad(ids: list[int], length: int) -> list[int]:
    return ids + [PAD_ID] * (length - len(ids))


def _download_or_explain(download: bool) -> Path:
    """Downloads the corpus to the default target and returns its path, or raises."""
    target = downloads.default_data_dir("tatoeba") / FULL_FILE
    if not download:
        raise _unavailable(target, "download disabled")
    failure = _download(target)
    if failure:
        raise _unavailable(target, f"download failed: {failure}")
    return target


def _download(target: Path) -> str:
    """Fetches the archive, checks every line, renames into place; "" or why it failed.

    Raises:
      TatoebaFormatError: an archive arrived but is not the pair export (nothing is left
        under the target's directory).
    """
    reasons = []
    for url in ARCHIVE_URLS:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Beside the target, so the final rename is atomic.
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".download-"))
        try:
            archive = work / "archive.zip"
            try:
                _fetch(url, archive)
            except (OSError, http.client.HTTPException) as error:
                reasons.append(f"{url}: {error}")
                continue
            staged = work / FULL_FILE
            _extract(archive, staged, url)
            _read_pairs(staged, f"{ARCHIVE_MEMBER} of {url}")  # the rules of a local file
            os.replace(staged, target)
            return ""
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return "; ".join(reasons) or "no archive URL configured"


def _fetch(url: str, path: Path) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    with (
        urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
        path.open("wb") as out,
    ):
        shutil.copyfileobj(response, out, 1 << 20)


def _extract(archive: Path, destination: Path, url: str) -> None:
    """Writes the archive's `fra.txt` (only that member, by its fixed name) to `destination`."""
    try:
        with zipfile.ZipFile(archive) as zipped, zipped.open(ARCHIVE_MEMBER) as member:
            with destination.open("wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
    except KeyError:
        raise TatoebaFormatError(
            f"{url} has no {ARCHIVE_MEMBER}; check ARCHIVE_URLS (an Anki pair export is expected)"
        ) from None
    except (zipfile.BadZipFile, EOFError) as error:
        raise TatoebaFormatError(
            f"{url} is not a readable zip archive ({error}); check ARCHIVE_URLS"
        ) from None


def _unavailable(target: Path, why: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Tatoeba English-French pairs not found ({why}); put {ARCHIVE_MEMBER} from "
        f"{ARCHIVE_URLS[0]} at {target} (or {EXCERPT_FILE} beside it), pass path=..., or set "
        "JDL_DATA_DIR to a directory whose tatoeba/ holds it"
    )


__all__ = [
    "TranslationVocab",
    "DatasetUnavailableError",
    "Pair",
    "TatoebaFormatError",
    "TranslationData",
    "default_path",
    "encode_pairs",
    "encode_sentences",
    "load_tatoeba",
    "read_tatoeba",
    "references",
]
