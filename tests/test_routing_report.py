"""`routed stats` and `routed compare-routing` on tiny checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import routed
from conftest import make_checkpoint
from routed.telemetry.compare import _capture, compare_routing


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routed.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(Path(json.__file__).read_text())  # the stdlib's own source: on every machine
    return path


def test_stats_from_text_and_from_recording(tiny_preset: Path, text: Path, tmp_path: Path) -> None:
    res = cli("stats", "--model", str(tiny_preset), "--text", str(text), "--max-tokens", "1024", "--chunk-tokens",
              "256", "--out", str(tmp_path / "a"), "--save-recording", str(tmp_path / "rec.safetensors"), "--json")
    assert res.returncode == 0, res.stderr
    paths = json.loads(res.stdout)
    for key in ("heatmap", "balance", "over_time"):
        assert Path(paths[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = Path(paths["summary"]).read_text()
    assert "1024 tokens in 4 windows, 2 MoE layers, 16 routed experts, top-4" in summary
    res = cli("stats", "--recording", str(tmp_path / "rec.safetensors"), "--out", str(tmp_path / "b"), "--json")
    assert res.returncode == 0, res.stderr
    again = Path(json.loads(res.stdout)["summary"]).read_text()
    # the same counts give the same per-layer MaxVio rows (margins are not in a recording)
    rows = lambda s: [line.split("|")[1:5] for line in s.splitlines() if line.startswith("| 1 ") or  # noqa: E731
                      line.startswith("| 2 ")]
    assert rows(summary) == rows(again)


def test_stats_errors(tmp_path: Path) -> None:
    res = cli("stats", "--recording", str(tmp_path / "missing.safetensors"))
    assert res.returncode == 1 and "not a routing recording" in res.stderr
    res = cli("stats")
    assert res.returncode == 1 and "either --model" in res.stderr


def test_compare_routing_self_is_identical_and_perturbed_layer_moves(tmp_path: Path) -> None:
    folder, _ = make_checkpoint(tmp_path / "a")
    ids = torch.randint(0, 512, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    model = routed.load_model(folder, torch.float32, progress=False)
    same = compare_routing(model, routed.load_model(folder, torch.float32, progress=False), ids, 200)
    assert same.identical == [1.0, 1.0] and same.overlap == [1.0, 1.0] and same.kl == pytest.approx(0, abs=1e-9)
    # swap experts 0 and 1 in layer 2's router (rows and bias): layer 1 is untouched; in layer 2 a token's set
    # changes exactly when it holds one of {0, 1} but not both
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.layers.2.mlp.gate.weight", "model.layers.2.mlp.gate.e_score_correction_bias"):
        tensors[name][[0, 1]] = tensors[name][[1, 0]]
    (tmp_path / "b").mkdir()
    save_file(tensors, tmp_path / "b" / "model.safetensors")
    (tmp_path / "b" / "config.json").write_text((folder / "config.json").read_text())
    moved = compare_routing(routed.load_model(tmp_path / "b", torch.float32, progress=False), model, ids, 200)
    hooks, seen = _capture(model)
    with torch.no_grad():
        for start in range(0, 600, 200):
            model(torch.tensor([ids[start : start + 200]]))
    for h in hooks:
        h.remove()
    sets = torch.cat(seen[1])
    holds = (sets == 0).any(-1).int() + (sets == 1).any(-1).int()
    assert moved.identical[0] == 1.0 and moved.identical[1] == pytest.approx(float((holds != 1).double().mean()))
    assert moved.identical[1] < 1.0 and moved.kl > 0 and moved.tokens == 600
