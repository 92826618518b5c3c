"""The CLI as a user runs it: generate --json, inspect, random-checkpoint, and clean errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routed.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_json(tiny_preset: Path) -> None:
    res = run("generate", "--model", str(tiny_preset), "--max-tokens", "6", "--temperature", "0", "--json",
              "Hello")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["completion_tokens"] == len(out["token_ids"]) == 6 and out["prompt_tokens"] >= 1
    assert out["seconds"] > 0 and out["tokens_per_second"] > 0 and isinstance(out["text"], str)
    chat = run("generate", "--model", str(tiny_preset), "--max-tokens", "3", "--chat", "--json", "--seed", "1",
               "Hi there")
    assert chat.returncode == 0 and json.loads(chat.stdout)["prompt_tokens"] > out["prompt_tokens"]


def test_generate_and_the_engine_quantize_at_load(tiny_preset: Path) -> None:
    from routed.config import EngineConfig
    from routed.engine.engine import LLMEngine
    from routed.quant.linear import QLinear

    engine = LLMEngine.from_pretrained(tiny_preset, config=EngineConfig(quant="int8"), progress=False)
    heads = [m for m in engine.model.modules() if isinstance(m, QLinear)]
    assert heads and all(m.fmt.bits == 8 for m in heads)
    res = run("generate", "--model", str(tiny_preset), "--quant", "int4", "--max-tokens", "4", "--temperature", "0",
              "--json", "Hello")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["completion_tokens"] == 4
    bad = run("generate", "--model", str(tiny_preset), "--quant", "int3", "Hello")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr


def test_inspect_counts_match_headers(tiny_preset: Path) -> None:
    res = run("inspect", "--model", str(tiny_preset), "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    total = 0
    for file in tiny_preset.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    assert info["parameters"]["total"] == total
    assert info["layers"] == {"total": 3, "dense": 1, "moe": 2, "mtp_modules": 1}
    assert info["latent_cache_bytes_per_token"] == (32 + 16) * 3 * 2
    assert run("inspect", "--model", str(tiny_preset)).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["generate", "--model", "/no/such/folder", "hi"], "no such file or folder"),
    (["inspect", "--model", "/tmp"], "no config.json"),
    (["random-checkpoint", "--preset", "tiny", "--out", "/"], "not empty"),
])
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    res = run(*args)
    assert res.returncode == 1
    assert message in res.stderr and "Traceback" not in res.stderr and res.stderr.count("\n") == 1


def test_bad_flag_values_exit_nonzero() -> None:
    res = run("generate", "--model", "x", "--max-tokens", "0", "hi")
    assert res.returncode == 2 and "must be at least 1" in res.stderr
    res = run("generate", "--model", "x", "--top-p", "2", "hi")
    assert res.returncode == 1 and "top_p" in res.stderr


def test_bench_json_and_quantize(tiny_preset: Path, tmp_path: Path) -> None:
    res = run("bench", "--model", str(tiny_preset), "--prompt-len", "32", "--gen-len", "4", "--batch", "1,2",
              "--repeats", "1", "--threads", "1", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    kinds = [(r["kind"], r["batch"]) for r in out["runs"]]
    assert kinds == [("prefill", 1), ("decode", 1), ("decode", 2)]
    assert all(r["tokens_per_second"] > 0 for r in out["runs"])
    assert out["runs"][1]["weight_bytes_per_step"] < out["runs"][2]["weight_bytes_per_step"] < out["weight_bytes"]
    assert out["model"]["config"]["hidden_size"] == 128 and out["cost"]["usd_per_mtok_output"] > 0
    assert out["engine"]["compiled_decode"] is False and out["engine"]["gemv"] is False  # 68 MB: below 256 MiB
    assert 0 < out["kv_cache_bytes"] <= 2**29  # the bench's engine: a latent cache of at most 0.5 GiB
    # the runtime before any weight (Python, PyTorch) is measured apart; the weights come on top of it
    assert 50e6 < out["runtime_rss_bytes"] < out["peak_rss_bytes"] - out["weight_bytes"]
    assert out["tokenizer_rss_bytes"] is not None  # counted in the runtime: a fixed cost, not the weights'
    res = run("quantize", "--model", str(tiny_preset), "--to", "int8", "--out", str(tmp_path / "q8"),
              "--check-tokens", "64", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["quality"]["kl"] < 0.01 and len(report["quality"]["identical"]) == 2
    gen = run("generate", "--model", str(tmp_path / "q8"), "--max-tokens", "3", "--json", "hi")
    assert gen.returncode == 0 and json.loads(gen.stdout)["completion_tokens"] == 3
    again = run("quantize", "--model", str(tmp_path / "q8"), "--to", "int4", "--out", str(tmp_path / "q4"))
    assert again.returncode == 1 and "already quantized (int8)" in again.stderr and "Traceback" not in again.stderr
    assert run("bench", "--model", str(tiny_preset), "--batch", "x").returncode == 1


def test_bench_keeps_its_figures_when_transformers_cannot_run(tiny_preset: Path, monkeypatch, capsys) -> None:
    """--compare-transformers on a checkpoint transformers cannot load (an FP8 one without accelerate): routed's
    figures are printed, then one clear error, exit 1 — no traceback, nothing lost."""
    import routed.bench
    from routed.cli import main

    def fail(*args, **kwargs):
        raise ImportError("Loading an FP8 quantized model requires accelerate (`pip install accelerate`)\nmore")

    monkeypatch.setattr(routed.bench, "bench_transformers", fail)
    argv = ["bench", "--model", str(tiny_preset), "--prompt-len", "16", "--gen-len", "2", "--batch", "1",
            "--repeats", "1", "--compare-transformers"]  # no --threads: in this process it would stay set
    assert main(argv + ["--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in out["runs"]] == ["prefill", "decode"] and "transformers" not in out
    assert out["transformers_error"] == ("ImportError: Loading an FP8 quantized model requires accelerate "
                                         "(`pip install accelerate`)")
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "prefill 16" in captured.out and "Traceback" not in captured.err
    assert "transformers could not run this checkpoint (ImportError: Loading an FP8" in captured.err
