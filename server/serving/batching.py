"""Dynamic batching: a bounded queue of requests and one worker thread that generates for them.

The HTTP side (asyncio) submits a :class:`Handle` per request and awaits its deltas and result;
the worker takes every queued request that can share one ``generate`` call (same served model,
same sampling settings; a seeded request goes alone so its seed reproduces) up to ``max_batch``,
runs them together, and posts the text back to the event loop. A full queue is refused at once
with 429 rather than left to time out, so a flood gets a clear answer and never a hung worker.
No torch here: what a batch does is the ``run_batch`` callable (:class:`server.serving.engine`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass

from server.serving.generation import ApiError, GenRequest, GenResult

logger = logging.getLogger(__name__)


@dataclass
class _Finished:
    outcome: GenResult | BaseException


class Handle:
    """One request between the event loop (reads) and the worker thread (writes)."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop) -> None:
        self.req, self._loop = req, loop
        self._events: asyncio.Queue[str | _Finished] = asyncio.Queue()
        self._outcome: GenResult | BaseException | None = None
        self.cancelled = False  # the client went away: the worker drops the row

    # ---- worker side
    def emit(self, delta: str) -> None:
        # Only a stream reads deltas: waking the event loop per token for a request that is
        # answered at the end costs a thread switch (and the GIL) on every step of the batch.
        if self.req.stream:
            self._post(delta)

    def finish(self, outcome: GenResult | BaseException) -> None:
        self._post(_Finished(outcome))

    def _post(self, item: str | _Finished) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled = True

    # ---- event-loop side
    async def deltas(self) -> AsyncIterator[str]:
        """Text deltas as they are generated; ends when the request is finished."""
        while self._outcome is None:
            item = await self._events.get()
            if isinstance(item, _Finished):
                self._outcome = item.outcome
                return
            yield item

    async def result(self) -> GenResult:
        async for _ in self.deltas():
            pass
        return self.outcome()

    def outcome(self) -> GenResult:
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        if self._outcome is None:
            raise RuntimeError("the request has not finished")
        return self._outcome


def batch_key(req: GenRequest, handle: Handle) -> Hashable:
    """Requests with equal keys can share one generate call."""
    if req.seed is not None:
        return ("seeded", id(handle))
    sampling = "greedy" if req.greedy else (req.temperature, req.top_p)
    return (req.model, sampling)


class Batcher:
    """Bounded FIFO queue; one worker thread runs ``run_batch`` on batches of compatible requests.

    ``gather_s``: after a batch of several requests, the next one waits up to this long for as
    many to queue again (clients answered together come back together); after a batch of one it
    does not wait, so a lone client pays nothing for batching.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Handle]], None],
        max_batch: int = 8,
        max_queue: int = 64,
        gather_s: float = 0.05,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("`max_batch` and `max_queue` must be at least 1")
        self.run_batch, self.max_batch, self.max_queue = run_batch, max_batch, max_queue
        self.gather_s = gather_s
        self._pending: deque[Handle] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._last_batch = 1
        self.in_flight = 0
        self._thread = threading.Thread(target=self._loop, name="fedtune-generate", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting for a batch (not counting the one running)."""
        return len(self._pending)

    def submit(self, handle: Handle) -> None:
        with self._cond:
            if self._closed:
                raise ApiError(
                    503, "server is shutting down", None, "shutting_down", "server_error"
                )
            if len(self._pending) >= self.max_queue:
                raise ApiError(429, f"server queue is full ({self.max_queue} requests waiting); "
                               "retry shortly", None, "queue_full", "requests")  # fmt: skip
            self._pending.append(handle)
            self._cond.notify_all()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests; refuse what is queued; let the running batch finish."""
        with self._cond:
            self._closed = True
            refused = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for handle in refused:
            handle.finish(ApiError(503, "server is shutting down", None, "shutting_down",
                                   "server_error"))  # fmt: skip
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if not batch:  # every compatible request was cancelled while queued
                continue
            self.in_flight = len(batch)
            try:
                self.run_batch(batch)
            except Exception as err:  # a generation bug must not kill the worker
                logger.exception("generation failed for a batch of %d", len(batch))
                for handle in batch:
                    handle.finish(ApiError(500, f"generation failed: {type(err).__name__}", None,
                                           "internal_error", "server_error"))  # fmt: skip
            finally:
                self.in_flight = 0

    def _take(self) -> list[Handle] | None:
        with self._cond:
            while not self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            want = min(self._last_batch, self.max_batch)
            deadline = time.monotonic() + self.gather_s
            while len(self._pending) < want and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            batch = self._compatible()
        self._last_batch = max(1, len(batch))
        return batch

    def _compatible(self) -> list[Handle]:
        """The first queued request and every later one that can join it, in arrival order."""
        first = self._pending[0]
        key = batch_key(first.req, first)
        batch: list[Handle] = []
        rest: deque[Handle] = deque()
        for handle in self._pending:
            if handle.cancelled:
                handle.finish(ApiError(499, "client closed the request", None, "cancelled"))
            elif len(batch) < self.max_batch and batch_key(handle.req, handle) == key:
                batch.append(handle)
            else:
                rest.append(handle)
        self._pending = rest
        return batch
