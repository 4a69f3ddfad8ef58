"""Reading a client's JSON body: every field checked, every refusal a 4xx naming the field.

The fields are OpenAI's (``/v1/completions``, ``/v1/chat/completions``) and vLLM's (adapter loading,
``/v1/classify``); unknown fields are ignored, as OpenAI's API does, so clients that send extras work.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from lorakit.errors import LoraError
from lorakit.generate.sampling import Sampling

MAX_BODY_BYTES = 1 << 20
MAX_STOP = 4
MAX_CLASSIFY_TEXTS = 64
MAX_TEXT_CHARS = 20_000
ROLES = ("system", "user", "assistant", "tool", "developer")


class ApiError(LoraError):
    """A refusal with its HTTP status, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclass
class GenParams:
    model: str
    prompt: str | list[int] | list[dict]      # text, token ids, or chat messages
    max_tokens: int | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False                  # vLLM's extension: generate max_tokens whatever comes


def parse_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _get(body: dict, name: str, kinds: tuple, default=None, required: bool = False):
    if name not in body or body[name] is None:
        if required:
            raise ApiError(400, f"`{name}` is required", param=name)
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"`{name}` must be {names}, got {type(value).__name__} {str(value)[:40]!r}",
                       param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False):
    value = _get(body, name, (int, float), default)
    if value != value or value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ApiError(400, f"`{name}` = {value} is out of range {bound}", param=name)
    return float(value)


def _common(body: dict, max_tokens_limit: int, default_max_tokens: int) -> dict:
    model = _get(body, "model", (str,), required=True)
    max_tokens = _get(body, "max_tokens", (int,), None)
    if max_tokens is None:
        max_tokens = _get(body, "max_completion_tokens", (int,), None)
    if max_tokens is not None and not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"`max_tokens` = {max_tokens} is out of range [1, {max_tokens_limit}]",
                       param="max_tokens")
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise ApiError(400, f"`n` = {n}: this server returns one choice per request; send n "
                            "requests instead", param="n")
    for unsupported in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions"):
        if body.get(unsupported) not in (None, False, 0, [], ""):
            raise ApiError(400, f"`{unsupported}` is not supported by this server", param=unsupported)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _get(body, "seed", (int,), None)
    seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"`stop` must be a non-empty string or a list of at most {MAX_STOP} "
                            "non-empty strings", param="stop")
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    sampling = Sampling(max_new_tokens=max_tokens or default_max_tokens, temperature=temperature,
                        top_p=top_p, seed=seed % (1 << 63))
    return {"model": model, "max_tokens": max_tokens or default_max_tokens, "sampling": sampling,
            "stream": stream, "include_usage": bool(options.get("include_usage")), "stop": stop,
            "ignore_eos": _get(body, "ignore_eos", (bool,), False)}


def parse_completion(body: dict, max_tokens_limit: int, default_max_tokens: int) -> GenParams:
    prompt = _get(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, list) and not (prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                            and t >= 0 for t in prompt)):
            raise ApiError(400, "`prompt` must be a string, a list of token ids, or a list holding one "
                                "of those (one prompt per request)", param="prompt")
    return GenParams(prompt=prompt, **_common(body, max_tokens_limit, default_max_tokens))


def parse_chat(body: dict, max_tokens_limit: int, default_max_tokens: int) -> GenParams:
    messages = _get(body, "messages", (list,), required=True)
    if not messages:
        raise ApiError(400, "`messages` must hold at least one message", param="messages")
    clean = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a `role` in {list(ROLES)}, got "
                                f"{str(turn)[:60]!r}", param="messages")
        clean.append({"role": turn["role"], "content": _content(turn.get("content"), i)})
    return GenParams(prompt=clean, **_common(body, max_tokens_limit, default_max_tokens))


def _content(content, i: int) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts; this server "
                        "reads text only", param="messages")


def parse_classify(body: dict) -> tuple[str, list[str]]:
    model = _get(body, "model", (str,), required=True)
    texts = _get(body, "input", (str, list), required=True)
    texts = [texts] if isinstance(texts, str) else texts
    if not texts or len(texts) > MAX_CLASSIFY_TEXTS or not all(isinstance(t, str) for t in texts):
        raise ApiError(400, f"`input` must be a string or a list of 1 to {MAX_CLASSIFY_TEXTS} strings",
                       param="input")
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ApiError(400, f"each `input` text may have at most {MAX_TEXT_CHARS} characters",
                       param="input")
    return model, texts


def parse_adapter_request(body: dict, with_path: bool) -> tuple[str, str | None]:
    name = _get(body, "lora_name", (str,), required=True)
    path = _get(body, "lora_path", (str,), required=True) if with_path else None
    return name, path
