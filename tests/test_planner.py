"""routed.planner: exact memory from configs, the roofline, calibration, the DeepSeek check and `routed plan`.

Everything here is arithmetic on configs or on small synthetic bench files; nothing measures routed itself
(benchmarks/plan_calibration.py does that) and nothing writes a large checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import replace
from math import prod
from pathlib import Path

import pytest

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.planner.calibrate import Bench, bench_from_dict, calibrate, load_bench, recorded_hardware, run_work
from routed.planner.cli import add_parser
from routed.planner.hardware import HARDWARE_PRESETS, Hardware, get_hardware, hardware_from_dict, local_hardware
from routed.planner.memory import (
    Parallelism,
    TensorSpec,
    expert_bytes,
    kv_bytes_per_token,
    memory_fit,
    tensor_bytes,
    weight_breakdown,
)
from routed.planner.models import MODEL_PRESETS, preset_config
from routed.planner.reference import PUBLISHED, deepseek_check
from routed.planner.plan import PlanRequest, batch_sweep, make_plan
from routed.planner.roofline import (
    ENGINE_OPS,
    Efficiency,
    engine_attention,
    engine_compiles,
    engine_ops,
    expected_distinct_experts,
    step_time,
    step_work,
)
from routed.presets import PRESETS, expected_tensors

SYNTHETIC_HW = Hardware("synthetic", memory_gb=64, memory_bandwidth_gb_s=40.0, bf16_tflops=0.5,
                        devices_per_node=1, overlap_memory_compute=False)
# routed's CPU engine with its compiled paths probed (figures of the order this machine's probe reads)
CPU = Hardware("cpu", 16, 25.0, 0.2, devices_per_node=1, overlap_memory_compute=False, eager=True, score_ns=11.0,
               logit_ns=1.0, naive_score_ns=5.0, row_gb_s=20.0, block_us=400.0, compiled_score_ns=30.0)


# ---- memory ----------------------------------------------------------------------------------------------
def test_v3_latent_cache_is_70272_bytes_per_token() -> None:
    assert kv_bytes_per_token(preset_config("deepseek-v3")) == 70_272


def test_v3_parameter_counts_match_the_spec() -> None:
    wb = weight_breakdown(preset_config("deepseek-v3"), "bf16", with_mtp=True)
    main = wb.total_params - wb.params["mtp"]
    assert abs(main / 671.03e9 - 1) < 1e-3  # spec §1.2: 671.03 B main model
    assert abs(wb.params["mtp"] / 11.61e9 - 1) < 1e-3  # spec §1.2: 11.61 B MTP unique
    assert wb.params["routed_experts"] == 58 * 256 * 3 * 7168 * 2048


@pytest.mark.parametrize("name, total_b", [("deepseek-v2-lite", 15.7), ("moonlight", 16.0), ("kimi-k2", 1026.4)])
def test_variant_parameter_counts_match_the_spec_table(name: str, total_b: float) -> None:
    assert abs(weight_breakdown(preset_config(name)).total_params / (total_b * 1e9) - 1) < 5e-3  # §7.3, 0.1B rounding


def test_small_weight_bytes_equal_what_write_random_checkpoint_writes() -> None:
    cfg = ModelConfig.from_dict(PRESETS["small"])
    shapes = expected_tensors(cfg, with_mtp=False)
    # write_random_checkpoint stores every tensor in bf16 except the fp32 router correction bias
    written = sum(prod(s) * (4 if n.endswith("e_score_correction_bias") else 2) for n, s in shapes.items())
    wb = weight_breakdown(cfg, "bf16")
    assert wb.total_bytes == written
    assert wb.total_params == sum(prod(s) for s in shapes.values())


def test_quantised_formats_count_their_scales() -> None:
    kv_a = TensorSpec("kv_a_proj_with_mqa", "attention", 576, 7168, linear=True)
    assert tensor_bytes(kv_a, "bf16") == 576 * 7168 * 2
    assert tensor_bytes(kv_a, "fp8") == 576 * 7168 + 5 * 56 * 4  # ceil-div grid [5, 56] of fp32 (spec §6.1)
    assert tensor_bytes(kv_a, "int8") == 576 * 7168 + 576 * 4
    assert tensor_bytes(kv_a, "int4") == 576 * 7168 // 2 + 576 * (7168 // 32) * 2
    norm = TensorSpec("norm", "norms_router", 7168)
    assert {tensor_bytes(norm, f) for f in ("bf16", "fp8", "int8", "int4")} == {7168 * 2}
    with pytest.raises(RoutedError, match="weight format"):
        tensor_bytes(kv_a, "fp4")


def test_fp8_keeps_embedding_head_and_router_in_bf16() -> None:
    cfg = preset_config("deepseek-v3")
    bf16, fp8 = weight_breakdown(cfg, "bf16"), weight_breakdown(cfg, "fp8")
    assert fp8.bytes["embed_head"] == bf16.bytes["embed_head"] == 2 * 129280 * 7168 * 2
    assert fp8.bytes["norms_router"] == bf16.bytes["norms_router"]
    expert = 2 * 2048 * 7168 + 7168 * 2048 + (2 * 16 * 56 + 56 * 16) * 4
    assert expert_bytes(cfg, "fp8") == expert
    assert fp8.bytes["routed_experts"] == 58 * 256 * expert


def test_per_device_bytes_under_tp_and_ep() -> None:
    cfg = preset_config("deepseek-v3")
    one = weight_breakdown(cfg, "fp8")
    ep = weight_breakdown(cfg, "fp8", Parallelism(144, 1, 144))
    assert ep.device_bytes["routed_experts"] == 58 * 2 * expert_bytes(cfg, "fp8")  # ceil(256/144) = 2 slots
    assert ep.device_bytes["attention"] == one.bytes["attention"]  # DP attention: replicated
    tp = weight_breakdown(cfg, "fp8", Parallelism(8, 8, 8))
    assert tp.device_bytes["routed_experts"] == one.bytes["routed_experts"] / 8
    assert tp.device_bytes["embed_head"] == one.bytes["embed_head"] / 8
    assert one.bytes["attention"] / 8 < tp.device_bytes["attention"] < one.bytes["attention"]  # q_a, kv_a replicated


def test_parallelism_that_does_not_divide_is_refused() -> None:
    cfg = preset_config("deepseek-v3")
    with pytest.raises(RoutedError, match="--tp 3 does not divide --gpus 8"):
        Parallelism(8, 3, 8).check(cfg)
    with pytest.raises(RoutedError, match="--ep 3 does not divide"):
        Parallelism(8, 1, 3).check(cfg)
    with pytest.raises(RoutedError, match="attention heads"):
        Parallelism(256, 256, 256).check(cfg)
    with pytest.raises(RoutedError, match="more than the model's 256 routed experts"):
        Parallelism(512, 1, 512).check(cfg)


def test_memory_fit_counts_cache_tokens_beside_the_weights() -> None:
    fit = memory_fit(24e9, 80e9, 70_272, 0.9)
    assert fit.kv_tokens == int((72e9 - 24e9) // 70_272)
    assert fit.max_batch(4989) == fit.kv_tokens // 4989
    with pytest.raises(RoutedError, match="weights need 673.2 GB"):
        memory_fit(673.2e9, 80e9, 70_272, 0.9)


# ---- roofline --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("E, k, N", [(256, 8, 1), (256, 8, 16), (64, 6, 4), (64, 6, 40), (16, 4, 3)])
def test_expected_distinct_experts_matches_monte_carlo(E: int, k: int, N: int) -> None:
    rng, trials = random.Random(0), 3000
    mc = sum(len({e for _ in range(N) for e in rng.sample(range(E), k)}) for _ in range(trials)) / trials
    assert expected_distinct_experts(E, k, N) == pytest.approx(mc, rel=0.01)
    assert expected_distinct_experts(E, k, 1) == k


def test_decode_bytes_at_batch_one_are_the_active_weights() -> None:
    cfg = ModelConfig.from_dict(PRESETS["small"])
    wb = weight_breakdown(cfg, "bf16")
    w = step_work(cfg, "bf16", Parallelism(), "decode", batch=1, context=100)
    moe_layers, E, k = 7, 64, 6
    embed = cfg.vocab_size * cfg.hidden_size * 2
    expected = (wb.total_bytes - embed + cfg.hidden_size * 2
                - moe_layers * (E - k) * expert_bytes(cfg, "bf16"))  # one embedding row, k experts per layer
    assert w.weight_bytes == pytest.approx(expected, rel=1e-12)
    assert w.cache_bytes == 101 * kv_bytes_per_token(cfg)
    assert w.experts_touched == pytest.approx(k)


def test_engine_ops_follow_the_measured_counts() -> None:
    # counted with a TorchDispatchMode over engine steps of `small` (8 layers, 1 dense, top-6): decode at 1 and
    # 4 sequences ran 42 and 107.7 experts per step and dispatched 1,803 and 3,468 aten ops
    assert engine_ops(1, 7, 1, 42) == pytest.approx(1803, rel=0.005)
    assert engine_ops(1, 7, 4, 107.67) == pytest.approx(3468, rel=0.005)
    cfg = ModelConfig.from_dict(PRESETS["small"])
    w = step_work(cfg, "bf16", Parallelism(), "decode", 4, 80, experts_touched=15.0)
    assert w.ops == 27 + 80 + 7 * 124 + (8 * 28 + 22) * 4 + 14 * 7 * 15
    w = step_work(cfg, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=256, experts_touched=30, eager=True,
                  attention="absorb")
    assert w.ops == 27 + 80 + 7 * 124 + (8 * 28 + 22) + 14 * 7 * 30
    assert w.experts_touched == 30
    # a whole prompt in the naive form (the engine's 'auto'): 15 ops per layer + 22 per query chunk of 128, in place
    # of the absorbed form's 28. Counted the same way on the engine of eb1cca5, tiny's widths with kv_lora_rank 64
    # (so that 'auto' picks naive): 3 layers (1 dense), one 256-token prompt, 32 experts run: 998 ops; one 384-token
    # prompt (3 chunks): 1,064; two 256-token prompts: 1,206. Each within 1%.
    assert engine_ops(1, 2, 1, 32, chunks=2) == pytest.approx(998, rel=0.01)
    assert engine_ops(1, 2, 1, 32, chunks=3) == pytest.approx(1064, rel=0.01)
    assert engine_ops(1, 2, 2, 32, chunks=2) == pytest.approx(1206, rel=0.01)
    w = step_work(cfg, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=256, experts_touched=30, eager=True)
    assert w.ops == 27 + 80 + 7 * 124 + ((15 + 22 * 2) * 8 + 22) + 14 * 7 * 30


def test_eager_steps_count_activations_scores_logits_and_per_sequence_kv_b() -> None:
    cfg = ModelConfig.from_dict(PRESETS["small"])  # D 1024, 16 heads, kv_lora_rank 256, 8 layers (7 MoE, top-6)
    fused = step_work(cfg, "bf16", Parallelism(), "decode", 4, 80)
    eager = step_work(cfg, "bf16", Parallelism(), "decode", 4, 80, eager=True)
    assert fused.activation_bytes == fused.score_elements == fused.logit_elements == 0
    assert eager.activation_bytes == 4 * (187 * 8 * 1024 + 34 * 7 * 6 * 1024 + 13 * 8 * 16 * 256)
    assert eager.score_elements == 8 * 4 * 16 * 81  # every sequence scores its 80 cached keys and the new one
    assert eager.logit_elements == 4 * 129280
    kv_b = 16 * (64 + 64) * 256 * 2
    assert eager.weight_bytes - fused.weight_bytes == 3 * 8 * kv_b  # read again by sequences 2-4, every layer
    # the absorbed path scores every key and masks afterwards; its einsums' time goes by score, not by FLOP
    causal = step_work(cfg, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=256, attention="absorb")
    full = step_work(cfg, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=256, eager=True, attention="absorb")
    assert causal.attention_flops > 0 and full.attention_flops == 0 and eager.attention_flops == 0
    assert full.linear_flops == causal.linear_flops
    assert full.score_elements == 8 * 16 * 256 * 256 and full.naive_score_elements == 0
    # the engine's default ('auto'): a whole prompt expands its keys once (FLOPs) and attends in causal chunks of
    # 128 queries, each over the keys up to its last query (scores at the naive form's own cost)
    naive = step_work(cfg, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=256, eager=True)
    assert naive.score_elements == 0 and naive.naive_score_elements == 8 * 16 * (128 * 128 + 128 * 256)
    assert naive.attention_flops == 8 * 2 * 256 * 256 * 16 * (64 + 64)
    assert naive.activation_bytes == 256 * (187 * 8 * 1024 + 34 * 7 * 6 * 1024) + 8 * 16 * 256 * (4 * 96 + 4 * 160)
    assert naive.linear_flops == full.linear_flops and naive.weight_bytes == full.weight_bytes
    hw = Hardware("cpu", 16, 20.0, 0.2, devices_per_node=1, overlap_memory_compute=False, eager=True,
                  score_ns=5.0, logit_ns=1.0)
    t = step_time(eager, hw, Efficiency(op_s=1e-5))
    expected = eager.activation_bytes / 20e9 + eager.score_elements * 5e-9 + eager.logit_elements * 1e-9
    assert t.eager_s == pytest.approx(expected)
    assert t.step_s == pytest.approx(t.memory_s + t.compute_s + t.overhead_s + t.eager_s)
    with pytest.raises(RoutedError, match="naive_score_ns"):  # a probe from before the naive form was probed
        step_time(naive, hw, Efficiency())
    t = step_time(naive, replace(hw, naive_score_ns=4.0), Efficiency(op_s=1e-5))
    assert t.eager_s == pytest.approx(naive.activation_bytes / 20e9 + naive.naive_score_elements * 4e-9
                                      + naive.logit_elements * 1e-9)
    assert t.compute_s == pytest.approx((naive.linear_flops + naive.attention_flops) / (0.2e12 * 0.65))


def test_eager_attention_form_follows_the_engines_rule() -> None:
    """routed.model.attention.use_naive per sequence: a whole prompt naive where 2L > N + V, decode absorbed, a
    short chunk over a long cached context absorbed; `tiny` (2L = N + V) stays absorbed."""
    from routed.model.attention import QUERY_CHUNK

    small, tiny = (ModelConfig.from_dict(PRESETS[name]) for name in ("small", "tiny"))
    assert QUERY_CHUNK == 128
    assert engine_attention(small, "auto", 256, 256) == "naive" and engine_attention(small, "auto", 1, 80) == "absorb"
    assert engine_attention(small, "auto", 16, 4096) == "absorb" and engine_attention(small, "auto", 512, 4096) == "naive"
    assert engine_attention(tiny, "auto", 256, 256) == "absorb"  # kv_lora_rank 32: 2L = N + V = 64, a tie
    assert engine_attention(tiny, "naive", 1, 80) == "naive" and engine_attention(small, "absorb", 256, 256) == "absorb"
    w = step_work(tiny, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=256, eager=True)
    assert w.naive_score_elements == 0 and w.score_elements == 3 * 4 * 256 * 256
    # a prompt of 300 after 100 cached tokens: chunks of 128, 128, 44 queries see 228, 356, 400 keys
    w = step_work(small, "bf16", Parallelism(), "prefill", 2, 0, new_tokens=300, cached=100, eager=True)
    assert w.naive_score_elements == 8 * 2 * 16 * (128 * 228 + 128 * 356 + 44 * 400)
    assert w.attention_flops == 8 * 2 * 2 * 400 * 256 * 16 * 128  # 400 keys expanded per sequence
    assert w.ops == engine_ops(1, 7, 2, 7 * w.experts_touched, chunks=3)
    d = step_work(small, "bf16", Parallelism(), "decode", 4, 80, eager=True)
    assert d.naive_score_elements == 0 and d.score_elements == 8 * 4 * 16 * 81
    with pytest.raises(RoutedError, match="not 'mha2'"):
        step_work(small, "bf16", Parallelism(), "prefill", 1, 0, new_tokens=8, eager=True, attention="mha2")


def test_engine_compiles_follows_the_loaders_rule() -> None:
    from routed.model.gemv import MIN_MODEL_BYTES

    cfgs = {name: ModelConfig.from_dict(PRESETS[name]) for name in ("tiny", "medium", "small")}
    assert not engine_compiles(cfgs["tiny"], "bf16")  # 68 MB
    assert engine_compiles(cfgs["medium"], "bf16") and engine_compiles(cfgs["small"], "bf16")  # 0.92, 2.0 GB
    assert engine_compiles(cfgs["small"], "int4") and not engine_compiles(cfgs["tiny"], "int8")  # bytes as held
    assert weight_breakdown(cfgs["tiny"], "bf16").total_bytes < MIN_MODEL_BYTES < \
        weight_breakdown(cfgs["medium"], "bf16").total_bytes
    # the compiled step is modelled in bf16 only: an int8 plan stays eager and says so; an int8 bench is refused
    plan = make_plan(PlanRequest("small", cfgs["small"], CPU, weights="int8", context=64, batch=1))
    assert not plan.decode.work.compiled and any("does not model yet" in n for n in plan.notes)
    with pytest.raises(RoutedError, match="modelled for bf16 weights, not int8"):
        step_work(cfgs["small"], "int8", Parallelism(), "decode", 1, 64, eager=True, compile_decode=True)
    with pytest.raises(RoutedError, match="compiled one-token decode in int8"):
        bench_from_dict({"model": {"config": PRESETS["small"]}, "quant": "int8", "engine": {"compiled_decode": True},
                         "runs": [{"kind": "decode", "batch": 1, "context": 8, "tokens_per_second": 3.0}]})


def test_compiled_decode_step_is_row_reads_blocks_and_per_step_ops() -> None:
    cfg = ModelConfig.from_dict(PRESETS["small"])  # 8 layers, 16 heads, vocab 129,280
    par, on = Parallelism(), {"gemv": True, "compile_decode": True}
    eager = step_work(cfg, "bf16", par, "decode", 1, 80, eager=True)
    w = step_work(cfg, "bf16", par, "decode", 1, 80, eager=True, **on)
    embed_row = cfg.hidden_size * 2
    assert w.compiled and w.blocks == 8 and w.ops == ENGINE_OPS["step"] + ENGINE_OPS["sequence"] == 49
    assert w.weight_bytes == embed_row and w.cache_bytes == 0  # everything else is read by the compiled loops
    assert w.row_bytes == pytest.approx(eager.weight_bytes - embed_row + eager.cache_bytes, rel=1e-12)
    assert w.linear_flops == w.attention_flops == w.activation_bytes == 0
    assert w.score_elements == eager.score_elements == 8 * 16 * 81 and w.logit_elements == 129_280
    eff = Efficiency(memory=0.3, compute=0.9, op_s=7.5e-6)
    t = step_time(w, CPU, eff)
    expected = (w.row_bytes / 20e9 + embed_row / (25e9 * 0.3) + 8 * 400e-6 + 49 * 7.5e-6 + 8 * 16 * 81 * 30e-9
                + 129_280 * 1e-9)
    assert t.step_s == pytest.approx(expected, rel=1e-12)
    assert step_time(w, CPU, eff).step_s < step_time(eager, CPU, eff).step_s
    # only decode at one sequence is compiled; a batch-1 prefill reads its one sampled lm_head row at the row rate
    two = step_work(cfg, "bf16", par, "decode", 2, 80, eager=True, **on)
    assert not two.compiled and two.row_bytes == two.blocks == 0
    assert two.weight_bytes == step_work(cfg, "bf16", par, "decode", 2, 80, eager=True).weight_bytes
    plain = step_work(cfg, "bf16", par, "prefill", 1, 0, new_tokens=64, eager=True)
    pre = step_work(cfg, "bf16", par, "prefill", 1, 0, new_tokens=64, eager=True, **on)
    lm_head = cfg.vocab_size * cfg.hidden_size * 2
    assert not pre.compiled and pre.row_bytes == lm_head and pre.weight_bytes == plain.weight_bytes - lm_head
    assert pre.linear_flops == plain.linear_flops - 2 * lm_head / 2
    assert step_work(cfg, "bf16", par, "prefill", 2, 0, new_tokens=64, eager=True, **on).row_bytes == 0  # 2 rows
    # the GEMV without the compiled blocks: every one-row linear product of an eager batch-1 decode, kv_b aside
    gemv_only = step_work(cfg, "bf16", par, "decode", 1, 80, eager=True, gemv=True)
    kv_b = 8 * 16 * (64 + 64) * 256 * 2
    assert not gemv_only.compiled and gemv_only.ops == eager.ops
    assert gemv_only.weight_bytes == pytest.approx(embed_row + kv_b + _norms_and_routers(cfg))
    # GPU plans and non-eager steps ignore the flags
    assert not step_work(cfg, "bf16", par, "decode", 1, 80, **on).compiled


def _norms_and_routers(cfg: ModelConfig) -> int:
    from routed.planner.memory import tensor_specs

    return sum(tensor_bytes(s, "bf16") for s in tensor_specs(cfg)
               if not s.linear and not s.expert and s.name not in ("model.embed_tokens", "lm_head"))


def test_a_compiled_step_needs_the_compiled_probe() -> None:
    cfg = ModelConfig.from_dict(PRESETS["small"])
    w = step_work(cfg, "bf16", Parallelism(), "decode", 1, 80, eager=True, gemv=True, compile_decode=True)
    with pytest.raises(RoutedError, match="no probed figures for routed's compiled decode"):
        step_time(w, replace(CPU, block_us=None), Efficiency())


def test_local_plans_compile_batch_one_decode_only() -> None:
    eff = Efficiency(memory=0.3, compute=0.9, op_s=7.5e-6)
    small, tiny = preset_config("small"), ModelConfig.from_dict(PRESETS["tiny"])
    one = make_plan(PlanRequest("small", small, CPU, context=64, batch=1, efficiency=eff))
    assert one.decode.work.compiled and not one.prefill.work.compiled
    assert any("compiles this model's one-token decode" in n for n in one.notes)
    assert "compiled one-token step" in one.to_dict()["step_model"]
    sweep = batch_sweep(one.request, one)
    assert sweep[0][0] == 1 and sweep[0][1].work.compiled and not any(t.work.compiled for _, t in sweep[1:])
    assert not make_plan(PlanRequest("small", small, CPU, context=64, batch=2, efficiency=eff)).decode.work.compiled
    stays = make_plan(PlanRequest("tiny", tiny, CPU, context=64, batch=1, efficiency=eff))
    assert not stays.decode.work.compiled and any("stays eager" in n for n in stays.notes)
    no_compiler = make_plan(PlanRequest("small", small, replace(CPU, row_gb_s=None), context=64, batch=1))
    assert not no_compiler.decode.work.compiled and no_compiler.decode.work.row_bytes == 0


def test_regimes_decode_memory_bound_prefill_compute_bound() -> None:
    cfg, hw = ModelConfig.from_dict(PRESETS["small"]), HARDWARE_PRESETS["h100"]
    decode = step_time(step_work(cfg, "bf16", Parallelism(), "decode", 1, 512), hw, Efficiency())
    prefill = step_time(step_work(cfg, "bf16", Parallelism(), "prefill", 4, 0, new_tokens=4096), hw, Efficiency())
    assert decode.bound == "memory" and prefill.bound == "compute"
    assert decode.step_s == pytest.approx(decode.memory_s)  # roofline: max, and memory dominates both groups


def test_decode_expert_parallel_sends_k_copies_per_token() -> None:
    cfg = preset_config("deepseek-v3")
    w = step_work(cfg, "fp8", Parallelism(144, 1, 144), "decode", 128, 4989)
    per_layer = 128 * 8 * (1 - 1 / 144) * 7168 * (1 + 4 / 128 + 2)  # fp8 dispatch + bf16 combine
    assert w.network_bytes == pytest.approx(58 * per_layer)
    assert w.nvlink_bytes == 0


# ---- calibration -----------------------------------------------------------------------------------------
def _synthetic_bench(config: dict, hw: Hardware, eff: Efficiency, compiled: bool = False) -> dict:
    """A bench file whose rates the model itself produced with known factors (`compiled`: by an engine with
    the compiled GEMV and one-token decode on)."""
    runs = [{"kind": "decode", "batch": b, "context": 80} for b in (1, 4, 16)]
    runs += [{"kind": "prefill", "batch": 1, "prompt_len": p} for p in (256, 512)]
    cfg = ModelConfig.from_dict(config)
    bench = bench_from_dict({"model": {"config": config}, "runs": [{**r, "tokens_per_second": 1.0} for r in runs]})
    for r, run in zip(runs, bench.runs):
        r["tokens_per_second"] = step_time(run_work(cfg, run, "bf16", compiled, compiled), hw, eff).tokens_per_second
    return {"model": {"config": config}, "dtype": "bf16", "threads": 2, "runs": runs,
            "engine": {"commit": "synthetic", "gemv": compiled, "compiled_decode": compiled}}


@pytest.mark.parametrize("overlap", [False, True])
def test_calibration_recovers_known_factors(overlap: bool) -> None:
    hw = Hardware("synthetic", 64, 40.0, 0.5, devices_per_node=1, overlap_memory_compute=overlap)
    truth = Efficiency(memory=0.37, compute=0.21, op_s=1.3e-5)
    bench = bench_from_dict(_synthetic_bench(PRESETS["small"], hw, truth))
    fit = calibrate([bench], hw)
    assert fit.overhead_fitted
    assert fit.efficiency.memory == pytest.approx(0.37, rel=1e-3)
    assert fit.efficiency.compute == pytest.approx(0.21, rel=1e-3)
    assert fit.efficiency.op_s == pytest.approx(1.3e-5, rel=1e-3)
    assert fit.rms_log_error < 1e-4
    assert all(abs(r.error) < 1e-3 for r in fit.rows)


def test_calibration_models_the_compiled_decode_a_bench_recorded() -> None:
    truth = Efficiency(memory=0.31, compute=0.9, op_s=7.5e-6)
    raw = _synthetic_bench(PRESETS["small"], CPU, truth, compiled=True)
    bench = bench_from_dict(raw)
    assert bench.gemv and bench.compiled_decode and bench.engine == "synthetic"
    fit = calibrate([bench], CPU)
    assert fit.efficiency.memory == pytest.approx(0.31, rel=1e-3)
    assert fit.efficiency.op_s == pytest.approx(7.5e-6, rel=1e-3)
    assert [r.label.endswith("(compiled)") for r in fit.rows] == [True, False, False, False, False]
    # the same rates read as an eager engine's (a file without `engine`) are a different model
    eager = bench_from_dict({k: v for k, v in raw.items() if k != "engine"})
    assert not eager.gemv and not eager.compiled_decode and eager.engine is None
    assert calibrate([eager], CPU).rms_log_error > 10 * fit.rms_log_error + 1e-3
    with pytest.raises(RoutedError, match="engine.compiled_decode must be true or false"):
        bench_from_dict({**raw, "engine": {"compiled_decode": "yes"}})


def test_calibration_leaves_out_an_overhead_it_does_not_need(tmp_path: Path) -> None:
    truth = Efficiency(memory=0.5, compute=0.3)
    file = tmp_path / "bench.json"
    file.write_text(json.dumps(_synthetic_bench(PRESETS["tiny"], SYNTHETIC_HW, truth)))
    fit = calibrate([load_bench(file)], SYNTHETIC_HW)
    assert not fit.overhead_fitted and fit.efficiency.op_s == 0
    assert fit.efficiency.memory == pytest.approx(0.5, rel=1e-3)
    assert fit.efficiency.compute == pytest.approx(0.3, rel=1e-3)


def test_bad_bench_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(RoutedError, match="no such bench file"):
        load_bench(tmp_path / "missing.json")
    with pytest.raises(RoutedError, match="`kind` must be decode or prefill"):
        bench_from_dict({"model": {"config": PRESETS["tiny"]}, "runs": [{"kind": "train"}]})
    with pytest.raises(RoutedError, match="offloaded"):
        bench_from_dict({"model": {"config": PRESETS["tiny"]}, "max_ram_gb": 1.0,
                         "runs": [{"kind": "decode", "batch": 1, "context": 8, "tokens_per_second": 3.0}]})
    int8 = bench_from_dict({"model": {"config": PRESETS["tiny"]}, "quant": "int8",
                            "runs": [{"kind": "decode", "batch": 1, "context": 8, "tokens_per_second": 3.0}]})
    assert int8.fmt == "int8"
    with pytest.raises(RoutedError, match="`context` must be a positive number"):
        bench_from_dict({"model": {"config": PRESETS["tiny"]},
                         "runs": [{"kind": "decode", "batch": 1, "tokens_per_second": 3.0}]})


# ---- calibration against `routed bench` on this machine (benchmarks/plan_calibration.py) ------------------
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "plan_calibration"
MEASURED = RESULTS / "eager-720ff02"  # measured on the eager engine, before the compiled GEMV and decode
SHAPES = ("tiny", "demo", "medium", "small")


def _measured(folder: Path = MEASURED) -> tuple[dict[str, Bench], list[Bench], Hardware]:
    """The latest bench of every shape, every session of `medium` (the calibrated checkpoint), its latest probe
    (with the fields a later probe version added from the folder's probe supplement, if any: recorded_hardware)."""
    benches = {shape: load_bench(folder / f"bench_{shape}.json") for shape in SHAPES}
    medium = [load_bench(f) for f in sorted(folder.glob("bench_medium.session*.json"))] + [benches["medium"]]
    return benches, medium, recorded_hardware(folder / "bench_medium.json")[0]


def test_calibrated_on_medium_the_planner_predicts_tiny_demo_and_small_within_25_percent() -> None:
    """The `routed bench` files stored by benchmarks/plan_calibration.py (BENCHMARKS.md, "Planner calibration"):
    fitted on `medium` alone (two bench sessions of it), 26 of the 27 prefill (64, 256 tokens) and decode (1-64
    sequences) rates of `tiny`, the bundled demo model and `small` are predicted within 25%. The known miss is
    the demo model's 256-token prefill (+29%: attention over the keys costs it ~1.7x the probed ns per score,
    see BENCHMARKS.md); it is held to 35%."""
    benches, medium, hw = _measured()
    assert len(medium) == 2 and {b.name for b in medium} == {"medium"}
    for bench in [*benches.values(), *medium]:  # measured before the compiled GEMV and decode: modelled eager
        assert bench.engine == "720ff02" and not bench.gemv and not bench.compiled_decode, bench.name
        assert bench.attention == "absorb", bench.name  # and before 93f469e's per-sequence attention form
    assert hw.eager and hw.score_ns and hw.logit_ns  # the probe recorded with the fitted shape's runs
    fit = calibrate(medium, hw)
    eff = fit.efficiency
    assert fit.overhead_fitted
    assert 0.1 < eff.memory < 1 and 0.3 < eff.compute < 1.5 and 2e-6 < eff.op_s < 3e-5  # physical, not degenerate
    errors = {(shape, row.label): row.error for shape in ("tiny", "demo", "small")
              for row in fit.predict(benches[shape], hw)}
    assert len(errors) == 27 and {kind for _, kind in errors} >= {"prefill batch 1 x 64 tokens",
                                                                   "decode batch 64, context 32"}
    known = ("demo", "prefill batch 1 x 256 tokens")
    assert abs(errors.pop(known)) < 0.35
    worst = max(errors, key=lambda key: abs(errors[key]))
    assert abs(errors[worst]) < 0.25, f"{worst}: {errors[worst]:+.1%}"


def test_measured_calibration_needs_the_eager_terms_and_the_measured_routing() -> None:
    """The same fit with routed's eager costs left out, or with uniform routing in place of the experts each
    step measurably ran, misses by far more: by 70% and 44% (against 29%) — the test above is not slack."""
    benches, medium, hw = _measured()

    def uniform(b: Bench) -> Bench:
        return replace(b, runs=tuple(replace(r, experts_touched=None) for r in b.runs))

    def worst(hardware: Hardware, strip_routing: bool) -> float:
        used = {shape: uniform(b) if strip_routing else b for shape, b in benches.items()}
        fit = calibrate([uniform(b) if strip_routing else b for b in medium], hardware)
        return max(abs(row.error) for shape in ("tiny", "demo", "small") for row in fit.predict(used[shape], hardware))

    assert worst(hw, strip_routing=False) < 0.35
    assert worst(replace(hw, score_ns=0.0, logit_ns=0.0), strip_routing=False) > 0.5
    assert worst(hw, strip_routing=True) > 0.4


@pytest.mark.skipif(not all((RESULTS / f"bench_{shape}.json").exists() for shape in SHAPES),
                    reason="not yet measured on the current engine: python benchmarks/plan_calibration.py")
def test_on_the_current_engine_calibrated_on_medium_the_planner_predicts_the_others_within_25_percent() -> None:
    """Files benchmarks/plan_calibration.py writes on the current engine: `medium` and `small` decode at batch
    1 compiled, `tiny` and the demo model eager; fitted on `medium`'s sessions of that engine, every rate of the
    other three shapes within 25%."""
    benches, medium, hw = _measured(RESULTS)
    assert all(b.compiled_decode == b.gemv == (b.name in ("medium", "small")) for b in benches.values())
    medium = [b for b in medium if b.compiled_decode]  # sessions of the current engine only (the script pools so)
    assert hw.compiles
    fit = calibrate(medium, hw)
    rows = [(shape, row) for shape in ("tiny", "demo", "small") for row in fit.predict(benches[shape], hw)]
    assert [row.label for shape, row in rows if row.label.endswith("(compiled)")] == \
        ["decode batch 1, context 32 (compiled)"]  # small's
    worst = max(rows, key=lambda sr: abs(sr[1].error))
    assert abs(worst[1].error) < 0.25, f"{worst[0]} {worst[1].label}: {worst[1].error:+.1%}"


# ---- DeepSeek's published deployment ---------------------------------------------------------------------
def test_deepseek_per_node_figures_within_2x_of_published() -> None:
    check = deepseek_check()
    decode_ratio = check.decode_per_node / PUBLISHED["decode_output_tokens_per_s_per_node"]
    prefill_ratio = check.prefill_per_node_with_hits / PUBLISHED["prefill_input_tokens_per_s_per_node"]
    assert 0.5 <= decode_ratio <= 2.0, decode_ratio
    assert 0.5 <= prefill_ratio <= 2.0, prefill_ratio
    assert PUBLISHED["nodes"] * 8 * PUBLISHED["usd_per_gpu_hour"] * 24 == PUBLISHED["usd_per_day"]
    cost = check.to_dict()["cost"]
    assert cost["published_usd_per_million_output"] == pytest.approx(0.3003, rel=1e-3)  # $16/node-h at 14.8k/s


# ---- hardware --------------------------------------------------------------------------------------------
def test_hardware_presets_carry_sources_and_prices() -> None:
    for name in ("h800", "h100", "h200", "a100", "b200"):
        hw = get_hardware(name)
        assert hw.sources and hw.price_per_hour and hw.price_source, name
    assert get_hardware("H800").price_per_hour == 2.0
    with pytest.raises(RoutedError, match="unknown hardware 'tpu9'"):
        get_hardware("tpu9")


def test_hardware_file_format(tmp_path: Path) -> None:
    file = tmp_path / "mine.json"
    file.write_text(json.dumps({"name": "mine", "memory_gb": 48, "memory_bandwidth_gb_s": 960, "bf16_tflops": 181,
                                "price_per_hour": 0.99}))
    hw = get_hardware(str(file))
    assert (hw.name, hw.memory_gb, hw.fp8_tflops, hw.price_per_hour) == ("mine", 48, None, 0.99)
    assert not hw.compiles
    fast = hardware_from_dict({"memory_gb": 16, "memory_bandwidth_gb_s": 25, "bf16_tflops": 0.2, "eager": True,
                               "row_gb_s": 20, "block_us": 400, "compiled_score_ns": 30})
    assert fast.compiles and "one-row reads 20 GB/s" in fast.describe()
    with pytest.raises(RoutedError, match="missing field"):
        hardware_from_dict({"memory_gb": 1})
    with pytest.raises(RoutedError, match="unknown field"):
        hardware_from_dict({"memory_gb": 1, "memory_bandwidth_gb_s": 1, "bf16_tflops": 1, "hbm": 3})


def test_local_hardware_is_probed_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import routed.planner.hardware as hardware

    calls: list[int] = []

    def fake_probe() -> Hardware:
        calls.append(1)
        return Hardware("local (fake)", 16, 20.0, 0.2, devices_per_node=1, overlap_memory_compute=False)

    monkeypatch.setattr(hardware, "probe_local", fake_probe)
    cache = tmp_path / "local_hardware.json"
    first, second = local_hardware(cache), local_hardware(cache)
    assert len(calls) == 1 and first == second and not second.overlap_memory_compute
    local_hardware(cache, threads=1)
    local_hardware(cache, threads=1)
    assert len(calls) == 2  # one probe per thread count
    raw = json.loads(cache.read_text())
    raw["entries"]["1"]["fingerprint"]["torch"] = "0.0"  # another torch: measure again
    cache.write_text(json.dumps(raw))
    local_hardware(cache, threads=1)
    assert len(calls) == 3


def test_local_probe_measures_positive_figures() -> None:
    from routed.planner.hardware import probe_local

    hw = probe_local(copy_mib=8, matmul_n=256, repeats=2, compiled=False)
    assert hw.memory_bandwidth_gb_s > 0 and hw.bf16_tflops > 0 and hw.memory_gb > 0
    assert hw.score_ns and hw.logit_ns and not hw.compiles


def test_compiled_decode_probe_measures_the_engines_kernels() -> None:
    """The child process compiles routed's GEMV and a decoder block (a few seconds with inductor's cache)."""
    import torch

    from routed.planner.hardware import probe_compiled

    fast, why = probe_compiled(threads=1, repeats=1, row_mib=8)
    assert fast is not None, why
    assert fast["row_gb_s"] > 0.5 and 0 < fast["block_us"] < 50_000 and 0 < fast["compiled_score_ns"] < 1_000
    assert torch.get_num_threads() >= 1  # the caller's threads and compiled graphs are untouched (a child ran it)


# ---- the command -----------------------------------------------------------------------------------------
def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_plan_json_parses(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--preset", "deepseek-v3", "--hardware", "h800", "--gpus", "144", "--ep", "144", "--context", "4989",
            "--batch", "128", "--json"]
    assert _run(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["memory"]["kv_bytes_per_token"] == 70_272
    assert out["weights"]["format"] == "fp8"
    assert out["parallelism"] == {"gpus": 144, "tp": 1, "ep": 144, "dp": 144, "nodes": 18}
    assert out["decode"]["bound"] == "interconnect"
    assert out["cost"]["usd_per_million_output_tokens"] == pytest.approx(
        2.0 / (out["decode"]["tokens_per_second_per_device"] * 3600) * 1e6)
    assert out["efficiency"]["memory"] == Efficiency().memory


def test_plan_errors_are_routed_errors(tmp_path: Path) -> None:
    with pytest.raises(RoutedError, match="unknown model preset 'deepseek-v9'"):
        _run(["--preset", "deepseek-v9", "--hardware", "h800"])
    with pytest.raises(RoutedError, match="unknown hardware"):
        _run(["--preset", "small", "--hardware", "h900"])
    with pytest.raises(RoutedError, match="weights need"):
        _run(["--preset", "deepseek-v3", "--hardware", "h100"])
    with pytest.raises(RoutedError, match="sequences fit beside the weights"):
        _run(["--preset", "deepseek-v3", "--hardware", "h800", "--gpus", "144", "--context", "4989", "--batch", "500"])
    with pytest.raises(RoutedError, match="does not divide"):
        _run(["--preset", "deepseek-v3", "--hardware", "h800", "--gpus", "16", "--tp", "3"])
    with pytest.raises(RoutedError, match="max_position_embeddings"):
        _run(["--preset", "moonlight", "--hardware", "h100", "--context", "9000"])


def test_plan_with_calibration_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    truth = Efficiency(memory=0.4, compute=0.25, op_s=2e-5)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(_synthetic_bench(PRESETS["small"], SYNTHETIC_HW, truth)))
    hw_file = tmp_path / "synthetic.json"
    hw_file.write_text(json.dumps({"name": "synthetic", "memory_gb": 64, "memory_bandwidth_gb_s": 40.0,
                                   "bf16_tflops": 0.5, "devices_per_node": 1, "overlap_memory_compute": False}))
    png = tmp_path / "plan.png"
    argv = ["--preset", "small", "--hardware", str(hw_file), "--context", "1024", "--calibrate", str(bench),
            "--price-per-hour", "0.5", "--plot", str(png), "--json"]
    assert _run(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["efficiency"]["memory"] == pytest.approx(0.4, rel=1e-3)
    assert out["calibration"]["overhead_fitted"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _run(argv[:-1]) == 0  # the rich tables render too
    assert "Calibration" in capsys.readouterr().out


def test_every_model_preset_parses_and_plans() -> None:
    for name in MODEL_PRESETS:
        cfg = preset_config(name)
        assert math.isfinite(step_time(step_work(cfg, "bf16", Parallelism(), "decode", 1, 128),
                                       HARDWARE_PRESETS["b200"], Efficiency()).step_s)
