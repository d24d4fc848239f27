"""The scheduler: one thread that owns the engine and runs continuous batching.

HTTP handlers never touch the model. They `submit()` a job (a prompt's token ids and its
sampling parameters) and read `Update`s from the job's outbox; the scheduler thread loops:

    1. forget cancelled jobs (a client went away): their cache rows are free at once;
    2. admit waiting jobs into free cache rows (no compute yet);
    3. feed ONE chunk of one admitted prompt (the oldest), so a long prompt never stalls
       the running streams for longer than a chunk;
    4. decode one token for every running sequence (Engine.step), send each job its new
       text, and retire the finished ones.

Updates carry only Python values (text, ids, floats), never tensors. The waiting queue is
bounded: a full queue refuses new jobs (the server answers 503).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from smoe.errors import GenerationError
from smoe.generate import Engine, Sequence, TokenLogprob
from smoe.sampling import SamplingParams
from smoe.server.metrics import Metrics

LOG = logging.getLogger("uvicorn.error")  # uvicorn's server log: shown at --log-level info


class QueueFull(Exception):
    pass


@dataclass
class Update:
    """What a job learned since its last update."""

    text: str  # newly visible text (stop strings held back until they cannot match)
    token_ids: list[int]  # newly generated ids (a final EOS / stop token included)
    logprobs: list[TokenLogprob]  # for those ids, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # once, with the first update, when asked for
    finish_reason: str | None = None  # set on the last update: "stop" or "length"
    error: str | None = None  # the job failed (set on the last update)


class Outbox:
    """A thread-safe way for the scheduler thread to hand updates to one asyncio consumer (the
    handler of one request, which may have several jobs: n choices, several prompts)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[tuple[Job, Update]] = asyncio.Queue()

    def put(self, job: Job, update: Update) -> None:
        deliver(self.loop, [(self, job, update)])

    async def get(self) -> tuple[Job, Update]:
        return await self.queue.get()


def deliver(loop: asyncio.AbstractEventLoop, mail: list[tuple[Outbox, Job, Update]]) -> None:
    """Hand a batch of updates to an event loop in ONE wake-up (each wake-up is a write to the
    loop's self-pipe and a handover of the GIL: per update, they cost more than the update)."""

    def put_all() -> None:
        for outbox, job, update in mail:
            outbox.queue.put_nowait((job, update))

    try:
        loop.call_soon_threadsafe(put_all)
    except RuntimeError:  # the event loop is closed: nobody is listening any more
        pass


@dataclass(eq=False)
class Job:
    index: int  # the choice's index in its response
    prompt_ids: list[int]
    params: SamplingParams
    outbox: Outbox
    cancelled: bool = False
    seq: Sequence | None = None
    sent_tokens: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class Scheduler:
    def __init__(self, engine: Engine, *, max_queue: int = 64, metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}  # engine row -> job
        self._calls: list[tuple[Callable, concurrent.futures.Future]] = []
        self._mail: list[tuple[Outbox, Job, Update]] = []  # updates of this iteration, delivered together
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="smoe-scheduler", daemon=True)

    # ---------------------------------------------------------------- called from HTTP handlers
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        """Raise GenerationError if a job could never run (context too long, ...)."""
        self.engine.check(prompt_len, params)

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs together (the n choices of one request), or none of them if the queue is full."""
        with self._cond:
            free = self.engine.rows.count(None)  # rows the loop will hand to waiting jobs first
            if len(self._waiting) + len(jobs) > self.max_queue + free:
                raise QueueFull(f"the server's queue is full ({len(self._waiting)} waiting for "
                                f"{len(self.engine.rows)} rows, at most {self.max_queue} may wait); retry later")
            self._waiting.extend(jobs)
            self.metrics.queue_length.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        with self._cond:
            job.cancelled = True
            self._cond.notify()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn(engine) on the scheduler thread between steps (for work that needs the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ the scheduler thread
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._calls):
                    # an engine stepped in lockstep with other ranks wants a heartbeat while idle
                    if not self._cond.wait(timeout=getattr(self.engine, "heartbeat_s", None)):
                        self.engine.heartbeat()
                if self._stopping:
                    break
                calls, self._calls = self._calls, []
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(self.engine))
                    except Exception as e:  # handed to the caller, who turns it into an HTTP error
                        future.set_exception(e)
            try:
                self._reap()
                self._admit()
                self._prefill_one()
                self._decode()
            except Exception as e:  # a bug or an out-of-memory: fail the jobs in flight, keep serving
                for job in list(self._running.values()):
                    self._finish(job, Update("", [], [], error=f"internal error: {type(e).__name__}: {e}"))
            self._deliver()
            self.metrics.running.set(len(self._running))
            self.metrics.queue_length.set(len(self._waiting))
        for job in [*self._waiting, *self._running.values()]:
            job.outbox.put(job, Update("", [], [], error="the server is shutting down"))
        if hasattr(self.engine, "close"):  # the other ranks stop too
            self.engine.close()

    def _reap(self) -> None:
        with self._cond:
            gone = [j for j in self._waiting if j.cancelled]
            for job in gone:
                self._waiting.remove(job)
        for job in [j for j in self._running.values() if j.cancelled]:
            self._release(job)
            self.metrics.cancelled.inc()
        self.metrics.cancelled.inc(len(gone))

    def _admit(self) -> None:
        while None in self.engine.rows:
            with self._cond:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            try:
                job.seq = self.engine.admit(job.prompt_ids, job.params)
            except GenerationError as e:  # checked before submit; a last line of defence
                self._post(job, Update("", [], [], error=str(e)))
                continue
            self._running[job.seq.row] = job

    def _prefill_one(self) -> None:
        prefilling = self.engine.prefilling
        if not prefilling:
            return
        seq = min(prefilling, key=lambda s: self._running[s.row].submitted)
        job = self._running[seq.row]
        text = self.engine.prefill(seq)
        if not seq.prefilling:
            job.first_token_at = time.perf_counter()
            self.metrics.time_to_first_token.observe(job.first_token_at - job.submitted)
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            self._send(job, text, prompt_logprobs=seq.prompt_logprobs if seq.params.prompt_logprobs is not None
                       else None)

    def _decode(self) -> None:
        if not self.engine.active:
            return
        t0 = time.perf_counter()
        out = self.engine.step()
        self.metrics.observe_step(len(out), time.perf_counter() - t0)
        for seq, text in out:
            self._send(self._running[seq.row], text)

    def _send(self, job: Job, text: str, prompt_logprobs: list[TokenLogprob] | None = None) -> None:
        seq = job.seq
        new_ids = seq.token_ids[job.sent_tokens :]
        logprobs = seq.logprobs[job.sent_tokens :] if seq.params.logprobs is not None else []
        job.sent_tokens = len(seq.token_ids)
        self.metrics.generation_tokens.inc(len(new_ids))
        update = Update(text, new_ids, logprobs, prompt_logprobs, seq.finish_reason)
        if seq.finished:
            self._finish(job, update)
        else:
            self._post(job, update)

    def _post(self, job: Job, update: Update) -> None:
        self._mail.append((job.outbox, job, update))

    def _deliver(self) -> None:
        mail, self._mail = self._mail, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in mail:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            deliver(loop, items)

    def _finish(self, job: Job, update: Update) -> None:
        self._release(job)
        self._post(job, update)
        if update.error is None and job.seq is not None and job.first_token_at is not None:
            seq = job.seq
            n = len(seq.token_ids)
            elapsed = time.perf_counter() - job.first_token_at
            rate = (n - 1) / elapsed if n > 1 and elapsed > 0 else 0.0
            if rate:
                self.metrics.request_tokens_per_s.observe(rate)
            LOG.info("sequence done: %d prompt tokens, %d generated (%s), first token after %.0f ms, %.1f tokens/s",
                     len(seq.prompt_ids), n, seq.finish_reason, (job.first_token_at - job.submitted) * 1000, rate)

    def _release(self, job: Job) -> None:
        if job.seq is not None:
            self.engine.remove(job.seq)
            self._running.pop(job.seq.row, None)
