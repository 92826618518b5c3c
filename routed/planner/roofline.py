"""A roofline per engine step, for decode and prefill separately, on one device of a deployment.

Contract: `step_work(...)` counts what one device does in one step (pure arithmetic on the config, no
hardware): bytes read from memory, FLOPs, bytes sent over the interconnect. `step_time(work, hw, eff)`
turns that into seconds with stated efficiency factors. Throughput and cost follow from the step time.

What one step is
* decode: every one of `batch` sequences (per attention data-parallel rank, i.e. per TP group) adds one
  token; attention reads each sequence's whole latent cache (`context` tokens) in the absorbed form.
* prefill: `batch` prompts of `new_tokens` tokens each (after `cached` prefix tokens already in the cache);
  attention in MHA form (DeepSeek's prefill kernels) or absorbed, causal; routed's CPU engine: the form its
  attention impl picks per sequence (below).

Bytes: every weight a device holds is read once per step, except routed experts: of the ceil(E/ep) a device
holds, each is read iff some token of the step chose it. With N tokens reaching the EP group, each choosing
k of E experts uniformly, an expert is untouched with probability (1 − k/E)^N, so the expected distinct
experts per layer are E·(1 − (1 − k/E)^N). Plus the latent cache read (decode) or written (prefill).
FLOPs: 2 per weight per token through it (lm_head only on the one sampled row per sequence), plus attention.
Interconnect (expert parallelism, per MoE layer, per token leaving the device): dispatch of D values (fp8
with 1/128 fp32 scales when the weights are fp8, else bf16) and a bf16 combine per copy. Decode sends one
copy per chosen remote expert (DeepEP's low-latency kernels, pure RDMA); prefill across nodes sends one
copy per remote node holding a chosen expert and forwards over NVLink (DeepEP's normal kernels). TP adds a
ring all-reduce of the hidden state after attention and after each (dense or shared) MLP.

Time per step (the efficiency factors are printed with every plan):
    t_weights   = combine(weight bytes / (BW·η_mem), linear FLOPs / (peak·η_compute))
    t_attention = combine(cache bytes / (BW·η_mem), attention FLOPs / (bf16 peak·η_compute))
    t_comm      = max(network bytes / network BW, NVLink bytes / NVLink BW) / η_comm
    t_overhead  = t_op · engine ops per step
    t_eager     = activation bytes / BW + score elements · t_score + logit elements · t_logit
    t_step      = t_weights + t_attention + t_comm − overlap·min(t_weights + t_attention, t_comm) + t_overhead
                  + t_eager
combine = max (a GPU kernel overlaps its loads with its math: the roofline) or sum (`local`: on a CPU the
decode-sized GEMMs measure as load time plus math time; `Hardware.overlap_memory_compute`). The linear peak
is the fp8 rate for fp8 weights on hardware that has it, else bf16 (int8/int4 are weight-only formats,
dequantised to bf16).

routed's own CPU engine (`eager=True`: the calibration runs, and plans on hardware marked `eager`, i.e.
`local`) runs one PyTorch op at a time, and five things a fused GPU kernel hides cost time there:

* Engine ops (`engine_ops`): each op has a fixed cost t_op (Python, dispatch, oneDNN's per-call overhead)
  beyond its bytes and FLOPs. The op count per step is routed's own, counted with a TorchDispatchMode over
  engine steps (routing telemetry off, as `routed bench` runs) of the tiny preset with 2-5 layers, 0-3 of
  them dense, decode at 1-16 sequences and prefills of 64-200 tokens, and of the tiny, demo, medium and
  small shapes: 27 per step + 80 per dense layer + 124 per MoE layer + 28 per layer per sequence (the
  per-sequence attention loop) + 22 per sequence (slots, sampling) + 14 per routed expert run, within
  ±0.4% of every count. Re-counted on the engine of eb1cca5 (tiny's widths, 2-5 layers, 0-3 dense, decode at
  1-16 sequences: +0.2% to +0.8%, and +2.3-2.7% at one sequence). A sequence in the naive form (below)
  runs 15 + 22 per query chunk ops per layer in place of the 28 (counted the same way: tiny's widths with
  kv_lora_rank 64, so that the engine picks naive, 2-5 layers, 0-3 dense, 1-3 prompts of 64-500 tokens, 1-4
  chunks: −0.4% to +1.2% of every count; the `medium` shape's 64- and 256-token prefills: +0.8% and +0.4%). (The first split of a prompt into chunks adds 2 ops more than the next ones: the
  one-chunk case slices nothing.)
* Activation traffic: every op reads and writes its inputs and outputs (nothing is fused). Counted the same
  way (2 × the bytes of each non-view, non-GEMM op's output): 187 B per token per layer per hidden unit,
  + 34 B per token per MoE layer per hidden unit per chosen expert (the gather, weighting and index_add of the
  routed experts), + 13 B per token per layer per head per latent unit (the absorbed query); within 13% of
  the counted bytes for prefills and for decode at 4 or more sequences (at one sequence, where they are a few
  MB, up to 41% under); charged at the probed copy bandwidth. A sequence in the naive form has no absorbed
  query; instead, per layer per head, 4 B per expanded key per (N + R) (the keys' concatenation) and 4 B per
  query per (N + R + V) (the queries' concatenation and the chunk's output written into the step's buffer):
  within 3% of the bytes counted by the same rule for medium's widths at 256 tokens, 30% off for the demo's
  and for 64 tokens — a term worth under 1% of a prefill step.
* Attention over the keys: the absorbed path computes every (query, key) score per head, masks afterwards,
  and runs two einsums (scores, then values) batched over heads that are far too narrow to reach the GEMM
  rate. Its time goes by score elements, not FLOPs: t_score per element for the whole of it (einsums, fp32
  cast, scale, mask, softmax, cast back), probed on routed's own absorbed_attention (`Hardware.score_ns`;
  7-16 ns on one thread here whatever the head and latent sizes, so a 256-token prefill of `small`, 8.4M
  scores, spends ~90 ms in it), and the attention FLOPs of an eager step are 0 (they are inside t_score).
  Which form a sequence takes: since 93f469e the engine's attention impl is 'auto' (before: 'absorb'), and
  routed.model.attention.paged_attention picks per sequence of T new tokens over S keys with `use_naive` —
  the planner calls that same function (`engine_attention`) — the naive form where expanding S keys costs
  fewer multiply-adds than the absorbed form: a whole prompt (S = T) wherever 2L > N + V (the demo model,
  medium, small, every released config; not `tiny`, where 2L = N + V), never decode. The naive form expands
  the S keys and values through kv_b_proj once (2·S·L·H·(N+V) FLOPs, a GEMM: attention FLOPs at the bf16 rate
  × η_compute), then attends in chunks of QUERY_CHUNK (128) queries, each over the S − T + (its last query)
  keys it can see: Σ_chunks chunk length × visible keys per head (about half of T·S for long prompts) score
  elements, at t_score,naive per element for the whole chunk (two batched matmuls over heads, fp32 cast,
  scale, mask, softmax, cast back), probed on routed's own attend_expanded the way the engine calls it
  (`Hardware.naive_score_ns`, 4-7 ns on one thread here, against 13 for the absorbed form).
* Logits: the fp32 cast and argmax over the vocabulary of every sampled row: t_logit per element, probed
  (`Hardware.logit_ns`, ~1 ns: 0.13 ms per sequence per step under DeepSeek's 129,280-token vocabulary).
* And the per-sequence attention loop multiplies `kv_b_proj` (W_UK into the query, W_UV out of the latent)
  once per sequence: its bytes are read once per sequence, not once per step.

Compiled one-token steps (`compile_decode=True`: the engine compiles, see `engine_compiles`). routed's loader
compiles each decoder block for one-token steps (`Transformer.compile_decode`) and one-row bf16 products
(`routed.model.gemv`) for models of at least gemv.MIN_MODEL_BYTES (256 MiB) of weights, not offloaded or
sharded — the same rule here: weight_breakdown(cfg, fmt).total_bytes >= MIN_MODEL_BYTES. The planner models
the compiled step for bf16 weights only (COMPILED_FORMATS): since 1723d45 routed compiles int8 and int4 decode
too, whose fused dequantising loops read at rates of their own that nothing probes yet, so such plans keep the
eager step (and say so), and calibration refuses such bench files. A decode step at one
sequence (T = 1) then runs: the embedding row, one compiled call per decoder block (a few fused loops: the
one-row products as multiply-sums reading the weights at a single-row rate, the chosen experts' weights read in
place, router, norms, RoPE, softmax fused around them), the final norm, the lm_head through the compiled GEMV,
the logits' argmax and the engine's per-step work. Modelled as

    t_step = (weight bytes + cache bytes) / row rate + blocks · t_block + scores · t_score,compiled
             + (27 + 22) ops · t_op + logits · t_logit

* weight bytes: what the eager step reads at T = 1 (every weight but the embedding, k experts per MoE layer or
  the measured `experts_touched`), all at the probed one-row rate (`Hardware.row_gb_s`, no η: the probe times
  the engine's own kernel) and no FLOPs (the multiply-sums are bound by their reads; their arithmetic is in
  the rate);
* t_block per decoder block call (`Hardware.block_us`): probed — the compiled block of a model whose weights
  sit in cache, timed in the engine's own decode pattern; what is left of a block call beyond its reads (guards,
  the wrapper, a dozen small fused loops). Probed rather than fitted because only one run per bench file (decode
  at batch 1) would pin it, and a probe keeps the compiled step free of fitted factors but the 49 ops of t_op;
* scores: the same score elements as the eager step, at the compiled path's own probed cost per score
  (`Hardware.compiled_score_ns`, ~30 ns here at the probe's widths against ~11 for the eager engine: at long
  contexts the compiled attention is the slower one);
* ops: only the engine's per-step and per-sequence ops outside the blocks (ENGINE_OPS "step" and "sequence"),
  at the fitted t_op; no activation traffic (fused).
Multi-token steps (prefill, decode at 2+ sequences) stay eager; with the GEMV on (`gemv=True`, the same rule)
the lm_head of a step that samples one row (batch 1) is a one-row product and is read at the row rate too
(and an eager decode step at one sequence, the GEMV without the compiled blocks, reads every one-row linear
product — attention projections, MLPs, experts, lm_head; not kv_b, which the attention multiplies as a tensor —
at the row rate, its other costs as eager; not checked against measurement).

t_op defaults to 0 (GPU plans: CUDA graphs; not modelled) and is calibrated from `routed bench` files for
`local`, together with η_mem and η_compute; t_score, t_logit, the row rate, t_block and the compiled t_score are
measured by the probe, not fitted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.planner.hardware import Hardware
from routed.planner.memory import (
    Parallelism,
    TensorSpec,
    expert_bytes,
    kv_bytes_per_token,
    tensor_bytes,
    tensor_specs,
    device_share,
    weight_breakdown,
)

ATTENTION_FORMS = ("mha", "absorb")  # GPU plans; routed's eager engine: ENGINE_ATTENTION
ENGINE_ATTENTION = ("auto", "absorb", "naive")  # routed.model.attention.ATTN_IMPLS


@dataclass(slots=True, frozen=True)
class Efficiency:
    """Fractions of peak the engine reaches, and a fixed cost per step. Defaults: published kernel figures."""

    memory: float = 0.7  # DeepGEMM decode-shaped fp8 GEMMs 1.5-2.3 TB/s, FlashMLA 3.0 TB/s, of 3.35 on H800
    compute: float = 0.65  # FlashMLA 660 of 989 bf16 TFLOPS; DeepGEMM large fp8 GEMMs ~0.75 of peak
    comm: float = 0.78  # DeepEP low-latency dispatch/combine: 39 of 50 GB/s at EP128 on H800
    overlap: float = 0.0  # share of interconnect time hidden behind compute (0: none, see docs/cost.md)
    op_s: float = 0.0  # seconds per engine op (eager dispatch on a CPU); 0 on GPUs
    source: str = "defaults (published DeepSeek kernel figures)"

    def describe(self) -> str:
        return (f"η_mem {self.memory:.3g}, η_compute {self.compute:.3g}, η_comm {self.comm:.3g}, "
                f"overlap {self.overlap:.2g}, t_op {self.op_s * 1e6:.3g} µs [{self.source}]")

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


@dataclass(slots=True)
class StepWork:
    """One device, one step. Bytes in B, FLOPs in FLOP; tokens are what the step produces (decode) or
    computes (prefill) on this device."""

    mode: str
    tokens: float
    weight_bytes: float
    cache_bytes: float
    linear_flops: float
    attention_flops: float
    linear_fp8: bool  # linear FLOPs run at the fp8 rate when the hardware has one
    nvlink_bytes: float
    network_bytes: float
    experts_touched: float  # per MoE layer on this device
    ops: float  # engine ops per step (routed's eager count; see engine_ops)
    activation_bytes: float = 0.0  # eager only: bytes the unfused ops read and write
    score_elements: float = 0.0  # eager only: attention (query, key, head) scores computed in the absorbed form
    logit_elements: float = 0.0  # eager only: vocabulary entries cast and searched for sampling
    row_bytes: float = 0.0  # bytes read by compiled one-row products (routed.model.gemv), at Hardware.row_gb_s
    blocks: float = 0.0  # compiled decoder block calls (a compiled one-token step), at Hardware.block_us each
    compiled: bool = False  # a compiled one-token step: its scores cost Hardware.compiled_score_ns
    naive_score_elements: float = 0.0  # eager only: (query, key, head) scores of the naive form's causal chunks


@dataclass(slots=True)
class StepTime:
    work: StepWork
    memory_s: float  # weight + cache bytes over bandwidth
    compute_s: float  # all FLOPs over peak
    comm_s: float
    overhead_s: float  # t_op × engine ops (+ t_block × compiled block calls)
    step_s: float
    eager_s: float = 0.0  # activation traffic, attention scores and logits of routed's CPU engine

    @property
    def bound(self) -> str:
        """Which term dominates the step: memory, compute, interconnect, overhead or eager."""
        terms = {"memory": self.memory_s, "compute": self.compute_s, "interconnect": self.comm_s,
                 "overhead": self.overhead_s, "eager": self.eager_s}
        return max(terms, key=terms.__getitem__)

    @property
    def tokens_per_second(self) -> float:
        return self.work.tokens / self.step_s


def expected_distinct_experts(n_experts: int, k: int, tokens: float) -> float:
    """E·(1 − (1 − k/E)^N): distinct experts hit when N tokens each choose k of E uniformly."""
    if n_experts == 0 or tokens <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - k / n_experts) ** tokens)


ENGINE_OPS = {"step": 27, "dense_layer": 80, "moe_layer": 124, "layer_sequence": 28, "sequence": 22, "expert": 14,
              "naive_layer_sequence": 15, "naive_chunk": 22}  # naive form: 15 + 22 per query chunk in place of 28
# activation bytes per token: per layer per hidden unit, per MoE layer per hidden unit per chosen expert, per layer
# per head per latent unit (see the module docstring)
# per layer per sequence in the naive form (absorbed: head_latent): per head, per expanded key unit (N + R) and per
# query unit of the chunks (N + R + V)
ACTIVATION_BYTES = {"hidden": 187, "expert_hidden": 34, "head_latent": 13, "naive_key": 4, "naive_query": 4}


def engine_ops(dense_layers: int, moe_layers: int, sequences: float, experts_run: float,
               chunks: int | None = None) -> float:
    """PyTorch ops routed dispatches in one step (see the module docstring for where the counts come from).
    chunks: the query chunks of each sequence's naive-form attention (None: the absorbed form)."""
    c = ENGINE_OPS
    layers = dense_layers + moe_layers
    per_layer = c["layer_sequence"] if chunks is None else c["naive_layer_sequence"] + c["naive_chunk"] * chunks
    return (c["step"] + c["dense_layer"] * dense_layers + c["moe_layer"] * moe_layers
            + (per_layer * layers + c["sequence"]) * sequences + c["expert"] * experts_run)


def engine_attention(cfg: ModelConfig, impl: str, queries: int, keys: int) -> str:
    """The form ('naive' or 'absorb') routed's paged attention runs for one sequence of `queries` new tokens over
    `keys` keys (its whole context after the step) under the model's attention impl ('auto': the engine's rule,
    routed.model.attention.use_naive, called on a shape-only tensor; 'absorb'/'naive': forced)."""
    if impl != "auto":
        return impl
    import torch  # only for plans of routed's own engine

    from routed.model.attention import use_naive

    kv_b = torch.empty((cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank),
                       device="meta")
    return "naive" if use_naive(queries, keys, kv_b, cfg.qk_nope_head_dim) else "absorb"


def query_chunks(queries: int) -> list[tuple[int, int]]:
    """[a, b) of each query chunk of the naive form (routed.model.attention.QUERY_CHUNK queries each)."""
    from routed.model.attention import QUERY_CHUNK

    return [(a, min(a + QUERY_CHUNK, queries)) for a in range(0, queries, QUERY_CHUNK)]


def engine_compiles(cfg: ModelConfig, fmt: str) -> bool:
    """Whether routed's loader compiles this model's one-token decode on a CPU: at least
    routed.model.gemv.MIN_MODEL_BYTES of weights as held (`fmt`), not offloaded or sharded (which the planner
    does not model). The one-row GEMV is on for the same models in bf16 (the loaded dtype of every format here)."""
    from routed.model.gemv import MIN_MODEL_BYTES  # imports torch: only for plans of routed's own engine

    return weight_breakdown(cfg, fmt).total_bytes >= MIN_MODEL_BYTES


COMPILED_FORMATS = ("bf16",)  # the compiled step modelled: int8/int4 (compiled since 1723d45) read at other rates


def _node_hit(n_experts: int, k: int, nodes: int) -> float:
    """P(a given node holds at least one of a token's k experts), experts spread evenly over `nodes`."""
    per_node = n_experts // nodes
    return 1.0 - math.comb(n_experts - per_node, k) / math.comb(n_experts, k)


def step_work(
    cfg: ModelConfig, fmt: str, par: Parallelism, mode: str, batch: int, context: int, new_tokens: int = 1,
    cached: int = 0, attention: str = "mha", devices_per_node: int = 8, experts_touched: float | None = None,
    eager: bool = False, gemv: bool = False, compile_decode: bool = False,
) -> StepWork:
    """Count one device's bytes, FLOPs and interconnect bytes for one step (see the module docstring).

    decode: `context` = keys each sequence attends (its cache length); `new_tokens` ignored (1).
    prefill: `new_tokens` = prompt tokens computed per sequence, `cached` = prefix already cached.
    experts_touched: distinct experts read per MoE layer per step on this device, when measured (a bench of
    a random checkpoint, whose router is far from uniform); default: the uniform-routing expectation.
    eager: routed's own CPU engine (attention per sequence, unfused ops): adds the activation bytes, score
    elements and logit elements, and the per-sequence kv_b reads of the module docstring. `attention` is then the
    engine's attention impl: "auto" (its default, also what "mha" means here: each sequence takes the form
    routed.model.attention.use_naive picks), "absorb" or "naive" (forced, as engines before 93f469e ran absorb).
    Absorbed: every key scored, masked afterwards (the einsums' FLOPs move into t_score); naive: the expansion
    of the keys as attention FLOPs and the causal chunks' scores (their matmuls' FLOPs move into t_score,naive).
    gemv, compile_decode (with eager): the engine's compiled one-row products and compiled one-token decode are
    on (`engine_compiles`); a decode step at one sequence is then a compiled step, and one-row products of
    eager steps are read at the row rate (module docstring).
    """
    if eager:
        attention = "auto" if attention == "mha" else attention
        if attention not in ENGINE_ATTENTION:
            raise RoutedError(f"routed's engine runs attention {', '.join(ENGINE_ATTENTION)}, not {attention!r}")
    decode = mode == "decode"
    q = 1 if decode else new_tokens
    T = batch * q  # tokens per attention data-parallel rank (a TP group)
    H_local = cfg.num_attention_heads / par.tp
    compiled = eager and compile_decode and decode and T == 1
    if compiled and fmt not in COMPILED_FORMATS:
        raise RoutedError(f"routed's compiled one-token step is modelled for {', '.join(COMPILED_FORMATS)} weights, "
                          f"not {fmt} (its fused loops read {fmt} at a rate nothing probes yet)")
    gemv = eager and (gemv or compiled)
    weight_bytes = linear_flops = row_bytes = 0.0
    for spec in tensor_specs(cfg):
        if spec.expert:
            continue
        share = device_share(spec, cfg, par)
        if spec.name == "model.embed_tokens":  # a gather of T rows, no FLOPs
            weight_bytes += T * cfg.hidden_size * 2 / par.tp
            continue
        rows = batch if spec.name == "lm_head" else T  # logits only for the sampled row of each sequence
        one_row = (spec.linear and not spec.name.endswith("kv_b_proj")) or spec.name == "lm_head"
        if compiled or (gemv and rows == 1 and one_row):  # read by a compiled multiply-sum: bytes, no FLOPs
            row_bytes += tensor_bytes(spec, fmt) * share
            continue
        weight_bytes += tensor_bytes(spec, fmt) * share
        linear_flops += 2 * rows * spec.numel * share

    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 0.0
    if moe_layers and E:
        group_tokens = T * par.ep / par.tp  # tokens reaching one EP group of `ep` devices
        held = math.ceil(E / par.ep)
        touched = held * (1.0 - (1.0 - k / E) ** group_tokens) if experts_touched is None else experts_touched
        if gemv and T == 1:  # one token: every expert it runs is a one-row product (compiled: read in place)
            row_bytes += moe_layers * touched * expert_bytes(cfg, fmt)
        else:
            weight_bytes += moe_layers * touched * expert_bytes(cfg, fmt)
            per_expert_params = 3 * cfg.hidden_size * cfg.moe_intermediate_size
            linear_flops += moe_layers * 2 * (group_tokens * k / par.ep) * per_expert_params

    L, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    N, V = cfg.qk_nope_head_dim, cfg.v_head_dim
    kv_tok = kv_bytes_per_token(cfg)
    layers = cfg.num_hidden_layers
    if decode:
        cache_bytes = batch * (context + 1) * kv_tok  # read the context, write the new latent
        attention_flops = layers * T * 2 * H_local * context * (2 * L + R)
    else:
        keys = cached + (q + 1) / 2  # average keys a causal query attends
        cache_bytes = batch * (cached + q) * kv_tok  # read the cached prefix, write the new latents
        if attention == "absorb":
            attention_flops = layers * T * 2 * H_local * keys * (2 * L + R)
        else:  # expand keys/values per head; cached prefix keys need the kv_b up-projection too
            attention_flops = layers * (T * 2 * H_local * keys * (N + R + V)
                                        + batch * cached * 2 * L * H_local * (N + V))
    nvlink, network = _comm_bytes(cfg, fmt, par, decode, T, moe_layers, devices_per_node)
    keys_seq = context + 1 if decode else cached + q  # keys each sequence attends (its context after the step)
    form = engine_attention(cfg, attention, q, keys_seq) if eager and not compiled else "absorb"
    chunks = query_chunks(q) if form == "naive" else []
    ops = engine_ops(layers - moe_layers, moe_layers, batch, moe_layers * touched, len(chunks) if chunks else None)
    activation = scores = naive_scores = logits = 0.0
    if compiled:  # module docstring, "compiled one-token steps"
        ops = ENGINE_OPS["step"] + ENGINE_OPS["sequence"]  # outside the compiled blocks
        scores = layers * H_local * (context + 1)
        logits = cfg.vocab_size
        return StepWork(mode, T / par.tp, weight_bytes, 0.0, 0.0, 0.0, fmt == "fp8", nvlink, network, touched, ops,
                        0.0, scores, logits, row_bytes + cache_bytes, float(layers), True)
    if eager:
        a = ACTIVATION_BYTES
        activation = T * (a["hidden"] * layers * cfg.hidden_size + a["expert_hidden"] * moe_layers * k * cfg.hidden_size)
        if form == "naive":  # module docstring, "attention over the keys"
            # each chunk [lo, hi) of queries attends the keys up to its last query: S - q + hi of them
            naive_scores = layers * batch * H_local * sum((hi - lo) * (keys_seq - q + hi) for lo, hi in chunks)
            attention_flops = layers * batch * 2 * keys_seq * L * H_local * (N + V)  # expand the keys once
            activation += layers * batch * H_local * (a["naive_key"] * keys_seq * (N + R)
                                                      + a["naive_query"] * q * (N + R + V))
        else:
            scores = layers * batch * H_local * q * keys_seq
            attention_flops = 0.0  # the two einsums over the keys are inside t_score (see the module docstring)
            activation += T * a["head_latent"] * layers * H_local * L
        logits = batch * cfg.vocab_size  # one sampled row per sequence
        kv_b = TensorSpec("kv_b_proj", "attention", cfg.num_attention_heads * (N + V), L, linear=True)
        weight_bytes += (batch - 1) * layers * tensor_bytes(kv_b, fmt) / par.tp  # read again for every sequence
    return StepWork(mode, T / par.tp, weight_bytes, cache_bytes, linear_flops, attention_flops, fmt == "fp8",
                    nvlink, network, touched, ops, activation, scores, logits, row_bytes,
                    naive_score_elements=naive_scores)


def _comm_bytes(
    cfg: ModelConfig, fmt: str, par: Parallelism, decode: bool, T: float, moe_layers: int, per_node: int
) -> tuple[float, float]:
    """(NVLink bytes, network bytes) one device sends per step; receiving is symmetric."""
    D = cfg.hidden_size
    nvlink = network = 0.0
    if par.ep > 1 and moe_layers:
        k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
        per_copy = D * (1 + 4 / 128 if fmt == "fp8" else 2) + D * 2  # dispatch + bf16 combine
        tokens = T / par.tp  # after attention each TP rank dispatches its share
        copies = k * (1 - 1 / par.ep)
        if par.ep <= per_node:
            nvlink += moe_layers * tokens * copies * per_copy
        elif decode:  # low-latency kernels: one RDMA message per remote expert
            network += moe_layers * tokens * copies * per_copy
        else:  # normal kernels: one RDMA copy per remote node, then NVLink forwarding inside it
            nodes = math.ceil(par.ep / per_node)
            network += moe_layers * tokens * (nodes - 1) * _node_hit(E, k, nodes) * per_copy
            nvlink += moe_layers * tokens * k * (1 - 1 / per_node) * per_copy
    if par.tp > 1:
        reduces = cfg.num_hidden_layers * 2  # after attention and after the MLP of every layer
        ring = reduces * 2 * (par.tp - 1) / par.tp * T * D * 2
        if par.tp <= per_node:
            nvlink += ring
        else:
            network += ring
    return nvlink, network


def step_time(work: StepWork, hw: Hardware, eff: Efficiency) -> StepTime:
    bw = hw.memory_bandwidth_gb_s * 1e9 * eff.memory
    bf16 = hw.bf16_tflops * 1e12 * eff.compute
    linear_peak = (hw.fp8_tflops or hw.bf16_tflops) * 1e12 * eff.compute if work.linear_fp8 else bf16
    mem_w, mem_a = work.weight_bytes / bw, work.cache_bytes / bw
    fl_w, fl_a = work.linear_flops / linear_peak, work.attention_flops / bf16
    combine = max if hw.overlap_memory_compute else (lambda a, b: a + b)
    compute_side = combine(mem_w, fl_w) + combine(mem_a, fl_a)
    comm = 0.0
    if work.network_bytes:
        comm = max(comm, work.network_bytes / (hw.network_gb_s * 1e9 or math.inf))
    if work.nvlink_bytes:
        comm = max(comm, work.nvlink_bytes / (hw.nvlink_gb_s * 1e9 or math.inf))
    if (work.network_bytes and not hw.network_gb_s) or (work.nvlink_bytes and not hw.nvlink_gb_s):
        comm = math.inf  # a multi-device plan on hardware without the link it needs
    comm /= eff.comm
    if (work.row_bytes or work.blocks) and not hw.compiles:
        raise RoutedError(f"{hw.name} has no probed figures for routed's compiled decode (row_gb_s, block_us, "
                          "compiled_score_ns), which this step runs; re-probe `local` (delete its cache file)")
    rows = work.row_bytes / (hw.row_gb_s * 1e9) if work.row_bytes else 0.0  # type: ignore[operator]
    compute_side += rows
    overhead = eff.op_s * work.ops + work.blocks * (hw.block_us or 0) * 1e-6
    score_ns = hw.compiled_score_ns if work.compiled else hw.score_ns
    if work.naive_score_elements and hw.eager and hw.naive_score_ns is None:  # a probe from before version 4
        raise RoutedError(f"{hw.name} has no probed cost per score of routed's naive-form attention (naive_score_ns), "
                          "which this step runs; re-probe `local` (delete its cache file)")
    eager = (work.activation_bytes / (hw.memory_bandwidth_gb_s * 1e9) + work.score_elements * (score_ns or 0) * 1e-9
             + work.naive_score_elements * (hw.naive_score_ns or 0) * 1e-9
             + work.logit_elements * (hw.logit_ns or 0) * 1e-9)
    step = compute_side + comm - eff.overlap * min(compute_side, comm) + overhead + eager
    return StepTime(work, mem_w + mem_a + rows, fl_w + fl_a, comm, overhead, step, eager)


def cost_per_million(tokens_per_second_per_device: float, price_per_hour: float | None) -> float | None:
    """USD per million tokens from one device's rate and its price per hour."""
    if price_per_hour is None or tokens_per_second_per_device <= 0:
        return None
    return price_per_hour / (tokens_per_second_per_device * 3600) * 1e6
