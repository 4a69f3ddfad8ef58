"""Reading a user's data file with Hugging Face ``datasets``: JSONL, JSON, CSV or Parquet, local only.

Errors say which file and, for JSON Lines, which line: ``datasets`` reports a bad line as an Arrow
parse error without a line number, so each line is checked with ``json.loads`` first.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.io.files import json_lines
from lorakit.tasks.shipped_data import BUILTIN_DATA, builtin_data_file

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_records(path: str, flag: str = "--data") -> list[dict]:
    """All records of ``path`` as dicts (column -> value). A built-in data name (tasks/shipped_data.py)
    that is not also a file name is written out first and read the same way."""
    file = Path(path)
    if not file.exists() and path in BUILTIN_DATA:
        file = builtin_data_file(path)
    if not file.exists():
        raise LoraError(f"{flag} {path}: no such file; pass a local JSONL, JSON, CSV or Parquet file "
                        f"(or a built-in data set: {', '.join(BUILTIN_DATA)})")
    if file.is_dir():
        raise LoraError(f"{flag} {path} is a folder; pass one JSONL, JSON, CSV or Parquet file")
    suffix = file.suffix.lower()
    if suffix not in READERS:
        raise LoraError(f"{flag} {path}: unknown extension {suffix or '(none)'!r}; lorakit reads "
                        f"{', '.join(READERS)} (rename the file or convert it)")
    if suffix == ".jsonl":
        _check_json_lines(file)
    elif suffix == ".json":
        _check_json(file)
    import datasets  # deferred: heavy optional dependency
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="lorakit-datasets-") as cache:   # no cache left behind
        try:
            table = datasets.load_dataset(READERS[suffix], data_files=str(file), split="train",
                                          cache_dir=cache, keep_in_memory=True)
        except Exception as err:               # pyarrow / pandas errors of many kinds
            raise LoraError(f"{flag} {path} could not be read as {suffix[1:]}: "
                            f"{str(err).splitlines()[0][:200]}") from None
        records = table.to_list()
    if not records:
        raise LoraError(f"{flag} {path} holds no records; it must have at least one example")
    return records


def _check_json_lines(file: Path) -> None:
    example = '{"prompt": ..., "completion": ...}'
    if not sum(1 for _ in json_lines(file, example)):     # reads every line: each is checked
        raise LoraError(f"--data {file} holds no records (the file is empty); add examples")


def _check_json(file: Path) -> None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        lines = "a .jsonl file (one object per line)" if err.lineno > 1 else "a JSON array"
        raise LoraError(f"{file}:{err.lineno}: not valid JSON ({err.msg}); a .json file holds one "
                        f"array of records; for one record per line use {lines}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise LoraError(f"{file} must hold a JSON array of objects (records); found "
                        f"{type(data).__name__}")
    if not data:
        raise LoraError(f"--data {file} holds no records (an empty array); add examples")


def split_validation(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random ``fraction`` of the records (at least one, when fraction > 0) held out."""
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(records)))
    held = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in held],
            [r for i, r in enumerate(records) if i in held])
