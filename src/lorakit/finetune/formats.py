"""Record formats: which fields a record has, and how it becomes text with trained / untrained parts.

SFT records (the first match wins):
    messages            {"messages": [{"role", "content"}, ...]}   rendered with the chat template;
                        every assistant turn is trained, everything else is prompt
    prompt-completion   {"prompt", "completion"}
    alpaca              {"instruction", "input" (optional), "output"}   (Taori et al. 2023)
    text                {"text"}                                     all tokens trained
Classification: ``--text-column`` and ``--label-column`` (labels strings or integers).

A record becomes segments [(text, trained)], whose concatenation is the full example. With a chat
template (prompt format "chat") prompt-completion and alpaca records are rendered as a user turn and
an assistant turn, the form an instruction-tuned model and ``lorakit generate`` use; "plain" joins
the texts as they are (alpaca with its "### Instruction / ### Response" template).
"""

from __future__ import annotations

from lorakit.errors import LoraError
from lorakit.generate.prompts import check_messages, has_chat_template, render_chat

SFT_FIELDS = {"messages": ("messages",), "prompt-completion": ("prompt", "completion"),
              "alpaca": ("instruction", "output"), "text": ("text",)}
ALPACA_PLAIN = ("Below is an instruction that describes a task{ctx}. Write a response that "
                "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input}"
                "### Response:\n")


def infer_task(columns: set[str], label_column: str) -> str:
    """classify when the records carry a label column and no SFT fields beyond plain text."""
    sft = {f for fields in SFT_FIELDS.values() for f in fields} - {"text"}
    return "classify" if label_column in columns and not columns & sft else "sft"


def detect_format(columns: set[str], task: str, path: str, text_column: str = "text",
                  label_column: str = "label") -> str:
    if task == "classify":
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise LoraError(f"{path}: classification records need the columns {text_column!r} and "
                            f"{label_column!r} (--text-column / --label-column); missing {missing}, "
                            f"found {sorted(columns)}")
        return "classify"
    for name, needed in SFT_FIELDS.items():
        if set(needed) <= columns:
            return name
    raise LoraError(f"{path}: found the fields {sorted(columns)}, but SFT records need one of: "
                    "messages | prompt + completion | instruction (+ input) + output | text. Rename "
                    "the fields, or for labelled data pass --task classify with --text-column and "
                    "--label-column")


def use_chat_format(tokenizer, prompt_format: str) -> bool:
    if prompt_format == "chat" and not has_chat_template(tokenizer):
        raise LoraError("--prompt-format chat, but this tokenizer has no chat template; pass "
                        "--chat-template FILE or use --prompt-format plain")
    return prompt_format == "chat" or (prompt_format == "auto" and has_chat_template(tokenizer))


def as_messages(record: dict, fmt: str) -> list[dict] | None:
    """The record as a conversation (user turn(s) + assistant turn), or None for plain text."""
    if fmt == "messages":
        return record["messages"]
    if fmt == "prompt-completion":
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):            # TRL's conversational prompt-completion
            return prompt + (completion if isinstance(completion, list)
                             else [{"role": "assistant", "content": completion}])
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    if fmt == "alpaca":
        extra = record.get("input") or ""
        return [{"role": "user", "content": record["instruction"] + (f"\n\n{extra}" if extra else "")},
                {"role": "assistant", "content": record["output"]}]
    return None


def segments(record: dict, fmt: str, tokenizer, chat: bool, where: str) -> list[tuple[str, bool]]:
    """[(text, trained)] for one SFT record (see the module docstring)."""
    _check_strings(record, fmt, where)
    if fmt == "messages" or (chat and fmt != "text"):
        prompt = record.get("prompt") if fmt == "prompt-completion" else None
        first = len(prompt) if isinstance(prompt, list) else 0     # a completion's turns only
        return _chat_segments(tokenizer, check_messages(as_messages(record, fmt), where), where, first)
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        return [(record["text"] + eos, True)]
    if fmt == "prompt-completion":
        return [(record["prompt"], False), (record["completion"] + eos, True)]
    extra = record.get("input") or ""
    prompt = ALPACA_PLAIN.format(ctx=", paired with an input" if extra else "",
                                 instruction=record["instruction"],
                                 input=f"### Input:\n{extra}\n\n" if extra else "")
    return [(prompt, False), (record["output"] + eos, True)]


def _chat_segments(tokenizer, messages: list[dict], where: str, first: int = 0) -> list[tuple[str, bool]]:
    """Split the rendered conversation at each assistant turn from index ``first`` on: the text the
    template adds before an assistant turn (its header) is prompt, the turn itself (content +
    end-of-turn) is trained. Assistant turns before ``first`` (a conversational prompt) are prompt."""
    out, done = [], ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant" or i < first:
            continue
        before = render_chat(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = render_chat(tokenizer, messages[:i + 1], generation_prompt=False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise LoraError(f"{where}: the chat template renders earlier turns differently once later "
                            "ones follow, so prompt and answer tokens cannot be told apart; use "
                            "--train-on-prompt, or a template that only appends")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    if not out:
        raise LoraError(f"{where}: the conversation has no assistant turn, so there is nothing to learn; "
                        "each `messages` record needs at least one {\"role\": \"assistant\"} turn")
    rest = render_chat(tokenizer, messages, generation_prompt=False)[len(done):]
    return [s for s in out + [(rest, False)] if s[0]]


def _check_strings(record: dict, fmt: str, where: str) -> None:
    fields = () if fmt == "messages" else SFT_FIELDS[fmt] + (("input",) if fmt == "alpaca" else ())
    for field in fields:
        value = record.get(field)
        if field == "input" and value is None:
            continue
        if fmt == "prompt-completion" and isinstance(value, list):
            continue
        if not isinstance(value, str):
            raise LoraError(f"{where}: field {field!r} is {type(value).__name__} "
                            f"({str(value)[:60]!r}); it must be a string")


def prompt_and_reference(record: dict, fmt: str, tokenizer, chat: bool) -> tuple[object, str] | None:
    """(prompt for ``generate``, reference answer) of an SFT record: the conversation up to its last
    assistant turn, or the plain prompt. None for ``text`` records (nothing to answer)."""
    messages = as_messages(record, fmt)
    if messages is not None and (chat or fmt == "messages"):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last], messages[last]["content"]
    if fmt == "prompt-completion":
        return record["prompt"], record["completion"]
    if fmt == "alpaca":
        return segments(record, fmt, tokenizer, False, "")[0][0], record["output"]
    return None
