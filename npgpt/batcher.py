"""Dynamic batching: many callers, one worker thread, one packed inference for all of them.

    batcher = Batcher(classifier, max_batch_tokens=2048, max_wait_ms=5)
    future = batcher.submit(tokens)          # tokens: one request's token id lists (already cut)
    probs = future.result()                  # [n, num_classes], that request's rows alone
    timing = Timing(); batcher.submit(tokens, timing)   # also when it was taken and computed
    batcher.close()                          # refuse new work, answer what is queued, stop

Why: a server answers many small requests (one SMS each). Run one at a time, every request pays
the fixed cost of a forward pass (the weights streamed through the cache once per matmul) for a
few dozen tokens. Waiting a few milliseconds lets the requests that arrive meanwhile join one
packed pass (`npgpt.infer`: no padding, every matmul one GEMM over all their tokens).

The worker takes the oldest request, then more in arrival order while their tokens fit
`max_batch_tokens`, waiting for more until `max_wait_ms` after the oldest one arrived or after
the last pass ended, whichever is later: clients answered together by one pass send their next
requests together a moment later, and they should meet in the next pass rather than trail the
one request that arrived during it. While requests keep arriving, each one moves the end of the
wait to `max_wait_ms` after it, up to `WAIT_STRETCH` times `max_wait_ms` in all: the requests of
clients answered together reach the queue one by one, as fast as the server's event loop reads
them (a millisecond or more each), and a pass that started on the first few would leave the rest
to trail a whole pass behind. `max_batch_tokens=0` turns batching off: one request per pass. A
request larger than the budget runs alone.

No wait for a lone client: when the last pass of requests served one request and no other
arrived while it ran, nobody else is sending, and the next request runs at once (concurrency 1
pays no wait). Any sign of company (a pass of two or more, a request arriving during a pass)
brings the wait back for the next pass. Until a first pass of requests has run, company is
assumed; `call` jobs (an explanation, the server's warm-up) say nothing about the clients.

A request's answer equals `Classifier.predict_proba` on its texts alone, bit for bit: packed
inference (last-token pooling, or last-position with a fixed pad length) gives each text the same
numbers whichever texts share its pack (`npgpt.infer`'s "Bits"). A model that does not run packed
(`Classifier.packs` false: first-token or mean pooling, per-batch padding, no causal mask) has
each request run alone, exactly as predict_proba runs it.

`threads`: Numba and BLAS threads of the worker (Numba's count belongs to each thread).

Everything that touches the model runs on the worker thread, so the model is never used by two
threads at once; `call(fn)` runs other work there too (an explanation), alone.
Pure Python and NumPy: testable without HTTP (the HTTP layer is `npgpt.http_api`).
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from .errors import NpgptError
from .ops import softmax

DEFAULT_MAX_BATCH_TOKENS = 2048     # infer.packed_logits' pack size: one pack per batch
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_QUEUE = 256
WAIT_STRETCH = 10                   # arrivals stretch a pass's wait to this many max_wait at most


class QueueFull(NpgptError):
    """More requests are waiting than --max-queue allows: try again shortly."""


class Closed(NpgptError):
    """The batcher is shutting down and takes no new work."""


@dataclass
class Timing:
    """When a request went through the batcher (time.monotonic() seconds), filled by the worker:
    submitted, started (its pass began: the queue's wait is started - submitted), finished (its
    pass ended: the inference is finished - started, shared by every request of the pass);
    texts and tokens: the whole pass's."""
    submitted: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    texts: int = 0
    tokens: int = 0


@dataclass
class _Job:
    """One request waiting: its texts' token ids, or a function to run alone (`call`)."""
    future: Future
    arrived: float                           # time.monotonic() when submitted
    tokens: list = field(default_factory=list)
    fn: object = None
    timing: Timing = None

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


class Batcher:
    """A queue of requests and the one worker thread that answers them in packed batches."""

    def __init__(self, classifier, max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS, max_wait_ms=DEFAULT_MAX_WAIT_MS,
                 max_queue=DEFAULT_MAX_QUEUE, threads=None):
        if max_batch_tokens < 0 or max_wait_ms < 0 or max_queue < 1:
            raise NpgptError("--max-batch-tokens and --max-wait-ms must be >= 0, --max-queue >= 1")
        self.classifier = classifier
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = int(max_queue)
        self.threads = threads                 # Numba and BLAS threads of the worker (None: the default)
        self.batches = 0                       # passes run, for /health and the tests
        self._last_end = 0.0                   # time.monotonic() when the last pass ended
        self._lone = False                     # the last pass served one request, none arrived meanwhile
        self._arrived_in_pass = 0              # requests submitted while the current pass runs
        self._last_arrival = 0.0               # time.monotonic() when the latest job was queued
        self._jobs: deque[_Job] = deque()
        self._pending = 0                      # texts submitted and not yet answered
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="npgpt-batcher", daemon=True)
        self._thread.start()

    @property
    def batching(self) -> bool:
        """Whether requests may share a pass: on, and the model runs packed (`Classifier.packs`)."""
        return self.max_batch_tokens > 0 and self.classifier.packs

    @property
    def pending(self) -> int:
        """Texts submitted and not answered yet (queued or being computed)."""
        with self._cond:
            return self._pending

    def submit(self, tokens, timing: Timing = None) -> Future:
        """Queue one request's token id lists -> a Future of its probabilities [n, num_classes].
        timing: a Timing to fill (read it once the future is done). Raises QueueFull when
        max_queue requests are already waiting, Closed after close()."""
        now = time.monotonic()
        if timing is not None:
            timing.submitted = now
        return self._put(_Job(Future(), now, tokens=list(tokens), timing=timing), len(tokens))

    def call(self, fn) -> Future:
        """Run fn() on the worker thread, alone, in queue order -> a Future of its result."""
        return self._put(_Job(Future(), time.monotonic(), fn=fn), 1)

    def _put(self, job: _Job, n_texts: int) -> Future:
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"{len(self._jobs)} requests are queued, the limit (--max-queue) is {self.max_queue}")
            self._jobs.append(job)
            self._last_arrival = job.arrived
            self._pending += n_texts
            self._arrived_in_pass += 1
            self._cond.notify_all()
        return job.future

    def hurry(self) -> None:
        """Stop waiting for more requests to join a pass (max_wait 0): the server is stopping,
        what is queued runs now. New requests are still taken until close(). Safe in a signal
        handler: the condition's lock is re-entrant (an RLock), so a handler run while the main
        thread holds it in submit() cannot deadlock."""
        with self._cond:
            self.max_wait = 0.0
            self._cond.notify_all()

    def close(self, timeout=None) -> None:
        """Take no new work, answer every queued request, stop the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        if self.threads:            # Numba's thread count is per thread: set it where the model runs
            from .fastops import set_num_threads
            set_num_threads(self.threads)
        while True:
            jobs = self._collect()
            if not jobs:
                return                          # closing and nothing left
            with self._cond:
                self._arrived_in_pass = 0
            self._run(jobs)
            with self._cond:
                self._pending -= sum(1 if j.fn else len(j.tokens) for j in jobs)
                if jobs[0].fn is None:          # a pass of requests: what it says of the clients
                    self._lone = len(jobs) == 1 and self._arrived_in_pass == 0
                    self._last_end = time.monotonic()

    def _collect(self) -> list:
        """The next batch: the oldest job, then later ones while they fit the token budget and
        the wait has not run out: max_wait after the oldest one arrived or the last pass ended,
        or after the latest arrival while they keep coming (WAIT_STRETCH max_wait at most); none
        for a lone client or when closing (module docstring). [] when closed and empty."""
        with self._cond:
            while not self._jobs:
                if self._closing:
                    return []
                self._cond.wait()
            first = self._jobs.popleft()
            batch, tokens = [first], first.n_tokens
            if first.fn is not None or not self.batching:
                return batch
            start = max(first.arrived, self._last_end)
            while True:
                if self._jobs:
                    nxt = self._jobs[0]
                    if nxt.fn is not None or tokens + nxt.n_tokens > self.max_batch_tokens:
                        return batch
                    batch.append(self._jobs.popleft())
                    tokens += nxt.n_tokens
                    continue
                deadline = min(max(start, self._last_arrival) + self.max_wait,
                               start + WAIT_STRETCH * self.max_wait)
                left = deadline - time.monotonic()
                lone = self._lone and len(batch) == 1
                if left <= 0 or self._closing or lone or self.max_wait == 0:           # hurry() sets 0
                    return batch
                self._cond.wait(left)

    def _run(self, jobs: list) -> None:
        """One pass for the batch; each job's future gets its own rows (or the error)."""
        live = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            if live[0].fn is not None:
                live[0].future.set_result(live[0].fn())
                return
            tokens = [t for j in live for t in j.tokens]
            started = time.monotonic()
            logits = self.classifier.logits_of_tokens(tokens)            # [N,K]
            finished = time.monotonic()
            self.batches += 1
        except BaseException as e:              # noqa: BLE001 -- handed to the callers, never lost
            for j in live:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        n_tokens = sum(len(t) for t in tokens)
        ends = np.cumsum([len(j.tokens) for j in live])                  # [jobs]
        for j, rows in zip(live, np.split(logits, ends[:-1])):
            if j.timing is not None:
                j.timing.started, j.timing.finished = started, finished
                j.timing.texts, j.timing.tokens = len(tokens), n_tokens
            j.future.set_result(softmax(rows))                          # [n,K]
