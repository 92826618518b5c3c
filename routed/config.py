"""ModelConfig: a checkpoint's config.json, validated, in one place for every DeepSeek-V3-family variant.

Field names are the Hugging Face ones. Differences between the variants are decided here, from fields,
never from `model_type` alone or from magic sizes:

* `deepseek_v3` (V3, R1, V3.1, Moonlight) and `kimi_k2`: sigmoid scores, `noaux_tc` (correction bias,
  group top-2 sum), `norm_topk_prob` true by default.
* `deepseek_v2` (V2, V2-Lite): softmax scores, `greedy` or `group_limited_greedy` (group max), no bias.
* `q_lora_rank` null or 0: a single `q_proj` instead of the q-LoRA pair.
* RoPE comes from `rope_scaling` (older files) or `rope_parameters` (newer files); `default` or `yarn`.

A missing or unsupported field raises `RoutedError` naming the field and the file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routed.errors import RoutedError

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "kimi_k2")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN magnitude correction 0.1·m·ln(s) + 1 (1 when the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(slots=True, frozen=True)
class RopeConfig:
    """RoPE over the `qk_rope_head_dim` rotary dims; `rope_type` is `default` or `yarn`."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    @property
    def cos_sin_factor(self) -> float:
        """Multiplier on cos/sin (HF `attention_factor`): 1.0 for every released DeepSeek config."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_factor(self) -> float:
        """Multiplier on the attention softmax scale: yarn_mscale(factor, mscale_all_dim)² (≈1.874 for V3)."""
        if self.rope_type != "yarn" or not self.mscale_all_dim:
            return 1.0
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2


@dataclass(slots=True, frozen=True)
class Fp8Config:
    """`quantization_config` of an FP8 checkpoint: e4m3 weights with fp32 block scales (`weight_scale_inv`)."""

    block_size: tuple[int, int] = (128, 128)
    scale_fmt: str | None = None


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int  # 0: no MoE layers at all
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    fp8: Fp8Config | None = None
    int_quant: tuple[int, int] | None = None  # (bits, group_size) of a checkpoint written by `routed quantize`
    source: str = field(default="<dict>", compare=False)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5 * self.rope.softmax_factor

    @property
    def has_correction_bias(self) -> bool:
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def latent_dim(self) -> int:
        """Elements cached per token per layer: normalised KV latent plus the rotated shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read `config.json` from a checkpoint folder (or the file itself)."""
        p = Path(path)
        file = p / "config.json" if p.is_dir() else p
        if not p.exists():
            raise RoutedError(f"{p}: no such file or folder; pass a checkpoint folder holding config.json")
        if not file.is_file():
            raise RoutedError(f"{p}: no config.json here; pass a Hugging Face checkpoint folder")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RoutedError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise RoutedError(f"{file}: expected a JSON object")
        return cls.from_dict(raw, source=str(file))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        return _parse(raw, source)


def _parse(raw: dict[str, Any], source: str) -> ModelConfig:
    def fail(name: str, why: str) -> RoutedError:
        return RoutedError(f"{source}: field `{name}` {why}")

    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise fail(
            "model_type",
            f"is {model_type!r}; routed runs the DeepSeek-V3 family ({', '.join(SUPPORTED_MODEL_TYPES)})",
        )
    v2 = model_type == "deepseek_v2"

    def get(name: str, kind: type | tuple[type, ...], default: Any = ..., allow_none: bool = False) -> Any:
        if name not in raw or (raw[name] is None and not allow_none and default is not ...):
            if default is ...:
                raise fail(name, "is missing")
            return default
        value = raw[name]
        if value is None and allow_none:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise fail(name, f"is {value!r}; expected {getattr(kind, '__name__', kind)}")
        return value

    def positive(name: str, default: Any = ...) -> int:
        value = get(name, int, default)
        if value <= 0:
            raise fail(name, f"is {value}; expected a positive integer")
        return value

    if raw.get("hidden_act", "silu") != "silu":
        raise fail("hidden_act", f"is {raw['hidden_act']!r}; only silu is supported")
    if raw.get("attention_bias", False):
        raise fail("attention_bias", "is true; DeepSeek-V3-family attention has no biases")

    q_lora_rank = get("q_lora_rank", int, None, allow_none=True)
    if q_lora_rank == 0:
        q_lora_rank = None  # the reference code's spelling of "no query compression"

    n_routed = get("n_routed_experts", int, 0, allow_none=True) or 0
    topk_method = get("topk_method", str, "greedy" if v2 else "noaux_tc")
    scoring_func = get("scoring_func", str, "softmax" if v2 else "sigmoid")
    if topk_method not in TOPK_METHODS:
        raise fail("topk_method", f"is {topk_method!r}; supported: {', '.join(TOPK_METHODS)}")
    if scoring_func not in SCORING_FUNCS:
        raise fail("scoring_func", f"is {scoring_func!r}; supported: {', '.join(SCORING_FUNCS)}")

    hidden = positive("hidden_size")
    heads = positive("num_attention_heads")
    moe_inter = positive("moe_intermediate_size") if n_routed else get("moe_intermediate_size", int, 0, True) or 0
    k = positive("num_experts_per_tok") if n_routed else 0
    n_group = get("n_group", int, 1, allow_none=False) or 1
    topk_group = get("topk_group", int, 1, allow_none=False) or 1
    if n_routed:
        if n_routed % n_group:
            raise fail("n_group", f"is {n_group}; it must divide n_routed_experts ({n_routed})")
        if not 1 <= topk_group <= n_group:
            raise fail("topk_group", f"is {topk_group}; expected 1..n_group ({n_group})")
        if k > n_routed:
            raise fail("num_experts_per_tok", f"is {k}; more than n_routed_experts ({n_routed})")
        if k > topk_group * (n_routed // n_group) and topk_method != "greedy":
            raise fail("num_experts_per_tok", f"is {k}; more than the experts in topk_group groups")
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))

    quant = raw.get("quantization_config")
    fp8, int_quant = None, None
    if isinstance(quant, dict) and quant.get("quant_method") == "routed":
        bits, group = quant.get("bits"), quant.get("group_size", 32)
        if bits not in (8, 4) or not isinstance(group, int) or group < 1:
            raise fail("quantization_config.bits", f"is {bits!r} (group_size {group!r}); expected 8 or 4")
        int_quant = (bits, group)
    elif quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method != "fp8":
            raise fail("quantization_config.quant_method", f"is {method!r}; supported: fp8, routed")
        block = quant.get("weight_block_size", [128, 128])
        if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
            raise fail("quantization_config.weight_block_size", f"is {block!r}; expected [rows, cols]")
        fp8 = Fp8Config(block_size=(block[0], block[1]), scale_fmt=quant.get("scale_fmt"))

    max_pos = positive("max_position_embeddings", 4096)
    return ModelConfig(
        model_type=model_type,
        vocab_size=positive("vocab_size"),
        hidden_size=hidden,
        intermediate_size=positive("intermediate_size"),
        num_hidden_layers=positive("num_hidden_layers"),
        num_attention_heads=heads,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=positive("kv_lora_rank"),
        qk_nope_head_dim=positive("qk_nope_head_dim"),
        qk_rope_head_dim=_even(positive("qk_rope_head_dim"), fail),
        v_head_dim=positive("v_head_dim"),
        moe_intermediate_size=moe_inter,
        n_routed_experts=n_routed,
        n_shared_experts=get("n_shared_experts", int, 0, allow_none=False) or 0,
        num_experts_per_tok=k,
        n_group=n_group,
        topk_group=topk_group,
        topk_method=topk_method,
        scoring_func=scoring_func,
        norm_topk_prob=get("norm_topk_prob", bool, not v2),
        routed_scaling_factor=get("routed_scaling_factor", float, 1.0),
        first_k_dense_replace=get("first_k_dense_replace", int, 0),
        moe_layer_freq=positive("moe_layer_freq", 1),
        rms_norm_eps=get("rms_norm_eps", float, 1e-6),
        rope=_parse_rope(raw, max_pos, fail),
        max_position_embeddings=max_pos,
        num_nextn_predict_layers=get("num_nextn_predict_layers", int, 0),
        bos_token_id=get("bos_token_id", int, None, allow_none=True),
        eos_token_ids=eos_ids,
        tie_word_embeddings=get("tie_word_embeddings", bool, False),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        fp8=fp8,
        int_quant=int_quant,
        source=source,
    )


def _even(value: int, fail: Any) -> int:
    if value % 2:
        raise fail("qk_rope_head_dim", f"is {value}; rotary dims come in pairs")
    return value


def _parse_rope(raw: dict[str, Any], max_pos: int, fail: Any) -> RopeConfig:
    """Accept `rope_parameters` (transformers ≥ 5) or `rope_scaling` + `rope_theta` (older files)."""
    name = "rope_parameters" if raw.get("rope_parameters") else "rope_scaling"
    params = raw.get(name) or {}
    if not isinstance(params, dict):
        raise fail(name, f"is {params!r}; expected an object")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or theta <= 1:
        raise fail("rope_theta", f"is {theta!r}; expected a number > 1")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=float(theta))
    if rope_type != "yarn":
        raise fail(f"{name}.rope_type", f"is {rope_type!r}; supported: default, yarn")
    orig = params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise fail(f"{name}.factor", f"is {factor!r}; expected a positive number")
    return RopeConfig(
        theta=float(theta),
        rope_type="yarn",
        factor=float(factor),
        original_max_position_embeddings=int(orig),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


@dataclass(slots=True, frozen=True)
class EngineConfig:
    """Batching and cache settings of the engine (the model's shape lives in ModelConfig)."""

    max_num_seqs: int = 16  # running requests per step
    max_num_batched_tokens: int = 512  # tokens per step: decode rows plus prefill chunks
    block_size: int = 16  # tokens per cache block
    kv_cache_gb: float = 1.0  # memory for the latent cache; the block count is derived from it
    max_model_len: int | None = None  # prompt + output cap; default: the model's context, at most 32768
    max_waiting: int = 256  # queued requests beyond which new ones are refused
    enable_prefix_caching: bool = True
    routing_telemetry: bool = True  # count routing per expert on the device (see routed.telemetry)
    routing_window_tokens: int = 4096  # sliding window of the routing telemetry
    record_routing: str | None = None  # safetensors file the routing counts over time are written to
    speculative: str | None = None  # "mtp": draft one token with the MTP module, verify it in the same step
    max_ram_gb: float | None = None  # weights beyond this stay on disk: routed experts behind an LRU cache
    quant: str | None = None  # "int8" | "int4": quantize a float checkpoint's weights at load (routed.quant)
    ep: int = 1  # expert-parallel ranks (routed.parallel.ep); > 1 spawns ranks 1.. on this machine
    placement: str | None = None  # expert placement JSON from `routed eplb` (default: contiguous blocks)
    ep_timeout_s: float = 120.0  # a rank silent this long in a step is declared hung

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting", "routing_window_tokens"):
            if getattr(self, name) < 1:
                raise RoutedError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_gb <= 0:
            raise RoutedError(f"kv_cache_gb must be positive, got {self.kv_cache_gb}")
        if self.speculative not in (None, "mtp"):
            raise RoutedError(f"speculative must be 'mtp' or unset, got {self.speculative!r}")
        if self.ep < 1:
            raise RoutedError(f"ep must be at least 1, got {self.ep}")
        if self.placement is not None and self.ep < 2:
            raise RoutedError("a placement needs expert parallelism: pass --ep N with N >= 2")
        if self.ep_timeout_s <= 0:
            raise RoutedError(f"ep_timeout_s must be positive, got {self.ep_timeout_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise RoutedError(f"max_model_len must be at least 2, got {self.max_model_len}")
