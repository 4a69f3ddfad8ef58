"""A real ``lorakit serve`` process on 127.0.0.1 for the serve tests: a tiny random Llama saved as a
Hugging Face folder, adapters made for it, a free port, a bounded wait for /health, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from finetune_helpers import tiny_llama_dir

import lorakit
from lorakit.io import fingerprint_metadata
from lorakit.models import load

START_TIMEOUT_S = 90
TARGETS = {"qv": ["q_proj", "v_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"],
           "all": "all-linear"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_dir(root: Path) -> Path:
    folder = root / "tiny-llama"
    if not (folder / "config.json").exists():
        tiny_llama_dir(folder)
    return folder


def make_adapter(base: Path, out: Path, seed: int, targets="qv", r: int = 4, fingerprint: bool = True,
                 std: float = 0.3) -> Path:
    """An adapter for the tiny Llama whose factors are random (B != 0), so it changes the output."""
    model, _ = load(base, task="causal-lm")
    lorakit.apply_lora(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS[targets]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    meta = fingerprint_metadata(model) if fingerprint else None
    return lorakit.save_adapter(model, out, metadata=meta)


class ServerProcess:
    """``python -m lorakit serve ...`` in a subprocess; ``url`` is the API base (…/v1)."""

    def __init__(self, model: Path | str, adapters: list[Path], *extra: str, api_key: str | None = None,
                 log: Path | None = None):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = self.root + "/v1"
        self.api_key = api_key
        cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--port", str(self.port),
               "--adapters", *map(str, adapters), *extra]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = open(log or os.devnull, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lorakit serve exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"lorakit serve did not answer /health within {START_TIMEOUT_S} s")

    def request(self, method: str, path: str, body=None, raw: bytes | None = None,
                headers: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
        """(status, parsed JSON or text) for one HTTP request (urllib: no client-side checks)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if self.api_key and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.root + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, text = r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()
