"""Tiny random checkpoints written by transformers in the test, and the reference models that wrote them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from routed.presets import tokenizer_files

torch.set_num_threads(2)

BASE_V3: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
    topk_group=1, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, max_position_embeddings=256, routed_scaling_factor=2.5,
    norm_topk_prob=True, num_mtp_layers=0,
)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Spread weights so routing decisions are well separated (no near-ties between implementations)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.3)


def make_checkpoint(
    out: Path, arch: str = "v3", seed: int = 0, tokenizer: bool = False, **overrides: Any
) -> tuple[Path, transformers.PreTrainedModel]:
    """Write a random fp32 checkpoint with transformers; return its folder and the reference model."""
    torch.manual_seed(seed)
    kwargs = {**BASE_V3, "rope_parameters": dict(DEFAULT_ROPE), **overrides}
    if arch == "v3":
        config = transformers.DeepseekV3Config(**kwargs)
        model = transformers.DeepseekV3ForCausalLM(config)
    else:
        kwargs.pop("num_mtp_layers", None)
        kwargs.setdefault("topk_method", "greedy")
        config = transformers.DeepseekV2Config(**kwargs)
        model = transformers.DeepseekV2ForCausalLM(config)
    model = model.float().eval()
    randomize(model, seed)
    model.save_pretrained(out)
    if tokenizer:
        for f in tokenizer_files():
            shutil.copy(f, out / f.name)
    return out, model


def edit_config(folder: Path, **changes: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, transformers.PreTrainedModel]:
    return make_checkpoint(tmp_path / "ckpt")


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from routed.presets import write_random_checkpoint

    return write_random_checkpoint("tiny", tmp_path_factory.mktemp("presets") / "tiny")


@pytest.fixture
def native_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run bf16 products as a CPU with native ones does (AVX512-BF16/AMX: oneDNN's bf16 GEMMs, grouped experts),
    whatever this machine has: for the tests of those paths' internals."""
    from routed.model import gemv

    monkeypatch.setattr(gemv, "native_half_products", lambda dtype: True)


@pytest.fixture(params=[True, False], ids=["native-bf16", "fp32-products"])
def half_products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways a CPU runs many-row bf16 products (`gemv.product_dtype`): natively, or widened to fp32."""
    from routed.model import gemv

    monkeypatch.setattr(gemv, "native_half_products", lambda dtype: request.param)
    return request.param
