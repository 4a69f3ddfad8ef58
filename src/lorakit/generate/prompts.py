"""Turning what a user typed (or a prompts file) into the token ids a model continues.

With a chat template (``tokenizer.chat_template``, the Jinja text Hugging Face tokenizers carry) the
prompt is rendered as the conversation so far plus the assistant's turn opener
(``add_generation_prompt=True``): an instruction-tuned model then answers instead of continuing the
user's sentence. Without one the text is used as it is. A file passed as ``--chat-template FILE``
replaces (or supplies) the template.

Prompts file: JSON Lines, one object a line with ``prompt`` (a string) or ``messages`` (a list of
``{"role", "content"}``); any other fields are carried to the output unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.io.files import json_lines


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def set_chat_template(tokenizer, path: str | Path | None) -> None:
    """Install the Jinja template in ``path`` on the tokenizer (``--chat-template FILE``)."""
    if path is None:
        return
    file = Path(path)
    if not file.is_file():
        raise LoraError(f"--chat-template {path}: no such file; pass a Jinja chat template file "
                        "(e.g. one copied from a tokenizer_config.json's chat_template)")
    tokenizer.chat_template = file.read_text()


def check_messages(messages, where: str) -> list[dict]:
    """A list of {"role": str, "content": str}; the error names the record and the first bad turn."""
    if not isinstance(messages, list) or not messages:
        raise LoraError(f"{where}: `messages` must be a non-empty list of {{\"role\", \"content\"}} "
                        f"objects, found {type(messages).__name__}")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) \
                or not isinstance(turn.get("content"), str):
            raise LoraError(f"{where}: messages[{i}] is {str(turn)[:80]!r}; each turn needs a string "
                            "`role` (system/user/assistant) and a string `content`")
    return messages


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not has_chat_template(tokenizer):
        raise LoraError("this tokenizer has no chat template, so `messages` cannot be rendered; pass "
                        "--chat-template FILE (a Jinja template) or use prompt/completion records "
                        "(plain text)")
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def prompt_text(tokenizer, prompt: str | list[dict], use_chat: bool = True) -> str:
    """The text to continue: the chat rendering (when the tokenizer has a template and ``use_chat``),
    else the plain prompt; ``messages`` always need the template."""
    if isinstance(prompt, list):
        return render_chat(tokenizer, check_messages(prompt, "prompt"), generation_prompt=True)
    if use_chat and has_chat_template(tokenizer):
        return render_chat(tokenizer, [{"role": "user", "content": prompt}], generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered prompt. A rendering that already starts with the BOS token (chat
    templates write their own) gets no second one; other text gets the tokenizer's usual specials."""
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def read_prompts(path: str | Path) -> list[dict]:
    """Records of a prompts JSONL file, each with ``prompt`` or ``messages``."""
    file = Path(path)
    if not file.is_file():
        raise LoraError(f"--prompts {path}: no such file; pass a JSON Lines file with one "
                        '{"prompt": "..."} or {"messages": [...]} per line')
    records = []
    for number, record in json_lines(file, '{"prompt": "..."}'):
        if not {"prompt", "messages"} & set(record):
            raise LoraError(f"{path}:{number}: needs a `prompt` or `messages` field, found "
                            f"{sorted(record)}")
        records.append(record)
    if not records:
        raise LoraError(f"--prompts {path} holds no prompts")
    return records
