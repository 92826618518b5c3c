"""AsyncEngine: the LLMEngine in a background thread, with one asyncio queue per request.

The thread loads the model (state `loading` -> `ready`, or `failed`), then loops: apply queued commands
(add, abort), run one `step()`, hand each output to its request's queue on the caller's event loop. Callers
iterate `generate(...)`; leaving the iteration early (a client that disconnects) aborts the request, which
frees its cache blocks before the next step. `drain()` stops admitting, lets in-flight requests finish
within a timeout and aborts the rest.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from routed.engine.engine import EngineStats, LLMEngine
from routed.engine.request import RequestOutput
from routed.errors import RoutedError
from routed.parallel.ep import RankFailed
from routed.sampling import SamplingParams

log = logging.getLogger(__name__)


class Unavailable(RoutedError):
    """The engine is loading, draining or failed: try again later (HTTP 503)."""


class QueueFull(RoutedError):
    """Too many requests are waiting (HTTP 429)."""


class EngineFailed(RoutedError):
    """The engine hit an internal error while running this request."""


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float


class AsyncEngine:
    def __init__(self, load: Callable[[], LLMEngine], max_waiting: int = 256,
                 on_finish: Callable[[RequestOutput, float, float | None, float], None] | None = None) -> None:
        self._load = load
        self.max_waiting = max_waiting
        self.on_finish = on_finish  # (final output, submitted, first token time, finish time) for metrics
        self.engine: LLMEngine | None = None
        self.state = "loading"
        self.error: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._first_token: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="routed-engine", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        if self.engine is not None:
            self.engine.routing.save_recording()
            self.engine.close()

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> None:
        """Stop admitting; wait up to `timeout` s for in-flight requests, then abort what is left."""
        if self.state == "ready":
            self.state = "draining"
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self._fail(request_id, Unavailable("the server is shutting down"))
            self.abort(request_id)

    def stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine else None

    # ---- requests ----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        """Check and queue a request (raising Unavailable, QueueFull or RoutedError at once), then stream it.

        Call from a running event loop; iterate the result to receive the outputs.
        """
        if self.state != "ready" or self.engine is None:
            raise Unavailable(f"the engine is {self.state}" + (f": {self.error}" if self.error else ""))
        waiting = len(self._streams) - self.engine.stats().running  # queued here or in the scheduler
        if waiting >= self.max_waiting:
            raise QueueFull(f"{waiting} requests are already waiting; retry later")
        self.engine.check_request(prompt_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt_ids, params))
        self._wake.set()
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ---- the engine thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._load()
        except Exception as e:  # a bad checkpoint: report it on /health, refuse requests
            log.error("loading failed: %s", e)
            self.state, self.error = "failed", str(e)
            return
        if self.state == "loading":
            self.state = "ready"
        engine = self.engine
        while not self._stop:
            self._apply_commands(engine)
            try:
                engine.check_ranks()
                if not engine.has_unfinished():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                outputs = engine.step()
            except RankFailed as e:  # the group is broken: fail everything in flight, refuse new work
                log.error("%s; the engine stops", e)
                self.state, self.error = "failed", str(e)
                for request_id in list(engine.requests):
                    self._fail(request_id, EngineFailed(str(e)))
                    engine.abort(request_id)
                engine.close()
                return
            except Exception as e:
                log.exception("engine step failed; failing its requests")
                for request_id in list(engine.requests):
                    self._fail(request_id, EngineFailed(f"internal engine error: {e}"))
                    engine.abort(request_id)
                continue
            now = time.monotonic()
            for out in outputs:
                self._first_token.setdefault(out.request_id, now)
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
                if out.finished:
                    first = self._first_token.pop(out.request_id, None)
                    if self.on_finish and stream is not None:
                        self.on_finish(out, stream.submitted, first, now)

    def _apply_commands(self, engine: LLMEngine) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                _, request_id, prompt_ids, params = command
                if request_id not in self._streams:  # the caller left before we got to it
                    continue
                try:
                    engine.add_request(prompt_ids, params, request_id)
                except RoutedError as e:
                    self._fail(request_id, e)
            else:
                engine.abort(command[1])
                self._first_token.pop(command[1], None)

    def _fail(self, request_id: str, error: Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
