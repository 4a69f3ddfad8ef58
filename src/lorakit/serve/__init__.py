"""``lorakit serve``: one base model and many LoRA adapters behind an OpenAI-compatible HTTP API,
decoded together in one continuously batched loop whatever adapter each request names.

    settings.py       ServeSettings; only 127.0.0.1 may serve without an API key
    security.py       constant-time key check, adapter paths kept inside the --adapters folders
    adapter_cache.py  every adapter servable, at most N resident (LRU), each load checked
    classify.py       sequence-classification adapters (/v1/classify)
    batch.py          the running batch: one left-padded KV cache, rows join and leave
    scheduler.py      the decoding loop: admit, sample, stream, step (continuous batching)
    requests.py       request bodies checked field by field (4xx naming the field)
    openai_format.py  OpenAI's response and stream chunk shapes
    metrics.py        Prometheus metrics        server.py  the parts wired together
    app.py            the FastAPI routes        playground.html  the page at /

FastAPI, uvicorn and prometheus-client are the ``serve`` extra: ``pip install 'lorakit[serve]'``.
"""

from lorakit.serve.app import create_app
from lorakit.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
