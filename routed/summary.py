"""`routed inspect`: what a checkpoint holds and what the loader will do with it, from headers only.

Nothing is loaded: parameter counts, bytes by dtype and the tensor groups come from the safetensors
headers and config.json; active parameters and latent-cache bytes are computed from the config.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path
from typing import Any

from routed.config import ModelConfig
from routed.loader import is_skipped, scan_checkpoint

_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "I32": 4,
          "I64": 8}


@dataclass(slots=True)
class Group:
    name: str
    action: str
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    dtypes: set[str] = field(default_factory=set)


def _group(name: str, cfg: ModelConfig) -> tuple[str, str]:
    """(group, what the loader does) for one checkpoint tensor."""
    target = "the model dtype"
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        if is_skipped(name, cfg, with_mtp=True):
            return "mtp copies of embedding/head", "skipped: the main model's are used"
        return "mtp module", "skipped unless MTP is requested"
    if name.endswith("_scale_inv"):
        return "fp8 block scales", "used to dequantize their weights"
    # an FP8 checkpoint loads as int8 unless --quant says otherwise (the loader's default)
    linear = ("re-quantized to int8 (--quant none: dequantized to the model dtype)" if cfg.fp8 and not cfg.int_quant
              else f"loaded as {target}")
    if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
        return "router", "kept in fp32"
    if ".mlp.experts." in name:
        return "routed experts", f"{linear}, stacked into [E, out, in]"
    if ".shared_experts." in name:
        return "shared experts", linear
    if ".mlp." in name:
        return "dense mlp", linear
    if ".self_attn." in name and not name.endswith("layernorm.weight"):
        return "attention", linear + (" (kv_b_proj: the model dtype)" if cfg.fp8 and not cfg.int_quant else "")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return "embedding and head", f"loaded as {target}" + (
            " (the head re-quantized to int8)" if cfg.fp8 and not cfg.int_quant else "")
    if name.endswith("norm.weight"):
        return "norms", f"loaded as {target}"
    return "other", "unexpected: the loader will refuse it"


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    cfg = ModelConfig.from_pretrained(path)
    infos = scan_checkpoint(path)
    groups: dict[str, Group] = {}
    by_dtype: dict[str, int] = defaultdict(int)
    total = 0
    for name, info in sorted(infos.items()):
        n = prod(info.shape)
        size = n * _BYTES.get(info.dtype, 0)
        gname, action = _group(name, cfg)
        g = groups.setdefault(gname, Group(gname, action))
        g.tensors += 1
        g.dtypes.add(info.dtype)
        g.bytes += size
        by_dtype[info.dtype] += size
        if gname != "fp8 block scales":
            g.params += n
            total += n

    D, L = cfg.hidden_size, cfg.num_hidden_layers
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(L))
    per_expert = 3 * D * cfg.moe_intermediate_size
    main = sum(g.params for g in groups.values() if not g.name.startswith("mtp"))
    inactive = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * per_expert
    active = main - inactive
    bytes_per_elem = 2  # the latent cache is held in the model dtype; bf16 by default
    return {
        "path": str(path),
        "model_type": cfg.model_type,
        "parameters": {"total": total, "main_model": main, "mtp": total - main,
                       "active_per_token": active, "active_per_token_excl_embedding": active - cfg.vocab_size * D},
        "layers": {"total": L, "dense": L - moe_layers, "moe": moe_layers,
                   "mtp_modules": cfg.num_nextn_predict_layers},
        "experts": {"routed": cfg.n_routed_experts, "shared": cfg.n_shared_experts,
                    "per_token": cfg.num_experts_per_tok, "groups": cfg.n_group, "groups_per_token": cfg.topk_group,
                    "scoring": cfg.scoring_func, "topk_method": cfg.topk_method,
                    "routed_scaling_factor": cfg.routed_scaling_factor, "params_per_expert": per_expert},
        "attention": {"heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank,
                      "kv_lora_rank": cfg.kv_lora_rank, "softmax_scale": cfg.softmax_scale,
                      "rope": cfg.rope.rope_type},
        "latent_cache_bytes_per_token": cfg.latent_dim * L * bytes_per_elem,
        "bytes_by_dtype": dict(sorted(by_dtype.items())),
        "fp8": cfg.fp8 is not None,
        "groups": [{**asdict(g), "dtypes": sorted(g.dtypes)} for g in groups.values()],
    }
