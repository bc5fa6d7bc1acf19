"""The Tatoeba English-French loader: the pair format, the split by English sentence, the
character vocabularies and arrays, the default file, the download and the errors."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest

import jdl
from jdl.data import tatoeba

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tatoeba-eng-fra-5k.tsv"
ATTRIBUTION = "CC-BY 2.0 (France) Attribution: tatoeba.org #{} (CM) & #{} (Aiji)"
# Lines as in fra.txt: increasing English length, several translations of one sentence.
SMALL = [
    ("Go.", "Va !"),
    ("Go.", "Marche."),
    ("Hi.", "Salut !"),
    ("Run!", "Cours !"),
    ("Wait!", "Attends !"),
    ("Wait!", "Attendez !"),
    ("I see.", "Je vois."),
    ("Thanks.", "Merci."),
    ("I'm sad.", "Je suis triste."),
    ("Be quiet.", "Sois calme !"),
]


def line(english: str, french: str, number: int = 0) -> str:
    return f"{english}\t{french}\t{ATTRIBUTION.format(100 + number, 200 + number)}\n"


def write_pairs(path: Path, pairs=SMALL, extra: str = "") -> Path:
    path.write_text("".join(line(e, f, i) for i, (e, f) in enumerate(pairs)) + extra, "utf-8")
    return path


def many_pairs(n: int = 300) -> list[tuple[str, str]]:
    """`n` pairs over about n / 2 distinct English sentences (one or two translations each)."""
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "sun", "red", "big", "old", "sea", "tree"]
    french = {"cat": "chat", "dog": "chien", "sun": "soleil", "red": "rouge", "big": "grand"}
    french |= {"old": "vieux", "sea": "mer", "tree": "arbre"}
    pairs, seen = [], set()
    while len(pairs) < n:
        sentence = tuple(rng.choice(words, rng.integers(1, 4)))
        if sentence in seen:
            continue
        seen.add(sentence)
        english = " ".join(sentence) + "."
        translation = " ".join(french[w] for w in sentence)
        pairs.append((english, translation + "."))
        if len(seen) % 2:
            pairs.append((english, translation + " !"))
    return sorted(pairs[:n], key=lambda pair: len(pair[0]))


def test_reads_the_columns_in_file_order(tmp_path):
    pairs = tatoeba.read_tatoeba(write_pairs(tmp_path / "fra.txt"))
    assert [(p.english, p.french) for p in pairs] == SMALL
    assert pairs[0].attribution == ATTRIBUTION.format(100, 200)
    assert isinstance(pairs[0], tatoeba.Pair)


def test_windows_line_ends_and_a_byte_order_mark_are_accepted(tmp_path):
    path = tmp_path / "fra.txt"
    path.write_bytes("\ufeff".encode() + line("Go.", "Va !").replace("\n", "\r\n").encode())
    assert tatoeba.read_tatoeba(path)[0][:2] == ("Go.", "Va !")


def test_the_split_is_by_english_sentence_seeded_and_complete(tmp_path):
    path = write_pairs(tmp_path / "fra.txt", many_pairs())
    data = tatoeba.load_tatoeba(path, seed=3)
    splits = (data.train, data.validation, data.test)
    sentences = [{p.english for p in split} for split in splits]
    assert not (sentences[0] & sentences[1] or sentences[0] & sentences[2])
    assert not sentences[1] & sentences[2]
    assert sum(len(split) for split in splits) == 300  # every pair once
    all_sentences = len(set().union(*sentences))
    assert abs(len(sentences[0]) - 0.8 * all_sentences) <= 1
    assert abs(len(sentences[2]) - 0.1 * all_sentences) <= 1
    # The translations of a sentence stay together, in file order.
    by_sentence = tatoeba.references(data.test)
    full = tatoeba.references(tatoeba.read_tatoeba(path))
    assert all(full[english] == french for english, french in by_sentence.items())
    again = tatoeba.load_tatoeba(path, seed=3)
    assert again.test == data.test and again.train == data.train
    other = tatoeba.load_tatoeba(path, seed=4)
    assert {p.english for p in other.test} != sentences[2]


def test_max_pairs_keeps_the_shortest_english_sentences(tmp_path):
    shuffled = SMALL[::-1]  # longest first: the loader sorts by English length
    data = tatoeba.load_tatoeba(write_pairs(tmp_path / "f.txt", shuffled), max_pairs=3)
    kept = sorted((p.english, p.french) for p in data.train + data.validation + data.test)
    assert kept == sorted([("Hi.", "Salut !"), ("Go.", "Marche."), ("Go.", "Va !")])


def test_vocabularies_come_from_the_training_split_with_unknown_characters(tmp_path):
    data = tatoeba.load_tatoeba(write_pairs(tmp_path / "fra.txt", many_pairs()))
    assert data.source.symbols[:4] == ("<pad>", "<bos>", "<eos>", "<unk>")
    train_chars = {c for p in data.train for c in p.french}
    assert set(data.target.symbols[4:]) == train_chars
    assert data.target.encode("chat\u00e9")[-1] == tatoeba.UNK_ID
    ids = data.target.encode("chat.")
    assert data.target.decode([*ids, tatoeba.EOS_ID, 7, 7]) == "chat."
    assert data.target.decode([tatoeba.BOS_ID, tatoeba.UNK_ID]) == "\ufffd"


def test_teacher_forcing_arrays_and_length_filter(tmp_path):
    data = tatoeba.load_tatoeba(write_pairs(tmp_path / "fra.txt"), fractions=(1.0, 0.0, 0.0))
    arrays = tatoeba.encode_pairs(data.train, data.source, data.target, src_len=6, tgt_len=10)
    # English longer than 6 ("Thanks.", "I'm sad.", "Be quiet.") or French + <eos> over 10
    # ("Attendez !" has 10 characters) are left out.
    assert arrays["src"].shape == (6, 6) and arrays["tgt_in"].shape == (6, 10)
    assert data.source.decode(arrays["src"][0]) == "Go."
    assert arrays["tgt_in"][0, 0] == tatoeba.BOS_ID
    assert data.target.decode(arrays["tgt_out"][0]) == "Va !"
    np.testing.assert_array_equal(arrays["tgt_in"][0, 1:5], arrays["tgt_out"][0, :4])
    assert arrays["tgt_out"][0, 4] == tatoeba.EOS_ID and arrays["src"].dtype == np.int32
    src = tatoeba.encode_sentences(["Go.", "Hi."], data.source, 5)
    assert src.shape == (2, 5) and data.source.decode(src[1]) == "Hi."
    with pytest.raises(ValueError, match="longer than 2"):
        tatoeba.encode_sentences(["Go."], data.source, 2)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("Hello.\tBonjour.\n", r"line 3 has 2 tab-separated columns, expected 3"),
        ("Hello.\tBonjour.\tCC\textra\n", r"line 3 has 4 tab-separated columns"),
        ("\n", r"line 3 has 1 tab-separated columns"),
        (" \tBonjour.\tCC\n", r"line 3 has an empty English sentence"),
        ("Hello.\t\tCC\n", r"line 3 has an empty French sentence"),
    ],
)
def test_a_malformed_line_is_one_line_naming_file_and_line(tmp_path, bad, message):
    path = tmp_path / "fra.txt"
    path.write_text(line("Go.", "Va !") + line("Hi.", "Salut !") + bad + line("Run!", "Cours !"))
    with pytest.raises(tatoeba.TatoebaFormatError, match=message) as caught:
        jdl.data.load_tatoeba(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, jdl.UserError) and isinstance(caught.value, ValueError)


def test_bytes_that_are_not_utf8_and_an_empty_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(line("Go.", "Va !").encode() + "Hi.\tSalut, ça va\tCC\n".encode("latin-1"))
    with pytest.raises(tatoeba.TatoebaFormatError, match=r"line 2 is not UTF-8"):
        tatoeba.read_tatoeba(path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(tatoeba.TatoebaFormatError, match="holds no pairs"):
        tatoeba.read_tatoeba(tmp_path / "empty.txt")


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(jdl.data.DatasetUnavailableError) as caught:
        jdl.data.load_tatoeba(tmp_path / "absent.tsv")
    assert str(tmp_path / "absent.tsv") in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, jdl.UserError) and isinstance(caught.value, FileNotFoundError)


def test_bad_arguments(tmp_path):
    path = write_pairs(tmp_path / "fra.txt")
    with pytest.raises(ValueError, match="fractions"):
        tatoeba.load_tatoeba(path, fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        tatoeba.load_tatoeba(path, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="max_pairs"):
        tatoeba.load_tatoeba(path, max_pairs=-1)


# ----------------------------------------------------------------- default file, download


@pytest.fixture
def no_default_files(tmp_path, monkeypatch):
    """No shared copy, an empty home cache and JDL_DATA_DIR at tmp_path/data."""
    monkeypatch.setattr(tatoeba, "_SHARED_DIR", tmp_path / "no-shared")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JDL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data" / "tatoeba"


def test_the_default_file_is_the_shared_excerpt(monkeypatch):
    monkeypatch.delenv("JDL_DATA_DIR", raising=False)
    assert tatoeba.default_path() == SHARED
    digest = hashlib.sha256(SHARED.read_bytes()).hexdigest()
    assert digest.startswith("d952b56a") and digest.endswith("fb55a7")  # shared/data/README.md
    data = jdl.data.load_tatoeba(download=False)
    assert data.path == SHARED
    assert (len(data.train), len(data.validation), len(data.test)) == (4002, 491, 507)
    assert len(tatoeba.references(data.test)) == 260  # distinct English test sentences
    assert data.train[0][:2] == ("Go.", "Va !")


def test_jdl_data_dir_comes_first_and_the_full_corpus_before_the_excerpt(
    tmp_path, monkeypatch, no_default_files
):
    shared = tmp_path / "shared"
    shared.mkdir()
    write_pairs(shared / tatoeba.EXCERPT_FILE)
    monkeypatch.setattr(tatoeba, "_SHARED_DIR", shared)
    assert tatoeba.default_path() == shared / tatoeba.EXCERPT_FILE
    no_default_files.mkdir(parents=True)
    write_pairs(no_default_files / tatoeba.EXCERPT_FILE)
    assert tatoeba.default_path() == no_default_files / tatoeba.EXCERPT_FILE
    write_pairs(no_default_files / tatoeba.FULL_FILE)
    assert tatoeba.default_path() == no_default_files / tatoeba.FULL_FILE


def _zip(path: Path, members: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_download_checks_every_line_and_writes_atomically(
    tmp_path, monkeypatch, no_default_files, http_server
):
    served = tmp_path / "served"
    served.mkdir()
    text = "".join(line(e, f, i) for i, (e, f) in enumerate(SMALL))
    _zip(served / "fra-eng.zip", {"_about.txt": "about", "fra.txt": text})
    base = http_server(served)
    monkeypatch.setattr(tatoeba, "ARCHIVE_URLS", (base + "missing.zip", base + "fra-eng.zip"))
    data = jdl.data.load_tatoeba()
    target = no_default_files / tatoeba.FULL_FILE
    assert data.path == target and target.read_text("utf-8") == text
    assert sorted(p.name for p in no_default_files.iterdir()) == [tatoeba.FULL_FILE]
    assert len(data.train + data.validation + data.test) == len(SMALL)
    # The next load reads the file without a server.
    monkeypatch.setattr(tatoeba, "ARCHIVE_URLS", ())
    assert jdl.data.load_tatoeba().path == target


@pytest.mark.parametrize(
    "members, message",
    [
        ({"fra.txt": line("Go.", "Va !") + "Hi.\tSalut !\n"}, r"fra.txt of http.* line 2 has 2"),
        ({"deu.txt": line("Go.", "Geh.")}, r"has no fra.txt"),
        (None, r"not a readable zip archive"),
    ],
)
def test_a_wrong_download_leaves_nothing_behind(
    tmp_path, monkeypatch, no_default_files, http_server, members, message
):
    served = tmp_path / "served"
    served.mkdir()
    if members is None:
        (served / "fra-eng.zip").write_text("<html>not here</html>")
    else:
        _zip(served / "fra-eng.zip", members)
    monkeypatch.setattr(tatoeba, "ARCHIVE_URLS", (http_server(served) + "fra-eng.zip",))
    with pytest.raises(tatoeba.TatoebaFormatError, match=message) as caught:
        jdl.data.load_tatoeba()
    assert "\n" not in str(caught.value)
    assert list(no_default_files.iterdir()) == []


def test_offline_says_in_one_line_where_to_put_the_file(
    tmp_path, monkeypatch, no_default_files, http_server
):
    monkeypatch.setattr(tatoeba, "ARCHIVE_URLS", (http_server(tmp_path) + "missing.zip",))
    for download, why in ((True, "download failed"), (False, "download disabled")):
        with pytest.raises(jdl.data.DatasetUnavailableError) as caught:
            jdl.data.load_tatoeba(download=download)
        message = str(caught.value)
        assert why in message and "\n" not in message and isinstance(caught.value, jdl.UserError)
        assert str(no_default_files / tatoeba.FULL_FILE) in message and "JDL_DATA_DIR" in message
