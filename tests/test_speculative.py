"""MTP speculative decoding: greedy output is identical with and without it, whatever the drafts are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.engine.runner import ModelRunner
from routed.errors import RoutedError
from routed.loader import load_model
from routed.sampling import SamplingParams
from routed.tokenizer import Tokenizer

PROMPTS = [list(range(1000, 1000 + n)) for n in (5, 17, 33)]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def generate(engine: LLMEngine) -> dict[str, list[int]]:
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, GREEDY, f"r{i}")
    out: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


@pytest.fixture(scope="module")
def plain(tiny_preset: Path) -> dict[str, list[int]]:
    model = load_model(tiny_preset, torch.float32, progress=False)
    return generate(LLMEngine(model, Tokenizer.from_pretrained(tiny_preset), EngineConfig(block_size=4)))


def spec_engine(path: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(path, "fp32", EngineConfig(block_size=4, speculative="mtp"), progress=False)


def test_mtp_drafts_keep_greedy_output(tiny_preset: Path, plain: dict[str, list[int]]) -> None:
    engine = spec_engine(tiny_preset)
    assert generate(engine) == plain
    stats = engine.stats()
    assert stats.spec_drafted > 0 and 0 <= stats.spec_accepted <= stats.spec_drafted


@pytest.mark.parametrize("oracle", [True, False])
def test_right_and_wrong_drafts_keep_greedy_output(tiny_preset: Path, plain: dict[str, list[int]],
                                                   monkeypatch: pytest.MonkeyPatch, oracle: bool) -> None:
    """Drafts that are always right (every draft accepted, two tokens per step) or always wrong."""
    engine = spec_engine(tiny_preset)
    real_draft = ModelRunner._draft

    def forced(self, sched, rows, hidden, out) -> None:  # noqa: ANN001
        real_draft(self, sched, rows, hidden, out)
        for s in sched.seqs:
            res = out.get(s.request.request_id)
            if res is not None and res.draft is not None:
                done = len(s.request.output_ids) + len(res.token_ids)
                ref = plain[s.request.request_id]
                res.draft = ref[done] if oracle and done < len(ref) else (ref[0] + 1) % 1000 + 5

    monkeypatch.setattr(ModelRunner, "_draft", forced)
    assert generate(engine) == plain
    stats = engine.stats()
    assert stats.spec_drafted > 0
    assert stats.spec_accepted == (stats.spec_drafted if oracle else 0)


def test_speculative_needs_an_mtp_module(ckpt) -> None:
    folder, _ = ckpt
    with pytest.raises(RoutedError, match="num_nextn_predict_layers"):
        LLMEngine.from_pretrained(folder, "fp32", EngineConfig(speculative="mtp"), progress=False)
