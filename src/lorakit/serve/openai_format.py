"""Response bodies in the OpenAI API's shapes (what the official ``openai`` client parses), and the
server-sent-events framing of a stream: ``data: {chunk}`` lines, ended by ``data: [DONE]``."""

from __future__ import annotations

import json
import time
import uuid


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, chat: bool, text: str, finish: str, prompt_tokens: int,
               completion_tokens: int) -> dict:
    choice = {"index": 0, "finish_reason": finish, "logprobs": None}
    choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(rid: str, model: str, chat: bool, text: str | None, finish: str | None = None,
          first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant", "content": text or ""} if first else \
            ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def model_card(name: str, owner: str, root: str | None = None, **extra) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": owner,
            "root": root or name, "parent": None if root is None else root, **extra}
