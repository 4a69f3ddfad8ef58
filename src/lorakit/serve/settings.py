"""ServeSettings: everything ``lorakit serve`` is started with, checked before anything loads."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LoraError

LOOPBACK = "127.0.0.1"


@dataclass
class ServeSettings:
    model: str                                  # a built-in name, HF folder or GGUF file
    adapters: list[Path] = field(default_factory=list)   # folders whose adapters may be served
    max_loaded: int = 8                         # adapters resident at once (LRU beyond that)
    host: str = LOOPBACK
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 32                         # sequences decoded together in one step
    max_queue: int = 256                        # waiting requests; one more gets 429
    max_tokens_limit: int = 4096                # the largest max_tokens a request may ask for
    default_max_tokens: int = 16                # OpenAI's default for /v1/completions
    prefill_tokens: int = 4096                  # prompt tokens prefilled together between steps
    model_name: str | None = None               # the base's name in /v1/models (default: --model)

    def __post_init__(self):
        self.adapters = [Path(p) for p in self.adapters]
        for folder in self.adapters:
            if not folder.is_dir():
                raise LoraError(f"--adapters {folder}: no such folder; pass folders that hold adapter "
                                "folders (each with adapter_config.json), e.g. runs/")
        for name, value, low in (("--max-loaded", self.max_loaded, 1), ("--max-batch", self.max_batch, 1),
                                 ("--max-queue", self.max_queue, 1), ("--port", self.port, 0),
                                 ("--max-tokens-limit", self.max_tokens_limit, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise LoraError(f"{name} {value!r} must be an integer >= {low}")
        if self.port > 65535:
            raise LoraError(f"--port {self.port} must be at most 65535")
        check_bind(self.host, self.api_key)

    @property
    def base_name(self) -> str:
        return self.model_name or str(self.model)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Only the loopback address may serve without a key: anything else is reachable by others."""
    if api_key is not None and len(api_key) < 8:
        raise LoraError("--api-key must be at least 8 characters; a short key is guessable")
    if not is_loopback(host) and not api_key:
        raise LoraError(f"--host {host} makes the server reachable from other machines; pass "
                        "--api-key KEY (clients send it as 'Authorization: Bearer KEY'), or keep the "
                        f"default --host {LOOPBACK}")
