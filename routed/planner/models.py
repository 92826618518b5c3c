"""Model presets for the planner: config.json dicts of the released DeepSeek-V3-family models.

Each entry is what `ModelConfig.from_dict` reads. The numbers are the spec's (`shared/spec/deepseek-v3.md`
§1.1 for V3, §7.3 for the variants); only the fields that size the model or its cache matter here, but the
dicts are complete enough to parse like the real files. `small` is routed's own benchmark shape
(`routed.presets.PRESETS["small"]`).
"""

from __future__ import annotations

from typing import Any

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.presets import PRESETS as ROUTED_PRESETS

_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

# shared by every entry: SwiGLU, no attention bias, untied head, kv latent 512 + 64 rotary dims
_BASE: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_act": "silu", "attention_bias": False,
    "tie_word_embeddings": False, "moe_layer_freq": 1, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "torch_dtype": "bfloat16",
}

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # spec §1.1 [CFG-V3]: 671.03B main model + 11.61B MTP; shipped as FP8 with 128x128 block scales
    "deepseek-v3": {
        **_BASE, "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168,
        "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
        "first_k_dense_replace": 3, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
        "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": _V3_YARN, "max_position_embeddings": 163840,
        "num_nextn_predict_layers": 1, "bos_token_id": 0, "eos_token_id": 1, "quantization_config": _FP8,
    },
    # spec §7.3: 15.7B total / 2.66B active, bf16, V2 softmax/greedy router, no q-LoRA
    "deepseek-v2-lite": {
        **_BASE, "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
        "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840,
        "rope_scaling": {**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
        "num_nextn_predict_layers": 0, "bos_token_id": 100000, "eos_token_id": 100001,
    },
    # spec §7.3: 16.0B / 2.91B, bf16, V3 router without groups, rope_theta 5e4 without YaRN
    "moonlight": {
        **_BASE, "model_type": "deepseek_v3", "vocab_size": 163840, "hidden_size": 2048,
        "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "first_k_dense_replace": 1, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "n_group": 1, "topk_group": 1,
        "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.446, "rms_norm_eps": 1e-5, "rope_theta": 50000, "max_position_embeddings": 8192,
        "num_nextn_predict_layers": 0, "bos_token_id": 163584, "eos_token_id": 163586,
    },
    # spec §7.3: 1026.4B / 32.9B, FP8 like V3, 384 experts, 64 heads, one dense layer (values not verbatim: §11)
    "kimi-k2": {
        **_BASE, "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 1,
        "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536, "n_routed_experts": 384,
        "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.827, "rms_norm_eps": 1e-6,
        "rope_theta": 50000, "max_position_embeddings": 131072,
        "rope_scaling": {"type": "yarn", "factor": 32, "original_max_position_embeddings": 4096, "beta_fast": 1,
                         "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        "num_nextn_predict_layers": 0, "bos_token_id": 163584, "eos_token_id": 163585, "quantization_config": _FP8,
    },
    # routed's 1.01B benchmark shape
    "small": dict(ROUTED_PRESETS["small"]),
}


def preset_config(name: str) -> ModelConfig:
    """The ModelConfig of a model preset; RoutedError names the presets when `name` is not one."""
    if name not in MODEL_PRESETS:
        raise RoutedError(f"unknown model preset {name!r}; choose from {', '.join(MODEL_PRESETS)} "
                          "or pass --model PATH to a checkpoint folder")
    return ModelConfig.from_dict(MODEL_PRESETS[name], source=f"<preset {name}>")
