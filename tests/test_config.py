"""ModelConfig: variants, RoPE spellings, YaRN numbers from the spec, and errors naming field and file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.model.deepseek_v3 import Transformer, rope_inv_freq

V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
          moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536,
          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
          n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc",
          scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=3,
          max_position_embeddings=163840, rope_theta=10000,
          rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def test_v3_numbers_from_the_spec() -> None:
    cfg = ModelConfig.from_dict(V3)
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)
    assert cfg.rope.cos_sin_factor == 1.0
    assert cfg.latent_dim * cfg.num_hidden_layers * 2 == 70272  # bf16 latent bytes per token
    assert sum(cfg.is_moe_layer(i) for i in range(61)) == 58
    lite = ModelConfig.from_dict({**V3, "model_type": "deepseek_v2", "q_lora_rank": None, "rope_scaling": {
        **V3["rope_scaling"], "mscale": 0.707, "mscale_all_dim": 0.707}, "topk_method": "greedy"})
    assert lite.softmax_scale == pytest.approx(0.1147214, abs=1e-6) and lite.q_lora_rank is None
    assert lite.scoring_func == "sigmoid"  # explicit field wins over the V2 default
    kimi = ModelConfig.from_dict({**V3, "model_type": "kimi_k2", "num_attention_heads": 64, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0, "original_max_position_embeddings": 4096,
        "beta_fast": 1, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}})
    assert kimi.softmax_scale == pytest.approx(0.1308608, abs=1e-6) and kimi.rope.theta == 50000.0


def test_yarn_frequencies_match_transformers_and_survive_bf16() -> None:
    hf = transformers.DeepseekV3Config(rope_parameters={"rope_type": "yarn", **{
        k: v for k, v in V3["rope_scaling"].items() if k != "type"}, "rope_theta": 10000.0},
        max_position_embeddings=163840)
    expected, factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = ModelConfig.from_dict(V3)
    assert torch.equal(rope_inv_freq(cfg.rope, 64), expected) and factor == cfg.rope.cos_sin_factor
    small = ModelConfig.from_dict({**V3, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "n_routed_experts": 8,
                                   "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "vocab_size": 32,
                                   "q_lora_rank": 16, "kv_lora_rank": 16, "first_k_dense_replace": 1})
    model = Transformer(small, torch.float32).to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32


def test_rope_scaling_and_rope_parameters_are_the_same_config() -> None:
    old = ModelConfig.from_dict(V3)
    scaling = dict(V3["rope_scaling"])
    scaling["rope_type"] = scaling.pop("type")
    new = ModelConfig.from_dict({**{k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")},
                                 "rope_parameters": {**scaling, "rope_theta": 10000.0}})
    assert old == new


def test_defaults_per_model_type() -> None:
    base = {k: v for k, v in V3.items() if k not in ("topk_method", "scoring_func", "norm_topk_prob")}
    v3 = ModelConfig.from_dict(base)
    v2 = ModelConfig.from_dict({**base, "model_type": "deepseek_v2"})
    assert (v3.topk_method, v3.scoring_func, v3.norm_topk_prob) == ("noaux_tc", "sigmoid", True)
    assert (v2.topk_method, v2.scoring_func, v2.norm_topk_prob) == ("greedy", "softmax", False)
    assert ModelConfig.from_dict({**V3, "q_lora_rank": 0}).q_lora_rank is None


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"kv_lora_rank": "512"}, "kv_lora_rank"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "random"}, "topk_method"),
    ({"n_group": 7}, "n_group"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling.rope_type"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_fields_name_field_and_file(tmp_path: Path, change: dict, field: str) -> None:
    raw = {**V3, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(RoutedError) as err:
        ModelConfig.from_pretrained(tmp_path)
    assert f"`{field}`" in str(err.value) and str(tmp_path / "config.json") in str(err.value)
