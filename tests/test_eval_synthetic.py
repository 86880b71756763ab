"""The offline synthetic suite: deterministic, prefix-stable, disjoint splits, readable back as a TSV."""

import io

import pytest
from PIL import Image

from kimivl.eval.data import read_tsv
from kimivl.eval.errors import EvalError
from kimivl.eval.synthetic import CATEGORIES, COLOURS, WORDS, in_split, make_synthetic, write_synthetic


@pytest.fixture(scope="module")
def test_split():
    return make_synthetic(30, seed=0, split="test")


def test_deterministic_and_prefix_stable(test_split):
    again = make_synthetic(10, seed=0, split="test")
    assert again == test_split[:10]  # same bytes, and sample i does not depend on n
    other = make_synthetic(10, seed=1, split="test")
    assert [s.images for s in other] != [s.images for s in again]


def test_samples_are_well_formed(test_split):
    assert [s.category for s in test_split[:5]] == list(CATEGORIES)
    for s in test_split:
        with Image.open(io.BytesIO(s.images[0])) as im:
            assert im.format == "PNG" and 100 <= im.width <= 400 and im.height >= 32
        assert len(s.answers) == 1 and s.answers[0] and s.extra == {"split": "test"}
        if s.category == "box_colour":
            assert s.answers[0] in COLOURS and s.answers[0] not in s.question
        elif s.category == "box_text":
            colour = s.question.split(" box")[0].split()[-1]
            assert colour in COLOURS
        if s.category in ("word", "phrase", "box_text"):
            assert all(w.lower() in WORDS for w in s.answers[0].split())


def test_splits_hold_disjoint_strings(test_split):
    train = make_synthetic(60, seed=0, split="train")
    strings = {split: {w.lower() for s in samples if s.category != "box_colour" for w in s.answers[0].split()}
               for split, samples in (("test", test_split), ("train", train))}
    assert strings["test"] and strings["train"] and not strings["test"] & strings["train"]
    assert all(in_split(w, "test") for w in strings["test"]) and all(in_split(w, "train") for w in strings["train"])


def test_tsv_written_and_read_back(tmp_path, test_split):
    path = write_synthetic(tmp_path / "s.tsv", n=7, seed=0)
    assert read_tsv(path) == test_split[:7]
    with pytest.raises(EvalError, match="unknown split"):
        make_synthetic(3, split="dev")
