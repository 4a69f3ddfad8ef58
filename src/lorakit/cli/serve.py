"""``lorakit serve --model M --adapters DIR [DIR...] [--max-loaded N] [--host H] [--port P]
[--api-key K]``: one base and many adapters behind an OpenAI-compatible API (serve/app.py).

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="ADAPTER_OR_BASE", prompt="...", max_tokens=64)
"""

from __future__ import annotations

from lorakit.errors import LoraError
from lorakit.serve import ServeSettings, create_app
from lorakit.serve.settings import LOOPBACK


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible "
                                     "HTTP API (continuous batching across adapters)")
    p.add_argument("--model", required=True, help="base model: a known name (smollm2, minilm), a local "
                                                  "Hugging Face folder or a GGUF file")
    p.add_argument("--adapters", nargs="*", default=[], metavar="DIR",
                   help="folders whose adapters are served (searched recursively; runs/NAME/adapter "
                        "is served as NAME); hot loads must come from inside them")
    p.add_argument("--max-loaded", type=int, default=8, help="adapters resident at once; the least "
                                                             "recently used is evicted (default 8)")
    p.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1; any other "
                                                    "needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="clients must send 'Authorization: Bearer KEY'")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument("--name", default=None, help="the base model's name in /v1/models (default --model)")
    p.set_defaults(run=run)


def run(args) -> int:
    try:
        import uvicorn                                   # deferred: heavy optional dependency
    except ImportError:
        raise LoraError("serving needs the serve extra: pip install 'lorakit[serve]' (fastapi, "
                        "uvicorn, prometheus-client)") from None
    settings = ServeSettings(model=args.model, adapters=args.adapters, max_loaded=args.max_loaded,
                             host=args.host, port=args.port, api_key=args.api_key,
                             max_batch=args.max_batch, max_queue=args.max_queue, model_name=args.name)
    app = create_app(settings)
    names = app.state.server.adapters.names()
    print(f"lorakit serve: {settings.base_name} with {len(names)} adapters "
          f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''}); at most {settings.max_loaded} "
          f"resident. OpenAI API at http://{settings.host}:{settings.port}/v1, playground at "
          f"http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0
