"""The OpenAI-compatible HTTP API over the AsyncEngine.

Routes: POST /v1/chat/completions, POST /v1/completions (SSE streaming or not, `usage` always, on the last
stream chunk too), GET /v1/models, GET /health, GET /metrics. Every error a client can cause comes back in
OpenAI's error shape with its status: 400 invalid request, 401 bad or missing key, 404 unknown model or
route, 413 body too large, 429 queue full, 503 loading or draining; never a 500.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from routed.engine.async_engine import AsyncEngine, EngineFailed, QueueFull, Unavailable
from routed.engine.request import RequestOutput, TokenLogprob
from routed.errors import RoutedError
from routed.sampling import SamplingParams
from routed.server.metrics import Metrics
from routed.server.protocol import ChatCompletionRequest, CompletionRequest, _Sampling, error_body

_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "request_too_large", 429: "rate_limit_exceeded",
          500: "internal_error", 503: "service_unavailable"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, _KINDS.get(status, "invalid_request_error"), status, param), status)


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        too_big = _error(413, f"request body exceeds {self.max_bytes} bytes")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except ApiError as e:
            await _error(e.status, e.message)(scope, receive, send)


def create_app(engine: AsyncEngine, metrics: Metrics, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="routed", version="0.1.0", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)

    async def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), api_key.encode())):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, e: ApiError) -> JSONResponse:
        if e.status != 401:
            metrics.requests.labels(status=str(e.status)).inc()
        return _error(e.status, e.message, e.param)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        metrics.requests.labels(status="400").inc()
        if first.get("type") == "json_invalid":
            return _error(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", where or None)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, e: Exception) -> JSONResponse:
        metrics.requests.labels(status="500").inc()
        return _error(500, f"internal error: {type(e).__name__}")

    # ---- plain routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        body: dict[str, Any] = {"status": engine.state, "in_flight": engine.in_flight}
        if engine.error:
            body["error"] = engine.error
        if engine.engine is not None:
            body["routing_alerts"] = [a.as_dict() for a in engine.engine.routing.alerts()]
            if (ranks := engine.engine.ranks()) is not None:
                body["ranks"] = ranks
        return JSONResponse(body, 200 if engine.state == "ready" else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "routed"}
        if engine.engine is not None:
            card["max_model_len"] = engine.engine.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/v1/routing", dependencies=[Depends(check_key)])
    async def routing() -> dict[str, Any]:
        """Layers x experts counts for the cumulative and sliding windows, their measures, the alerts."""
        ready = ready_engine()
        snapshot = ready.routing.snapshot()
        if (ranks := ready.ranks()) is not None:  # expert parallelism: the load each rank carried
            snapshot["ranks"] = ranks
        return snapshot

    @app.post("/v1/routing/reset", dependencies=[Depends(check_key)])
    async def routing_reset() -> dict[str, Any]:
        ready_engine().reset_routing()
        return {"reset": True}

    # ---- generation --------------------------------------------------------------------------------
    def ready_engine():  # noqa: ANN202
        if engine.state != "ready" or engine.engine is None:
            if engine.error:  # failed: say why (a bad checkpoint, an expert-parallel rank that died)
                raise ApiError(503, f"the engine is {engine.state}: {engine.error}")
            raise ApiError(503, f"the engine is {engine.state}; retry later")
        return engine.engine

    def sampling(body: _Sampling, prompt_len: int, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if body.model != model_name:
            raise ApiError(404, f"the model `{body.model}` does not exist; this server serves `{model_name}`",
                           "model")
        context = ready_engine().max_model_len
        if prompt_len >= context:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; the context is {context}", "messages")
        if max_tokens is not None and max_tokens > context:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the context of {context} tokens", "max_tokens")
        try:
            return SamplingParams(
                max_tokens=max_tokens or context - prompt_len, temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k, seed=body.seed, stop=[body.stop] if isinstance(body.stop, str) else body.stop or [],
                stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logprobs=logprobs,
            )
        except RoutedError as e:
            raise ApiError(400, str(e)) from None

    def start(prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        try:
            return engine.generate(prompt_ids, params, request_id)
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        except Unavailable as e:
            raise ApiError(503, str(e)) from None
        except RoutedError as e:
            raise ApiError(400, str(e)) from None

    async def respond(
        request: Request, body: _Sampling, outputs: AsyncIterator[RequestOutput], request_id: str,
        chunk: Callable[[RequestOutput, bool], dict[str, Any]], final: Callable[[list[RequestOutput]], dict],
    ) -> Response:
        if body.stream:
            async def events() -> AsyncIterator[str]:
                first = True
                try:
                    async for out in outputs:
                        yield f"data: {json.dumps(chunk(out, first))}\n\n"
                        first = False
                    metrics.requests.labels(status="200").inc()
                except (EngineFailed, Unavailable) as e:
                    yield f"data: {json.dumps(error_body(str(e), 'service_unavailable', 503))}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": request_id})

        collected: list[RequestOutput] = []

        async def collect() -> None:
            async for out in outputs:
                collected.append(out)

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                metrics.requests.labels(status="499").inc()
                return Response(status_code=499)
        try:
            task.result()
        except (EngineFailed, Unavailable) as e:
            raise ApiError(503, str(e)) from None
        metrics.requests.labels(status="200").inc()
        return JSONResponse(final(collected))

    def usage(out: RequestOutput) -> dict[str, Any]:
        return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                "total_tokens": out.prompt_tokens + out.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": out.cached_tokens}}

    def token_text(token_id: int) -> str:
        return ready_engine().tokenizer.decode([token_id])

    def chat_logprob(lp: TokenLogprob) -> dict[str, Any]:
        def entry(t: int, v: float) -> dict[str, Any]:
            s = token_text(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        llm = ready_engine()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt_ids = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except RoutedError as e:
            raise ApiError(400, str(e), "messages") from None
        params = sampling(body, len(prompt_ids), body.max_completion_tokens or body.max_tokens,
                          (body.top_logprobs or 0) if body.logprobs else None)
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = start(prompt_ids, params, request_id)
        head = {"id": request_id, "created": created, "model": model_name}
        want_logprobs = params.logprobs is not None

        def chunk(out: RequestOutput, first: bool) -> dict[str, Any]:
            delta: dict[str, Any] = {"content": out.text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": out.finish_reason,
                                      "logprobs": {"content": [chat_logprob(lp) for lp in out.logprobs]}
                                      if want_logprobs else None}
            return {**head, "object": "chat.completion.chunk", "choices": [choice],
                    **({"usage": usage(out)} if out.finished else {})}

        def final(outs: list[RequestOutput]) -> dict[str, Any]:
            last = outs[-1]
            choice = {"index": 0, "message": {"role": "assistant", "content": "".join(o.text for o in outs)},
                      "finish_reason": last.finish_reason,
                      "logprobs": {"content": [chat_logprob(lp) for o in outs for lp in o.logprobs]}
                      if want_logprobs else None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(last)}

        return await respond(request, body, outputs, request_id, chunk, final)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        llm = ready_engine()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "send one prompt per request (batched prompts are not supported)", "prompt")
            prompt = prompt[0]
        prompt_ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", "prompt")
        params = sampling(body, len(prompt_ids), body.max_tokens, body.logprobs)
        request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        outputs = start(prompt_ids, params, request_id)
        head = {"id": request_id, "created": created, "model": model_name, "object": "text_completion"}
        echo = llm.tokenizer.decode(prompt_ids) if body.echo else ""

        def logprobs(outs: list[RequestOutput]) -> dict[str, Any] | None:
            if params.logprobs is None:
                return None
            lps = [lp for o in outs for lp in o.logprobs]
            tokens = [token_text(lp.token_id) for lp in lps]
            offsets, at = [], len(echo)
            for t in tokens:
                offsets.append(at)
                at += len(t)
            return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                    "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}

        def chunk(out: RequestOutput, first: bool) -> dict[str, Any]:
            choice = {"index": 0, "text": (echo if first else "") + out.text, "finish_reason": out.finish_reason,
                      "logprobs": logprobs([out])}
            return {**head, "choices": [choice], **({"usage": usage(out)} if out.finished else {})}

        def final(outs: list[RequestOutput]) -> dict[str, Any]:
            choice = {"index": 0, "text": echo + "".join(o.text for o in outs),
                      "finish_reason": outs[-1].finish_reason, "logprobs": logprobs(outs)}
            return {**head, "choices": [choice], "usage": usage(outs[-1])}

        return await respond(request, body, outputs, request_id, chunk, final)

    return app

