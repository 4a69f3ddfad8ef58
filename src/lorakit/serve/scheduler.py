"""Continuous batching over adapters: one thread owns the model and, every iteration,

    1. runs the control jobs queued by the API (adapter load/unload, classification)
    2. admits waiting requests (FIFO) while there are batch slots, making their adapters resident;
       their prompts are prefilled together and join the running batch (batch.py)
    3. picks every row's next token from its logits (greedy or its own seeded sampler)
    4. streams the new text, ends rows that met an end token, a stop string, max_tokens or the
       context, or whose client left, and drops them from the batch
    5. one decoding step for all remaining rows, each through its own adapter: the gathered per-row
       LoRA matmul (``lorakit.set_row_adapters``, layers/mixed.py; S-LoRA / Punica's BGMV)

so a request never waits for another to finish, and a batch mixes any adapters. Requests for an
adapter that cannot be made resident (all ``max_loaded`` in use) wait while later requests for
resident adapters go ahead; once the oldest has waited ``PATIENCE_STEPS`` decoding steps, the resident
adapter with the fewest requests stops taking new ones, so it drains and frees its slot (no starvation).

Nothing a request does can stop the loop: a failure inside a step ends the affected requests with an
error and the server keeps serving.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from lorakit.adapters import set_row_adapters
from lorakit.errors import LoraError
from lorakit.generate.decode import pad_id, stop_ids
from lorakit.generate.sampling import Sampling, next_tokens
from lorakit.serve.adapter_cache import AdapterBusy, AdapterCache
from lorakit.serve.batch import RunningBatch
from lorakit.serve.metrics import ServeMetrics

PATIENCE_STEPS = 32         # a quarter of a 128-token answer: skipping ahead, then draining


class QueueFull(LoraError):
    pass


@dataclass
class GenRequest:
    """One completion. ``emit`` receives, from the scheduler thread: ("text", delta),
    ("end", finish_reason, prompt_tokens, completion_tokens) or ("error", http_status, message)."""

    prompt_ids: list[int]
    adapter: str | None                 # the adapter's public name, None for the base
    max_tokens: int
    sampling: Sampling
    emit: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False            # run to max_tokens (benchmarks: equal work per request)
    cancelled: bool = False             # set by the API when the client goes away
    created: float = field(default_factory=time.monotonic)
    queued_step: int = 0                # the scheduler's step count when it was queued


class Row:
    """A request while it is in the batch: its tokens, the text already sent, its sampler."""

    def __init__(self, req: GenRequest, key: str | None, tokenizer, context: int):
        self.req, self.key, self.tokenizer = req, key, tokenizer
        self.limit = min(req.max_tokens, context - len(req.prompt_ids))
        self.tokens: list[int] = []
        self.shown = ""
        self.finish: str | None = None
        self.hold = max((len(s) for s in req.stop), default=1) - 1
        self.generator = None if req.sampling.greedy else req.sampling.generator("cpu")

    def accept(self, token: int, ends: set[int]) -> bool:
        """Take the next token; emit the text it completes; True when the row is finished."""
        if token in ends and not self.req.ignore_eos:
            self.finish = "stop"
        else:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        if self.finish is None and len(self.tokens) >= self.limit:
            self.finish = "length"
        if self.finish is None:
            if text.endswith("\ufffd"):           # an incomplete UTF-8 character: wait for more
                return False
            text = text[:len(text) - self.hold] if self.hold else text   # may start a stop string
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.req.emit(("text", text[len(self.shown):]))
            self.shown = text
        if self.finish is not None:
            self.req.emit(("end", self.finish, len(self.req.prompt_ids), len(self.tokens)))
            return True
        return False


class Scheduler:
    def __init__(self, model, tokenizer, adapters: AdapterCache, metrics: ServeMetrics,
                 max_batch: int, max_queue: int, prefill_tokens: int, context: int):
        self.model, self.tokenizer, self.adapters, self.metrics = model, tokenizer, adapters, metrics
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.context = context
        self.ends = stop_ids(tokenizer, model) if model is not None else set()
        self.pad = pad_id(tokenizer)
        self.batch = RunningBatch()
        self.waiting: deque[GenRequest] = deque()
        self.jobs: list[tuple[Callable, Future]] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.rows_set: tuple | None = None
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="lorakit-scheduler", daemon=True)

    # --- called from the API threads ------------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (the queue bound, "
                                f"--max-queue {self.max_queue}); retry later")
            req.queued_step = self.steps
            self.waiting.append(req)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify_all()

    def call(self, fn: Callable) -> Future:
        """Run ``fn()`` on the scheduler thread between two steps (it owns the models)."""
        future: Future = Future()
        with self.cond:
            if self.stopping:
                future.set_exception(QueueFull("the server is shutting down"))
                return future
            self.jobs.append((fn, future))
            self.cond.notify_all()
        return future

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    @property
    def active(self) -> int:
        return len(self.batch)

    # --- the loop -------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.cond:
                while not (self.stopping or self.jobs or self.waiting or self.batch.rows):
                    self.cond.wait()
                if self.stopping:
                    break
                jobs, self.jobs = self.jobs, []
            for fn, future in jobs:
                self._run_job(fn, future)
            try:
                admitted = self._admit()
                if self.batch.rows:
                    self._decode_once()
                elif self.waiting and not admitted:
                    with self.cond:                 # every needed adapter is busy: wait a little
                        self.cond.wait(0.01)
            except Exception as err:               # a bug must not take the server down
                traceback.print_exc()
                self._fail(self.batch.rows, f"internal error in the decoding loop: "
                                            f"{type(err).__name__}: {err}")
                self.batch = RunningBatch()
        self._fail(self.batch.rows, "the server is shutting down", status=503)
        self._fail_waiting("the server is shutting down")

    def _run_job(self, fn: Callable, future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as err:                # delivered to the waiting API handler
            future.set_exception(err)

    def _admit(self) -> int:
        free = self.max_batch - len(self.batch)
        with self.cond:
            candidates = list(self.waiting)
        drain = self._draining(candidates)
        rows, prompts, budget = [], [], self.prefill_tokens
        for req in candidates:
            if free <= 0 or (prompts and budget < len(req.prompt_ids)):
                break
            if req.cancelled:
                self._unqueue(req)
                continue
            key = None
            if req.adapter is not None:
                if req.adapter == drain and req is not candidates[0]:
                    continue
                try:
                    key = self.adapters.ensure_resident(req.adapter).key
                except AdapterBusy:
                    continue
                except LoraError as err:
                    self._unqueue(req)
                    req.emit(("error", 400, str(err)))
                    continue
                self.adapters.pin(req.adapter)
            self._unqueue(req)
            rows.append(Row(req, key, self.tokenizer, self.context))
            prompts.append(req.prompt_ids)
            budget -= len(req.prompt_ids)
            free -= 1
        if rows:
            self._set_rows([r.key for r in rows])
            try:
                self.batch.join(self.model, rows, prompts, self.pad)
            except Exception:
                self._fail(rows, "internal error while prefilling the prompt")
                raise
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        return len(rows)

    def _draining(self, candidates: list[GenRequest]) -> str | None:
        """The resident adapter to stop feeding when the oldest request has waited too long."""
        if not candidates or candidates[0].adapter is None:
            return None
        head = candidates[0]
        entry = self.adapters.entries.get(head.adapter)
        if entry is None or entry.key is not None or self.steps - head.queued_step < PATIENCE_STEPS:
            return None
        busy = [n for n in self.adapters.resident if self.adapters.entries[n].pins]
        return min(busy, key=lambda n: self.adapters.entries[n].pins, default=None)

    def _unqueue(self, req: GenRequest) -> None:
        with self.cond:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
            self.metrics.queue_depth.set(len(self.waiting))

    def _set_rows(self, keys: list) -> None:
        """Route row i of the next forward through adapter ``keys[i]`` (None: the bare base)."""
        wanted = (tuple(keys), self.adapters.generation)
        if wanted == self.rows_set:
            return
        self.rows_set = None
        set_row_adapters(self.model, None if all(k is None for k in keys) else keys)
        self.rows_set = wanted

    def _decode_once(self) -> None:
        state, rows = self.batch.state, self.batch.rows
        chosen = state.logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                chosen[i] = next_tokens(state.logits[i:i + 1], row.req.sampling, row.generator)[0]
        keep = []
        for row, token in zip(rows, chosen.tolist()):
            finished = row.req.cancelled or row.accept(token, self.ends)
            keep.append(not finished)
            if finished:
                self._leave(row)
        for row in rows:
            self.metrics.generated_tokens.labels(row.req.adapter or self.adapters.base_name).inc()
        self.batch.keep(keep)
        if not self.batch.rows:
            return
        chosen = chosen[torch.tensor(keep)]
        self._set_rows([r.key for r in self.batch.rows])
        start = time.perf_counter()
        self.batch.step(self.model, chosen)
        self.steps += 1
        self.metrics.step_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.set(len(self.batch))
        self.metrics.batch_sizes.observe(len(self.batch))

    def _leave(self, row: Row) -> None:
        if row.req.cancelled:
            self.metrics.disconnects.inc()
        if row.req.adapter is not None:
            self.adapters.unpin(row.req.adapter)

    def _fail(self, rows: list[Row], message: str, status: int = 500) -> None:
        for row in list(rows):
            row.req.emit(("error", status, message))
            self._leave(row)
        self.rows_set = None

    def _fail_waiting(self, message: str) -> None:
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
            jobs, self.jobs = self.jobs, []
        for req in waiting:
            req.emit(("error", 503, message))
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(QueueFull(message))
