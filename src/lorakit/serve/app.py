"""The HTTP API (FastAPI): OpenAI's completions and chat completions, vLLM's adapter loading and
classification, health, Prometheus metrics and the playground page.

    GET  /                          the playground (playground.html)
    GET  /health                    {"status": "ok", ...}                      (no key needed)
    GET  /metrics                   Prometheus text
    GET  /v1/models                 the base and every adapter
    POST /v1/completions            {"model", "prompt", "max_tokens", "temperature", "stream", ...}
    POST /v1/chat/completions       {"model", "messages", ...} through the tokenizer's chat template
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"}   (a path inside --adapters folders)
    POST /v1/unload_lora_adapter    {"lora_name"}
    POST /v1/classify               {"model": a classification adapter, "input": text or texts}

The request's ``model`` names the base or an adapter (vLLM's convention). A stream is server-sent
events in OpenAI's chunk format ending with ``data: [DONE]``; a client that disconnects frees its batch
slot at the next step. Every refusal is a 4xx JSON ``{"error": {"message", "type", "param", "code"}}``.
"""


import asyncio
import json
from contextlib import asynccontextmanager
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.generate.prompts import encode_prompt, render_chat
from lorakit.models import LoadedModel
from lorakit.serve import openai_format as fmt
from lorakit.serve.adapter_cache import UnknownAdapter, base_mismatch
from lorakit.serve.metrics import CONTENT_TYPE
from lorakit.serve.requests import (ApiError, GenParams, parse_adapter_request, parse_body,
                                    parse_chat, parse_classify, parse_completion)
from lorakit.serve.scheduler import GenRequest, QueueFull
from lorakit.serve.security import key_matches
from lorakit.serve.server import Server, build_server
from lorakit.serve.settings import ServeSettings

PLAYGROUND = Path(__file__).with_name("playground.html")
CHAT_DEFAULT_MAX_TOKENS = 256
DISCONNECT_POLL_S = 0.25
OPEN_PATHS = ("/", "/health", "/favicon.ico")


def create_app(settings: ServeSettings, loaded: LoadedModel | None = None):
    """The FastAPI app; the base loads now, the scheduler thread runs while the app does."""
    # deferred: heavy optional dependency
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

    server = build_server(settings, loaded)

    @asynccontextmanager
    async def lifespan(_app):
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.stop)

    app = FastAPI(title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = server

    def error(err: ApiError, endpoint: str) -> JSONResponse:
        server.metrics.requests.labels(endpoint, str(err.status)).inc()
        return JSONResponse(err.body(), status_code=err.status)

    app.add_middleware(KeyCheck, api_key=settings.api_key, metrics=server.metrics)

    @app.exception_handler(ApiError)
    async def refused(request: Request, exc: ApiError):
        return error(exc, request.url.path)

    @app.exception_handler(UnknownAdapter)
    async def unknown(request: Request, exc: UnknownAdapter):
        return error(ApiError(404, str(exc), param="model", code="model_not_found"), request.url.path)

    @app.exception_handler(LoraError)
    async def invalid(request: Request, exc: LoraError):
        return error(ApiError(400, str(exc)), request.url.path)

    @app.exception_handler(404)
    async def not_found(request: Request, _exc):
        return error(ApiError(404, f"no route {request.method} {request.url.path}"), "unknown")

    @app.exception_handler(405)
    async def wrong_method(request: Request, _exc):
        return error(ApiError(405, f"{request.url.path} does not accept {request.method}"), "unknown")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        return error(ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error"),
                     request.url.path)

    @app.get("/")
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.base_name, "active": server.scheduler.active,
                "waiting": len(server.scheduler.waiting),
                "resident_adapters": len(server.adapters.resident)}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        await asyncio.to_thread(server.adapters.scan)
        cards = [fmt.model_card(server.base_name, "lorakit", kind="base" if server.model is not None
                                else "encoder", context_length=server.context)]
        cards += [fmt.model_card(a["id"], "lorakit", root=server.base_name, kind=a["kind"],
                                 resident=a["resident"], parity=a["parity"], error=a["error"])
                  for a in server.adapters.describe()]
        server.metrics.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": cards}

    async def body_of(request: Request) -> dict:
        return parse_body(await request.body())

    def adapter_for(name: str, kind: str) -> str | None:
        """The adapter a request's ``model`` names (None: the base), refused with 404/400."""
        if name == server.base_name:
            if kind == "classify":
                raise ApiError(400, f"{name} is the base model, whose classification head is untrained; "
                                    "name a classification adapter", param="model")
            return None
        try:
            entry = server.adapters.get(name)
        except UnknownAdapter as err:
            raise ApiError(404, str(err), param="model", code="model_not_found") from None
        if entry.kind != kind:
            foreign = base_mismatch(entry.path, server.model)
            if foreign:
                raise ApiError(400, f"{name} was trained on another base model ({foreign}); this "
                                    f"server serves {server.base_name}", param="model")
            use = "/v1/classify" if entry.kind == "classify" else "/v1/completions"
            raise ApiError(400, f"{name} is a {entry.kind} adapter; send it to {use}", param="model")
        return name

    async def generate(request: Request, chat: bool):
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        body = await body_of(request)
        limit = settings.max_tokens_limit
        params = parse_chat(body, limit, CHAT_DEFAULT_MAX_TOKENS) if chat else \
            parse_completion(body, limit, settings.default_max_tokens)
        if server.model is None:
            raise ApiError(400, f"the base model {server.base_name} is an encoder without a language "
                                "model head: it classifies (/v1/classify) but cannot generate")
        adapter = adapter_for(params.model, "lm")
        ids = prompt_ids(params, chat)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = GenRequest(ids, adapter, params.sampling.max_new_tokens, params.sampling,
                         lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                         stop=params.stop, ignore_eos=params.ignore_eos)
        try:
            server.scheduler.submit(req)
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error", code="queue_full") from None
        rid, name = fmt.new_id(chat), params.model
        try:
            first = await next_event(request, events, req)
        except BaseException:
            cancel(req)
            raise
        if first[0] == "error":
            raise ApiError(first[1], first[2], kind="server_error" if first[1] >= 500
                           else "invalid_request_error")
        if params.stream:
            server.metrics.requests.labels(endpoint, "200").inc()
            return StreamingResponse(stream(first, events, req, rid, name, chat, params),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, event = "", first
        try:
            while event[0] == "text":
                text += event[1]
                event = await next_event(request, events, req)
        except BaseException:
            cancel(req)
            raise
        if event[0] == "error":
            raise ApiError(event[1], event[2], kind="server_error")
        server.metrics.requests.labels(endpoint, "200").inc()
        return fmt.completion(rid, name, chat, text, event[1], event[2], event[3])

    def prompt_ids(params: GenParams, chat: bool) -> list[int]:
        tokenizer = server.tokenizer
        if chat:
            ids = encode_prompt(tokenizer, render_chat(tokenizer, params.prompt, generation_prompt=True))
        elif isinstance(params.prompt, str):
            ids = encode_prompt(tokenizer, params.prompt)
        else:
            vocab = len(tokenizer)
            if max(params.prompt) >= vocab:
                raise ApiError(400, f"token id {max(params.prompt)} is outside the vocabulary "
                                    f"(size {vocab})", param="prompt")
            ids = list(params.prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="prompt")
        if len(ids) + params.sampling.max_new_tokens > server.context:
            raise ApiError(400, f"this model's context is {server.context} tokens, but the prompt has "
                                f"{len(ids)} and max_tokens asks for {params.sampling.max_new_tokens} "
                                "more; shorten the prompt or lower max_tokens",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        return ids

    async def next_event(request: Request, events: asyncio.Queue, req: GenRequest) -> tuple:
        """The scheduler's next event; a client that went away cancels the request."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    cancel(req)
                    raise asyncio.CancelledError("client disconnected")

    def cancel(req: GenRequest) -> None:
        req.cancelled = True
        server.scheduler.wake()

    async def stream(first, events, req, rid, name, chat, params):
        event, started, done = first, False, False
        try:
            while True:
                if event[0] == "text":
                    yield fmt.sse(fmt.chunk(rid, name, chat, event[1], first=chat and not started))
                    started = True
                elif event[0] == "end":
                    if chat and not started:
                        yield fmt.sse(fmt.chunk(rid, name, chat, "", first=True))
                    yield fmt.sse(fmt.chunk(rid, name, chat, None, finish=event[1]))
                    if params.include_usage:
                        yield fmt.sse(fmt.usage_chunk(rid, name, chat, event[2], event[3]))
                    break
                else:
                    yield fmt.sse(ApiError(event[1], event[2], kind="server_error").body())
                    break
                event = await events.get()
            yield fmt.sse("[DONE]")
            done = True
        finally:
            if not done:                            # the client left mid-stream: free the slot
                cancel(req)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def on_scheduler(fn):
        return await asyncio.wrap_future(server.scheduler.call(fn))

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        name, path = parse_adapter_request(await body_of(request), with_path=True)
        entry = await on_scheduler(lambda: server.adapters.register(name, path))
        server.metrics.requests.labels("/v1/load_lora_adapter", "200").inc()
        return {"status": "ok", "lora_name": entry.name, "path": str(entry.path),
                "resident": entry.key is not None, "parity": entry.parity,
                "message": f"Success: LoRA adapter '{entry.name}' added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        name, _ = parse_adapter_request(await body_of(request), with_path=False)
        if name == server.base_name:
            raise ApiError(400, "the base model cannot be unloaded", param="lora_name")
        server.adapters.get(name)                   # 404 for an unknown name
        await on_scheduler(lambda: server.adapters.unregister(name))
        server.metrics.requests.labels("/v1/unload_lora_adapter", "200").inc()
        return {"status": "ok", "lora_name": name,
                "message": f"Success: LoRA adapter '{name}' removed successfully."}

    @app.post("/v1/classify")
    async def classify(request: Request):
        model, texts = parse_classify(await body_of(request))
        name = adapter_for(model, "classify")

        def run():
            entry = server.adapters.ensure_resident(name)
            server.adapters.pin(name)
            try:
                return entry.labels, server.classifiers.classify(entry.key, texts)
            finally:
                server.adapters.unpin(name)

        try:
            labels, probs = await on_scheduler(run)
        except QueueFull as err:
            raise ApiError(429, str(err), kind="rate_limit_error") from None
        server.metrics.requests.labels("/v1/classify", "200").inc()
        data = [{"index": i, "label": labels[int(row.argmax())], "probs": [round(float(p), 6) for p in row],
                 "num_classes": len(labels)} for i, row in enumerate(probs)]
        return {"id": "classify-" + fmt.new_id(False)[5:], "object": "list", "model": model,
                "labels": labels, "data": data}

    return app


class KeyCheck:
    """ASGI middleware: every path but the playground and /health needs the API key (when one is
    set). Plain ASGI rather than Starlette's BaseHTTPMiddleware, which wraps streamed responses."""

    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        if key_matches(given, self.api_key):
            return await self.app(scope, receive, send)
        self.metrics.requests.labels("auth", "401").inc()
        body = json.dumps(ApiError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                                   kind="authentication_error", code="invalid_api_key").body()).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
