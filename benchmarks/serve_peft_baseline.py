"""The baseline ``lorakit serve`` is measured against: several adapters served the way PEFT's
documentation shows, behind the same minimal OpenAI-style endpoint.

    per-request:  for each request, ``model.set_adapter(name)`` then transformers ``generate`` on that
                  one prompt (PEFT "Multi-adapter inference": load_adapter + set_adapter)
    static:       the worker takes every waiting request, groups them by adapter and runs one
                  left-padded ``generate`` batch per group (static batching; a batch finishes together
                  and new requests wait for the next round)

One worker thread owns the model; requests queue for it. Greedy only; ``ignore_eos`` maps to
``min_new_tokens = max_tokens`` so every request does the same work as in lorakit's server.

    python benchmarks/serve_peft_baseline.py --model smollm2 --adapters DIR --mode static --port 8001
"""


import argparse
import queue
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch


def build(model_name: str, adapter_root: Path):
    import peft
    from lorakit.models import load
    loaded = load(model_name, task="causal-lm")
    tokenizer = loaded.tokenizer
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    folders = sorted(p.parent for p in adapter_root.rglob("adapter_config.json"))
    model = loaded.model
    names = []
    for folder in folders:
        name = folder.relative_to(adapter_root).as_posix()
        if not names:
            model = peft.PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
        names.append(name)
    return model.eval(), tokenizer, names


class Worker:
    def __init__(self, model, tokenizer, names: list[str], base_name: str, mode: str):
        self.model, self.tokenizer, self.names, self.base_name, self.mode = model, tokenizer, names, base_name, mode
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self.run, daemon=True).start()

    def submit(self, adapter: str | None, messages: list, max_tokens: int, ignore_eos: bool) -> Future:
        future: Future = Future()
        self.jobs.put((adapter, messages, max_tokens, ignore_eos, future))
        return future

    @torch.no_grad()
    def generate(self, adapter, prompts: list[list], max_tokens: int, ignore_eos: bool) -> list[tuple]:
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
                 for m in prompts]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        kwargs = dict(max_new_tokens=max_tokens, do_sample=False,
                      min_new_tokens=max_tokens if ignore_eos else None,
                      pad_token_id=self.tokenizer.pad_token_id)
        if adapter is None:
            if hasattr(self.model, "disable_adapter"):
                with self.model.disable_adapter():
                    out = self.model.generate(**batch, **kwargs)
            else:
                out = self.model.generate(**batch, **kwargs)
        else:
            self.model.set_adapter(adapter)
            out = self.model.generate(**batch, **kwargs)
        width = batch["input_ids"].shape[1]
        results = []
        for row in range(len(prompts)):
            new = out[row, width:]
            new = new[new != self.tokenizer.pad_token_id] if not ignore_eos else new
            results.append((self.tokenizer.decode(new, skip_special_tokens=True),
                            int(batch["attention_mask"][row].sum()), int(len(new))))
        return results

    def run(self):
        torch.set_grad_enabled(False)
        while True:
            jobs = [self.jobs.get()]
            if self.mode == "static":
                while True:
                    try:
                        jobs.append(self.jobs.get_nowait())
                    except queue.Empty:
                        break
            groups: dict = {}
            for job in jobs:
                groups.setdefault((job[0], job[2], job[3]), []).append(job)
            for (adapter, max_tokens, ignore_eos), group in groups.items():
                for start in range(0, len(group), 32 if self.mode == "static" else 1):
                    part = group[start:start + (32 if self.mode == "static" else 1)]
                    try:
                        results = self.generate(adapter, [j[1] for j in part], max_tokens, ignore_eos)
                    except Exception as err:                     # noqa: BLE001 - sent to the client
                        for job in part:
                            job[4].set_exception(err)
                        continue
                    for job, result in zip(part, results):
                        job[4].set_result(result)


def create_app(worker: Worker):
    import asyncio

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        name = body["model"]
        if name != worker.base_name and name not in worker.names:
            return JSONResponse({"error": {"message": f"unknown model {name}"}}, status_code=404)
        adapter = None if name == worker.base_name else name
        future = worker.submit(adapter, body["messages"], int(body.get("max_tokens") or 128),
                               bool(body.get("ignore_eos")))
        text, prompt_tokens, completion_tokens = await asyncio.wrap_future(future)
        return {"id": "chatcmpl-baseline", "object": "chat.completion", "created": int(time.time()),
                "model": name, "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                                            "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    return app


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapters", required=True, type=Path)
    parser.add_argument("--mode", choices=("per-request", "static"), default="per-request")
    parser.add_argument("--name", default=None, help="the base model's name in requests")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    import uvicorn
    model, tokenizer, names = build(args.model, args.adapters)
    worker = Worker(model, tokenizer, names, args.name or args.model, args.mode)
    print(f"PEFT baseline ({args.mode}): {len(names)} adapters", flush=True)
    uvicorn.run(create_app(worker), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
