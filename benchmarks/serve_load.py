"""Load test of ``lorakit serve`` (loopback only, bounded in requests and time), with the official
``openai`` client: N concurrent clients over K adapters; throughput, p50/p99 latency, errors (must be
0), server memory; against the bare base served the same way and against PEFT's documented way of
serving several adapters (benchmarks/serve_peft_baseline.py), per request and in static batches.

    scenario      server                                     requests name
    base          lorakit serve, no adapters                 the base
    mixed8        lorakit serve, 8 adapters, --max-loaded 8  8 adapters, interleaved
    lru32         lorakit serve, 32 adapters, --max-loaded 8 32 adapters, interleaved (LRU churn)
    peft          PEFT set_adapter + generate per request    the same 8 adapters as mixed8
    peft-static   PEFT, requests grouped by adapter,         the same 8 adapters
                  one generate batch per group
    fault         lorakit serve, 8 adapters; 4 of them are hot-loaded and unloaded in a loop while
                  clients stream over the other 4 (errors must be 0)

Every request: a chat prompt, greedy, ``max_tokens`` new tokens with ``ignore_eos`` (the same work for
every server). Request i names ``random.Random(i).choice(adapters)``. The adapters are random LoRA factors (r = 8, alpha = 16, all linear layers: what
``lorakit finetune`` trains by default) saved with lorakit's serve-parity fingerprint.

    flock /tmp/lorakit-cpu.lock python benchmarks/serve_load.py            # SmolLM2-135M, ~10 min
    python benchmarks/serve_load.py --model DIR --requests 8 --max-tokens 8  # quick check
Writes benchmarks/results/serve_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "Write a haiku about the sea.", "Explain what a low-rank matrix is.", "List three uses of copper.",
    "Why is the sky blue?", "Give me a recipe for pancakes.", "What is a prime number?",
    "Describe a cat to someone who has never seen one.", "How do vaccines work?",
    "Summarize the plot of Romeo and Juliet.", "What is the capital of Australia?",
    "Tell me a joke about computers.", "How does a bicycle stay upright?",
    "Explain photosynthesis simply.", "What are black holes?", "Suggest a name for a bakery.",
    "How do I boil an egg?",
]
TARGETS = "all-linear"


def make_adapters(model_name: str, folder: Path, count: int) -> list[str]:
    """``count`` random adapters (different seeds) for the base, with fingerprints; reused if present."""
    import lorakit
    from lorakit.io import fingerprint_metadata
    from lorakit.models import load
    names = [f"a{k:02d}" for k in range(count)]
    missing = [n for n in names if not (folder / n / "adapter_model.safetensors").exists()]
    if missing:
        model = load(model_name, task="causal-lm").model
        for name in missing:
            torch.manual_seed(int(name[1:]))
            lorakit.apply_lora(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS),
                               adapter_name=name)
            with torch.no_grad():
                for pname, p in model.named_parameters():
                    if f".lora.{name}.B" in pname:
                        p.normal_(std=0.02)
            lorakit.save_adapter(model, folder / name, adapter_name=name,
                                 metadata=fingerprint_metadata(model, name))
            with warnings.catch_warnings():              # "no adapter is left": expected here
                warnings.simplefilter("ignore", UserWarning)
                lorakit.delete_adapter(model, name)
            print(f"  made adapter {folder / name}", flush=True)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, log: Path, timeout: float = 300):
        self.port, self.log = port, open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}); see {log}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start within {timeout} s; see {log}")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def post(self, path: str, body: dict) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def drive(port: int, models: list[str], clients: int, requests: int, max_tokens: int,
          deadline_s: float, stream: bool = False) -> dict:
    """``clients`` threads pull request numbers until ``requests`` are sent or the deadline passes."""
    import openai
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                           timeout=deadline_s + 60)
    lock, counter = threading.Lock(), iter(range(requests))
    latencies, tokens, errors = [], [], []
    start = time.perf_counter()

    def worker():
        while True:
            with lock:
                i = next(counter, None)
            if i is None or time.perf_counter() - start > deadline_s:
                return
            kwargs = dict(model=random.Random(i).choice(models), max_tokens=max_tokens, temperature=0,
                          messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                          extra_body={"ignore_eos": True})
            t0 = time.perf_counter()
            try:
                if stream:
                    out = client.chat.completions.create(stream=True, **kwargs,
                                                         stream_options={"include_usage": True})
                    used = [c.usage.completion_tokens for c in out if c.usage][-1]
                else:
                    used = client.chat.completions.create(**kwargs).usage.completion_tokens
            except Exception as err:                         # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(err)[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens.append(used)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    pick = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]) if lat else (lambda q: float("nan"))
    return {"requests": len(lat), "errors": len(errors), "error_examples": errors[:3],
            "tokens": sum(tokens), "wall_s": round(wall, 2),
            "throughput_tok_s": round(sum(tokens) / wall, 2) if wall else 0.0,
            "p50_s": round(statistics.median(lat), 2) if lat else None, "p99_s": round(pick(0.99), 2)}


def lorakit_cmd(args, port, folder, max_loaded) -> list[str]:
    return [sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--name", "base",
            "--port", str(port), "--adapters", str(folder), "--max-loaded", str(max_loaded),
            "--max-batch", str(args.clients)]


def run_scenario(name: str, args, work: Path, names: list[str]) -> dict:
    port = free_port()
    log = work / f"{name}.log"
    if name.startswith("peft"):
        cmd = [sys.executable, str(HERE / "serve_peft_baseline.py"), "--model", args.model, "--name", "base",
               "--adapters", str(work / "lib8"), "--port", str(port),
               "--mode", "static" if name == "peft-static" else "per-request"]
        models = names[:8]
        requests = args.baseline_requests if name == "peft-static" else args.peft_requests
    elif name == "base":
        cmd, models, requests = lorakit_cmd(args, port, work / "empty", 8), ["base"], args.requests
    elif name in ("mixed8", "fault"):
        cmd, models, requests = lorakit_cmd(args, port, work / "lib8", 8), names[:8], args.requests
    else:
        cmd, models, requests = lorakit_cmd(args, port, work / "lib32", 8), names, args.requests
    t0 = time.perf_counter()
    server = Server(cmd, port, log)
    startup = time.perf_counter() - t0
    try:
        for model in models[:8]:            # warm-up: the first step, and the 8 adapters resident
            drive(port, [model], 1, 1, 2, 120)
        if name == "fault":
            result = fault(server, port, models, args)
        else:
            result = drive(port, models, args.clients, requests, args.max_tokens, args.time_limit)
        result["server_peak_rss_mb"] = round(server.peak_rss_mb(), 1)
    finally:
        server.stop()
    result.update(scenario=name, startup_s=round(startup, 1), adapters=len(models) if models != ["base"] else 0)
    print(f"  {name}: {json.dumps(result)}", flush=True)
    return result


def fault(server: Server, port: int, models: list[str], args) -> dict:
    """Clients stream over models[:4] while models[4:] are unloaded and loaded again in a loop."""
    stop, cycles, refused = threading.Event(), [0], []

    def churn():
        while not stop.is_set():
            for name in models[4:]:
                for path, body in (("/v1/unload_lora_adapter", {"lora_name": name}),
                                   ("/v1/load_lora_adapter", {"lora_name": name, "lora_path": name})):
                    status = server.post(path, body)
                    if status != 200:
                        refused.append((path, name, status))
                cycles[0] += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        result = drive(port, models[:4], args.clients // 2, args.requests // 2, args.max_tokens // 2,
                       args.time_limit, stream=True)
    finally:
        stop.set()
        thread.join()
    result.update(load_unload_cycles=cycles[0], churn_refusals=len(refused))
    return result


def table(results: list[dict], args) -> str:
    by = {r["scenario"]: r for r in results}
    lines = [f"Load test: {args.model}, {args.clients} concurrent clients, {args.max_tokens} new tokens "
             "greedy (ignore_eos), chat prompts; lorakit scenarios "
             f"{args.requests} requests each, PEFT per request {args.peft_requests}, PEFT static "
             f"batches {args.baseline_requests}; fault test {args.clients // 2} clients, "
             f"{args.requests // 2} streamed requests of {args.max_tokens // 2} tokens.", "",
             "| scenario | adapters | requests | errors | tokens/s | p50 s | p99 s | server peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['scenario']} | {r['adapters']} | {r['requests']} | {r['errors']} | "
                     f"{r['throughput_tok_s']} | {r['p50_s']} | {r['p99_s']} | {r['server_peak_rss_mb']} |")
    lines += ["", "| target | ratio | needed | met |", "|---|---|---|---|"]
    for label, num, den, need in (("8 adapters mixed / bare base", "mixed8", "base", 0.8),
                                  ("32 adapters, 8 resident / bare base", "lru32", "base", 0.6),
                                  ("mixed8 / PEFT set_adapter per request", "mixed8", "peft", 5.0),
                                  ("mixed8 / PEFT static batches by adapter", "mixed8", "peft-static", 1.5)):
        if num in by and den in by and by[den]["throughput_tok_s"]:
            ratio = by[num]["throughput_tok_s"] / by[den]["throughput_tok_s"]
            lines.append(f"| {label} | {ratio:.2f}x | >= {need}x | {'yes' if ratio >= need else 'no'} |")
    if "fault" in by:
        f = by["fault"]
        lines += ["", f"Fault test: {f['load_unload_cycles']} adapter unload+load cycles while "
                      f"{f['requests']} streamed requests ran over 4 other adapters: {f['errors']} errors, "
                      f"{f['churn_refusals']} refused loads/unloads."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32, help="per lorakit scenario")
    parser.add_argument("--baseline-requests", type=int, default=32, help="PEFT static batches")
    parser.add_argument("--peft-requests", type=int, default=8,
                        help="PEFT per request (sequential: its throughput needs few requests)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--time-limit", type=float, default=200,
                        help="seconds after which a scenario sends no new request")
    parser.add_argument("--scenarios", default="base,mixed8,lru32,peft,peft-static,fault")
    parser.add_argument("--work", type=Path, default=Path("runs/serve-bench"))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_load")
    args = parser.parse_args()
    load_start, started = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M:%S")
    work = args.work
    (work / "empty").mkdir(parents=True, exist_ok=True)
    names = make_adapters(args.model, work / "lib32", 32)
    (work / "lib8").mkdir(exist_ok=True)
    for name in names[:8]:                    # copies: a symlink out of a served folder is refused
        if not (work / "lib8" / name).exists():
            shutil.copytree(work / "lib32" / name, work / "lib8" / name)
    results = [run_scenario(s, args, work, names) for s in args.scenarios.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "clients": args.clients, "requests": args.requests,
            "baseline_requests": args.baseline_requests, "peft_requests": args.peft_requests,
            "max_tokens": args.max_tokens, "time_limit_s": args.time_limit,
            "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
            "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpu_threads": torch.get_num_threads(), "results": results}
    Path(f"{args.out}.json").write_text(json.dumps(meta, indent=1))
    Path(f"{args.out}.md").write_text(table(results, args))
    print(table(results, args))


if __name__ == "__main__":
    main()
