"""Exact weight and cache bytes from a ModelConfig, by part, in a weight format, per device under TP/EP.

Contract:

* `tensor_specs(cfg, with_mtp)` lists every checkpoint tensor the engine holds (as a spec with a repeat
  count, so 256 experts × 58 layers are one line each per projection), tagged with its part, whether it is a
  quantisable linear and how TP/EP place it. Parts: attention, dense_ffn, routed_experts, shared_experts,
  embed_head, norms_router, mtp.
* `weight_breakdown(cfg, fmt, par)` -> bytes and parameters by part, whole model and per device.
* `kv_bytes_per_token(cfg)` -> latent-cache bytes per token: (kv_lora_rank + qk_rope_head_dim) × layers × 2
  (a bf16 cache; 70,272 B for V3).

Weight formats (`WEIGHT_FORMATS`), applied as DeepSeek applies FP8: every 2-D linear of a decoder layer
(attention projections, dense MLP, routed and shared experts, the MTP block's own) is quantised; the
embedding, lm_head, every RMSNorm, the router weight (bf16), its correction bias (fp32) and the MTP
`eh_proj` stay in bf16. Scale overhead per quantised [out, in] weight:

* fp8  e4m3, one fp32 scale per 128×128 block: ceil(out/128)·ceil(in/128)·4 B (DeepSeek's format)
* int8 one fp32 scale per output channel: out·4 B
* int4 two weights per byte, one bf16 scale per group of 32 inputs (symmetric, no zero point): out·ceil(in/32)·2 B

Placement (`Parallelism`): the split DeepSeek's reference `convert.py` uses — TP shards q_b/q_proj, kv_b,
o_proj, the dense MLP, the shared experts, the embedding and lm_head; q_a, kv_a, norms and the router are
replicated; EP places whole routed experts, ceil(E/ep) per device (the remainder slots hold redundant
copies, as DeepSeek's deployments do).

The MTP module's duplicate embedding and head in the checkpoint are not counted: the engine uses the main
model's (they are copies in every released checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from routed.config import ModelConfig
from routed.errors import RoutedError

WEIGHT_FORMATS = ("bf16", "fp8", "int8", "int4")
PARTS = ("attention", "dense_ffn", "routed_experts", "shared_experts", "embed_head", "norms_router", "mtp")
KV_CACHE_BYTES = 2  # the latent cache is bf16 (FlashMLA's dense decoding kernel, as released, reads bf16)


@dataclass(slots=True, frozen=True)
class Parallelism:
    """gpus devices; attention TP groups of `tp` (gpus/tp data-parallel replicas); routed experts over `ep`."""

    gpus: int = 1
    tp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    def check(self, cfg: ModelConfig) -> None:
        for name in ("gpus", "tp", "ep"):
            if getattr(self, name) < 1:
                raise RoutedError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.gpus % self.tp:
            raise RoutedError(f"--tp {self.tp} does not divide --gpus {self.gpus}")
        if self.gpus % self.ep:
            raise RoutedError(f"--ep {self.ep} does not divide --gpus {self.gpus}")
        if cfg.num_attention_heads % self.tp:
            raise RoutedError(f"--tp {self.tp} does not divide the model's {cfg.num_attention_heads} attention heads")
        if cfg.n_routed_experts and self.ep > cfg.n_routed_experts:
            raise RoutedError(f"--ep {self.ep} is more than the model's {cfg.n_routed_experts} routed experts")


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """`count` copies of one [rows, cols] tensor (cols 0 for a vector)."""

    name: str
    part: str
    rows: int
    cols: int = 0
    count: int = 1
    linear: bool = False  # a decoder linear weight: quantised in fp8/int8/int4
    tp_split: bool = False  # sharded over the TP group
    expert: bool = False  # a routed expert's weight: placed whole by EP
    fp32: bool = False  # kept in fp32 whatever the format (router correction bias)

    @property
    def numel(self) -> int:
        return self.rows * max(self.cols, 1)


def _attention(cfg: ModelConfig, part: str, layer: str) -> list[TensorSpec]:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    a = f"{layer}.self_attn"
    norm_part = "mtp" if part == "mtp" else "norms_router"
    specs = [TensorSpec(f"{layer}.input_layernorm", norm_part, D),
             TensorSpec(f"{layer}.post_attention_layernorm", norm_part, D)]
    if cfg.q_lora_rank is None:
        specs.append(TensorSpec(f"{a}.q_proj", part, H * cfg.qk_head_dim, D, linear=True, tp_split=True))
    else:
        specs += [TensorSpec(f"{a}.q_a_proj", part, cfg.q_lora_rank, D, linear=True),
                  TensorSpec(f"{a}.q_a_layernorm", norm_part, cfg.q_lora_rank),
                  TensorSpec(f"{a}.q_b_proj", part, H * cfg.qk_head_dim, cfg.q_lora_rank, linear=True, tp_split=True)]
    specs += [
        TensorSpec(f"{a}.kv_a_proj_with_mqa", part, cfg.latent_dim, D, linear=True),
        TensorSpec(f"{a}.kv_a_layernorm", norm_part, cfg.kv_lora_rank),
        TensorSpec(f"{a}.kv_b_proj", part, H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank,
                   linear=True, tp_split=True),
        TensorSpec(f"{a}.o_proj", part, D, H * cfg.v_head_dim, linear=True, tp_split=True),
    ]
    return specs


def _mlp(prefix: str, part: str, D: int, inter: int, count: int = 1, expert: bool = False) -> list[TensorSpec]:
    split = not expert
    return [TensorSpec(f"{prefix}.gate_proj", part, inter, D, count, True, split, expert),
            TensorSpec(f"{prefix}.up_proj", part, inter, D, count, True, split, expert),
            TensorSpec(f"{prefix}.down_proj", part, D, inter, count, True, split, expert)]


def _ffn(cfg: ModelConfig, idx: int, layer: str, mtp: bool) -> list[TensorSpec]:
    D = cfg.hidden_size
    if not cfg.is_moe_layer(idx):
        return _mlp(f"{layer}.mlp", "mtp" if mtp else "dense_ffn", D, cfg.intermediate_size)
    E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
    specs = [TensorSpec(f"{layer}.mlp.gate", "mtp" if mtp else "norms_router", E, D)]
    if cfg.has_correction_bias:
        specs.append(TensorSpec(f"{layer}.mlp.gate.e_score_correction_bias", "mtp" if mtp else "norms_router", E,
                                fp32=True))
    specs += _mlp(f"{layer}.mlp.experts", "mtp" if mtp else "routed_experts", D, I, count=E, expert=True)
    if cfg.n_shared_experts:
        specs += _mlp(f"{layer}.mlp.shared_experts", "mtp" if mtp else "shared_experts", D,
                      I * cfg.n_shared_experts)
    return specs


def tensor_specs(cfg: ModelConfig, with_mtp: bool = False) -> list[TensorSpec]:
    """Every weight the engine holds, in checkpoint order (layers 0.. then the MTP modules)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    specs = [TensorSpec("model.embed_tokens", "embed_head", V, D, tp_split=True)]
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}"
        specs += _attention(cfg, "attention", layer) + _ffn(cfg, i, layer, mtp=False)
    specs.append(TensorSpec("model.norm", "norms_router", D))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head", "embed_head", V, D, tp_split=True))
    for k in range(cfg.num_nextn_predict_layers if with_mtp else 0):
        idx = cfg.num_hidden_layers + k
        layer = f"model.layers.{idx}"
        specs += _attention(cfg, "mtp", layer) + _ffn(cfg, idx, layer, mtp=True)
        specs += [TensorSpec(f"{layer}.enorm", "mtp", D), TensorSpec(f"{layer}.hnorm", "mtp", D),
                  TensorSpec(f"{layer}.eh_proj", "mtp", D, 2 * D),  # bf16 in DeepSeek's FP8 checkpoint
                  TensorSpec(f"{layer}.shared_head.norm", "mtp", D)]
    return specs


def tensor_bytes(spec: TensorSpec, fmt: str) -> int:
    """Bytes of one copy of the tensor in a weight format, scales included."""
    if fmt not in WEIGHT_FORMATS:
        raise RoutedError(f"unknown weight format {fmt!r}; choose from {', '.join(WEIGHT_FORMATS)}")
    if spec.fp32:
        return spec.numel * 4
    if not spec.linear or fmt == "bf16":
        return spec.numel * 2
    out, inp = spec.rows, spec.cols
    if fmt == "fp8":
        return out * inp + math.ceil(out / 128) * math.ceil(inp / 128) * 4
    if fmt == "int8":
        return out * inp + out * 4
    return math.ceil(out * inp / 2) + out * math.ceil(inp / 32) * 2  # int4


def device_share(spec: TensorSpec, cfg: ModelConfig, par: Parallelism) -> float:
    """Copies of `spec` one device holds (a fraction for TP shards)."""
    if spec.expert:
        return math.ceil(cfg.n_routed_experts / par.ep) * spec.count / cfg.n_routed_experts
    return spec.count / par.tp if spec.tp_split else spec.count


@dataclass(slots=True)
class WeightBreakdown:
    """Parameters and bytes by part: whole model and one device's share."""

    fmt: str
    params: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    device_bytes: dict[str, float] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def device_total(self) -> float:
        return sum(self.device_bytes.values())


def weight_breakdown(
    cfg: ModelConfig, fmt: str = "bf16", par: Parallelism | None = None, with_mtp: bool = False
) -> WeightBreakdown:
    par = par or Parallelism()
    out = WeightBreakdown(fmt, {p: 0 for p in PARTS}, {p: 0 for p in PARTS}, {p: 0.0 for p in PARTS})
    for spec in tensor_specs(cfg, with_mtp):
        one = tensor_bytes(spec, fmt)
        out.params[spec.part] += spec.numel * spec.count
        out.bytes[spec.part] += one * spec.count
        out.device_bytes[spec.part] += one * device_share(spec, cfg, par)
    if not with_mtp:
        for d in (out.params, out.bytes, out.device_bytes):
            d.pop("mtp")
    return out


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_element: int = KV_CACHE_BYTES) -> int:
    """Latent cache per token over all main-model layers (V3 bf16: 576 × 61 × 2 = 70,272 B)."""
    return cfg.latent_dim * cfg.num_hidden_layers * bytes_per_element


def expert_bytes(cfg: ModelConfig, fmt: str) -> int:
    """Bytes of one routed expert (gate, up, down) in a format."""
    D, I = cfg.hidden_size, cfg.moe_intermediate_size
    return sum(tensor_bytes(s, fmt) for s in _mlp("e", "routed_experts", D, I, expert=True))


@dataclass(slots=True, frozen=True)
class MemoryFit:
    """What fits on one device beside its weights."""

    device_bytes: float  # memory × utilization
    weight_bytes: float
    kv_bytes_per_token: int
    kv_tokens: int  # latent-cache tokens that fit per device
    utilization: float

    def max_batch(self, context: int) -> int:
        return self.kv_tokens // max(context, 1)


def memory_fit(weight_bytes: float, memory_bytes: float, kv_per_token: int, utilization: float) -> MemoryFit:
    """Cache tokens that fit beside the weights; RoutedError when the weights alone do not fit."""
    usable = memory_bytes * utilization
    if weight_bytes > usable:
        raise RoutedError(
            f"the weights need {weight_bytes / 1e9:.1f} GB per device but only {usable / 1e9:.1f} GB is usable "
            f"({utilization:.0%} of {memory_bytes / 1e9:.1f} GB): use more devices (--gpus/--ep/--tp) or a "
            "smaller --weights format"
        )
    return MemoryFit(usable, weight_bytes, kv_per_token, int((usable - weight_bytes) // kv_per_token), utilization)
