"""The server as clients use it: the official openai client against `routed serve` on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "routed.cli", "serve", "--model", str(model), "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stdout.read())
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def client(self, key: str = KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, **kw)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_preset: Path) -> Iterator[Server]:
    srv = Server(tiny_preset, "--api-key", KEY, "--dtype", "fp32", "--max-model-len", "512", "--max-num-seqs", "8",
                 "--served-model-name", "tiny", "--max-body-bytes", "100000")
    yield srv
    assert srv.stop() == 0


def test_chat_streamed_and_not_agree_with_usage(server: Server) -> None:
    client = server.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("length", "stop")
    assert full.usage.completion_tokens <= 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12 or \
        full.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    from routed.tokenizer import Tokenizer
    from routed.presets import tokenizer_files

    tok = Tokenizer.from_pretrained(tokenizer_files()[0].parent)
    assert full.usage.prompt_tokens == len(tok.apply_chat_template(messages, tokenize=True))


def test_server_greedy_equals_routed_generate(server: Server, tiny_preset: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "routed.cli", "generate", "--model", str(tiny_preset), "--json",
                          "--dtype", "fp32", "--temperature", "0", "--max-tokens", "10", "Once upon a time"],
                         capture_output=True, text=True, timeout=300)
    expected = json.loads(res.stdout)
    got = server.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert got.choices[0].text == expected["text"]
    assert got.usage.prompt_tokens == expected["prompt_tokens"]


def test_stop_strings_logprobs_and_seeds(server: Server) -> None:
    client = server.client()
    base = client.completions.create(model="tiny", prompt="The sky is", max_tokens=12, temperature=0,
                                     logprobs=3).choices[0]
    assert len(base.logprobs.tokens) == len(base.logprobs.token_logprobs) == 12 or base.finish_reason == "stop"
    for chosen, top in zip(base.logprobs.token_logprobs, base.logprobs.top_logprobs):
        assert chosen <= 0 and len(top) == 3 and max(top.values()) == pytest.approx(chosen)  # greedy = best
    stop = base.text[4:7]
    stopped = client.completions.create(model="tiny", prompt="The sky is", max_tokens=12, temperature=0,
                                        stop=[stop]).choices[0]
    assert stopped.text == base.text[: base.text.index(stop)] and stopped.finish_reason == "stop"
    draws = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, temperature=1.0, seed=s).choices[0].message.content
             for s in (5, 5, 6)]
    assert draws[0] == draws[1] != draws[2]
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)


def test_client_errors_have_openai_shape_and_status(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="exceeds the context"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=list(range(1000, 1600)), max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[], max_tokens=2)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    cases = [
        (httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers=headers), 400),
        (httpx.post(f"{server.url}/v1/completions", headers=headers,
                    content=json.dumps({"model": "tiny", "prompt": "x" * 200_000})), 413),
        (httpx.get(f"{server.url}/v1/nothing-here", headers=headers), 404),
        (httpx.post(f"{server.url}/v1/completions", headers={"Content-Type": "application/json"},
                    content=json.dumps({"model": "tiny", "prompt": "x"})), 401),
    ]
    for response, status in cases:
        assert response.status_code == status
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert server.metric("routed_requests_total") > 0


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ready"


def test_disconnect_mid_stream_frees_blocks(server: Server) -> None:
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.metric("routed_running_requests") == 1 and server.metric("routed_cache_usage") > 0
    deadline = time.monotonic() + 10
    while server.metric("routed_running_requests") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("routed_running_requests") == 0 and server.metric("routed_cache_usage") == 0


def test_32_concurrent_streams_all_answered(server: Server) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

    async def one(i: int) -> tuple[str, int]:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=8, stream=True,
            temperature=0.5, seed=i)
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def main() -> list[tuple[str, int]]:
        return await asyncio.gather(*(one(i) for i in range(32)))

    results = asyncio.run(main())
    assert len(results) == 32 and all(n == 8 or n >= 1 for _, n in results)


def test_queue_full_is_429(tiny_preset: Path) -> None:
    srv = Server(tiny_preset, "--max-num-seqs", "1", "--max-waiting", "1", "--max-model-len", "512")
    try:
        statuses: list[int] = []

        def hit() -> None:
            try:
                r = httpx.post(f"{srv.url}/v1/completions", timeout=600,
                               json={"model": tiny_preset.name, "prompt": "x", "max_tokens": 100, "ignore_eos": True})
                statuses.append(r.status_code)
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)

        threads = [threading.Thread(target=hit) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}
    finally:
        assert srv.stop() == 0


def test_routing_endpoint_metrics_and_reset(server: Server) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    httpx.post(f"{server.url}/v1/routing/reset", headers=headers).raise_for_status()
    server.client().completions.create(model="tiny", prompt="count my experts", max_tokens=5, temperature=0)
    body = httpx.get(f"{server.url}/v1/routing", headers=headers).json()
    assert body["layers"] == [1, 2] and body["num_experts"] == 16 and body["top_k"] == 4
    cumulative = body["windows"]["cumulative"]
    n_tokens = cumulative["tokens"]  # prompt + 4 decode steps (the 5th token is sampled, never fed back)
    assert n_tokens >= 5 and [sum(row) for row in cumulative["expert_counts"]] == [4 * n_tokens] * 2
    assert {"max_vio", "entropy", "dead", "gate_margin", "topk_mass"} <= set(cumulative["measures"][0])
    text = httpx.get(f"{server.url}/metrics").text
    assert 'routed_routing_max_vio{layer="1"}' in text and 'routed_routing_alerts{kind="collapse"}' in text
    assert "routing_alerts" in httpx.get(f"{server.url}/health").json()
    httpx.post(f"{server.url}/v1/routing/reset", headers=headers).raise_for_status()
    assert httpx.get(f"{server.url}/v1/routing", headers=headers).json()["windows"]["cumulative"]["tokens"] == 0
    assert httpx.get(f"{server.url}/v1/routing").status_code == 401


def test_sigterm_drains_in_flight_then_exits_0(tiny_preset: Path, tmp_path: Path) -> None:
    recording = tmp_path / "routing.safetensors"
    srv = Server(tiny_preset, "--max-model-len", "512", "--drain-timeout", "60", "--record-routing", str(recording))
    body = {"model": tiny_preset.name, "prompt": "x", "max_tokens": 150, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=120) as response:
        lines = response.iter_lines()
        next(lines)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(f"{srv.url}/health").status_code == 503
        rest = [line for line in lines if line]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
    assert srv.proc.wait(timeout=60) == 0
    from routed.telemetry import Recording

    rec = Recording.load(recording)  # written at shutdown
    assert int(rec.tokens_T.sum()) >= 150 and rec.layers == [1, 2]


def test_503_while_loading() -> None:
    from routed.engine.async_engine import AsyncEngine
    from routed.server.app import create_app
    from routed.server.metrics import Metrics

    release = threading.Event()

    def slow_load():  # noqa: ANN202
        release.wait(10)
        raise RuntimeError("no model in this test")

    engine = AsyncEngine(slow_load)
    engine.start()
    app = create_app(engine, Metrics(engine), "m")

    async def main() -> tuple[int, int, dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            health = await c.get("/health")
            chat = await c.post("/v1/chat/completions",
                                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
            return health.status_code, chat.status_code, chat.json()

    health, chat, body = asyncio.run(main())
    release.set()
    assert health == 503 and chat == 503 and body["error"]["type"] == "service_unavailable"


def test_binds_loopback_by_default() -> None:
    from routed.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1" and os.environ.get("ROUTED_API_KEY") is None


def test_cost_gauges_follow_measured_throughput(server: Server) -> None:
    server.client().completions.create(model="tiny", prompt="cost me", max_tokens=6, temperature=0)
    assert server.metric("routed_price_per_hour_usd") == pytest.approx(0.10)
    out, inp = server.metric("routed_cost_usd_per_mtok_output"), server.metric("routed_cost_usd_per_mtok_input")
    assert out > 0 and inp > 0


def test_cost_per_mtok_arithmetic() -> None:
    from routed.engine.async_engine import AsyncEngine
    from routed.server.metrics import Metrics

    metrics = Metrics(AsyncEngine(lambda: None), price_per_hour=3.6)  # $0.001 per second
    now = time.monotonic()
    metrics._finished.extend([(now - 10, 500, 1000), (now, 500, 1000)])  # 1000 prompt, 2000 generated in 10 s
    inp, out = metrics.cost_per_mtok()
    assert inp == pytest.approx(0.001 / 100 * 1e6, rel=0.01) and out == pytest.approx(0.001 / 200 * 1e6, rel=0.01)
