"""Records -> token ids and loss labels, truncated to --max-seq-len, with the counts a user needs.

SFT example of T tokens: ``ids`` (T,), ``labels`` (T,) = ids on trained tokens, -100 elsewhere.
The loss at position t predicts token t + 1, so label[0] is never a target: it is set to -100, which
also keeps a packed row's first token of one example from being "predicted" from the previous
example's last token (packed loss == unpacked loss exactly).

Classification: ``ids`` (T,), one integer label per example, and the label map (sorted labels ->
0..C-1) saved with the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lorakit.errors import LoraError
from lorakit.finetune.formats import segments

IGNORE = -100


@dataclass
class Encoded:
    ids: list[list[int]]
    labels: list            # list[list[int]] (SFT) or list[int] (classification)
    truncated: int = 0      # examples cut at max_seq_len (kept: something to learn remained)
    dropped: int = 0        # examples with no trained token left after the cut
    records: list[int] = field(default_factory=list)    # source record index of each example

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(i) for i in self.ids)


def encode_sft(records: list[dict], fmt: str, tokenizer, chat: bool, max_len: int,
               train_on_prompt: bool, path: str) -> Encoded:
    parts = [segments(r, fmt, tokenizer, chat, f"{path} record {i + 1}") for i, r in enumerate(records)]
    flat = [text for segs in parts for text, _ in segs]
    pieces = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
    bos = _bos(tokenizer) if not chat and fmt != "messages" else []
    out = Encoded([], [])
    shortest = 10**9
    for index, segs in enumerate(parts):
        ids, labels = list(bos), [IGNORE] * len(bos)
        for _, trained in segs:
            piece = next(pieces)
            ids += piece
            labels += piece if trained or train_on_prompt else [IGNORE] * len(piece)
        if labels:
            labels[0] = IGNORE
        shortest = min(shortest, len(ids))
        if len(ids) > max_len:
            ids, labels = ids[:max_len], labels[:max_len]
            if all(x == IGNORE for x in labels):
                out.dropped += 1
                continue
            out.truncated += 1
        if any(x != IGNORE for x in labels):
            out.ids.append(ids)
            out.labels.append(labels)
            out.records.append(index)
    _check_not_empty(out, len(records), max_len, path, shortest)
    return out


def encode_classify(records: list[dict], tokenizer, text_column: str, label_column: str,
                    label_map: dict | None, max_len: int, path: str) -> tuple[Encoded, dict]:
    """Token ids and label indices; ``label_map`` None builds it from these records (training)."""
    texts, raw = [], []
    for i, record in enumerate(records):
        text, label = record.get(text_column), record.get(label_column)
        if not isinstance(text, str):
            raise LoraError(f"{path} record {i + 1}: {text_column!r} is {type(text).__name__}, not text")
        if label is None or isinstance(label, (float, bool, list, dict)):
            raise LoraError(f"{path} record {i + 1}: label {label!r} in {label_column!r} must be a "
                            "string or an integer")
        texts.append(text)
        raw.append(label)
    if label_map is None:
        label_map = {str(v): i for i, v in enumerate(sorted(set(raw), key=lambda v: (str(type(v)), v)))}
        if len(label_map) < 2:
            raise LoraError(f"{path}: every record has the label {raw[0]!r}; classification needs at "
                            "least two labels")
    unseen = sorted({str(v) for v in raw} - set(label_map))
    if unseen:
        raise LoraError(f"{path}: labels {unseen[:5]} do not occur in the training data (labels there: "
                        f"{sorted(label_map)[:10]}); fix the labels or add examples of them to --data")
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    out = Encoded([], [])
    for index, (row, label) in enumerate(zip(ids, raw)):
        if len(row) > max_len:
            row = row[:max_len - 1] + row[-1:]       # keep the closing [SEP]
            out.truncated += 1
        out.ids.append(row)
        out.labels.append(label_map[str(label)])
        out.records.append(index)
    _check_not_empty(out, len(records), max_len, path)
    return out, label_map


def _check_not_empty(out: Encoded, n_records: int, max_len: int, path: str,
                     shortest: int | None = None) -> None:
    if out.truncated + out.dropped == n_records and n_records > 1:
        raise LoraError(f"{path}: every one of the {n_records} examples is longer than --max-seq-len "
                        f"{max_len}" + (f" (the shortest has {shortest} tokens)" if shortest else "")
                        + "; raise --max-seq-len (or shorten the examples)")
    if not out.ids:
        raise LoraError(f"{path}: none of the {n_records} examples has a trained token within "
                        f"--max-seq-len {max_len} (the prompts alone fill it); raise --max-seq-len or "
                        "shorten the prompts")


def _bos(tokenizer) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []
