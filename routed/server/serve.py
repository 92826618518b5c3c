"""`routed serve`: load the model in the background, serve HTTP at once (503 until ready), drain on SIGTERM.

SIGTERM or Ctrl-C: stop admitting (503), let in-flight requests finish for up to `drain_timeout` seconds,
abort the rest, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import uvicorn

from routed.config import EngineConfig
from routed.engine.async_engine import AsyncEngine
from routed.engine.engine import LLMEngine
from routed.server.app import create_app
from routed.server.metrics import Metrics

log = logging.getLogger("routed.serve")


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.drain_timeout = engine, drain_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame: object) -> None:
        if self._draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info("draining: no new requests; waiting up to %.0fs for %d in flight", self.drain_timeout,
                 self.engine.in_flight)
        loop = asyncio.get_event_loop()
        task = loop.create_task(self.engine.drain(self.drain_timeout))
        # should_exit rather than super().handle_exit: uvicorn would re-raise the signal at exit (status -15)
        task.add_done_callback(lambda _: setattr(self, "should_exit", True))


def serve(model: str | Path, host: str, port: int, api_key: str | None, dtype: str, engine_config: EngineConfig,
          served_model_name: str | None, max_body_bytes: int, drain_timeout: float,
          price_per_hour: float = 0.10) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = Path(model)
    engine = AsyncEngine(lambda: LLMEngine.from_pretrained(path, dtype, engine_config, progress=False),
                         max_waiting=engine_config.max_waiting)
    metrics = Metrics(engine, price_per_hour)
    engine.on_finish = metrics.observe
    app = create_app(engine, metrics, served_model_name or path.name, api_key, max_body_bytes)
    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    server = _DrainingServer(config, engine, drain_timeout)
    log.info("serving %s on http://%s:%d (model loading in the background)", path, host, port)
    server.run()
    engine.shutdown()
    if threading.active_count() > 1:
        log.debug("threads left: %s", threading.enumerate())
