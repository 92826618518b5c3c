"""`routed bench`: load time, peak RSS, prefill and decode throughput, bytes per token against bandwidth.

Each figure is the median of `repeats` runs with its spread (max − min), after untimed warm-up runs (one short
decode, and PREFILL_WARMUP prefills at the timed length). Decode at batch B runs B requests with short random
prompts through the engine and times the steps after every request has its first token. The bandwidth floor
is `weight bytes read per decode step / measured copy bandwidth`; the fraction reached is measured decode
steps/s over that floor. After each figure's timed repeats, one more untimed run with forward hooks on the
routed experts records `experts_touched`: the distinct experts one MoE layer ran per step, averaged over layers
and steps (a random checkpoint's router is far from uniform; `routed plan --calibrate` reads it).
`--compare-transformers` times transformers' DeepseekV3ForCausalLM on the same checkpoint in the same process.
The JSON is the input of `routed plan --calibrate`; its `engine` says which engine ran: routed's version and
git commit (when run from a checkout; `+dirty` with uncommitted changes), and whether the compiled one-row
GEMV (`gemv`) and the compiled one-token decode (`compiled_decode`: decode at batch 1 ran compiled blocks)
were in use, and the model's attention impl (`attention`: "auto", the engine's per-sequence choice of the naive
or absorbed form), and whether the CPU multiplies bf16 natively (`native_bf16_products`: else products of many
rows run in fp32, `gemv.product_dtype`) — the planner models those steps differently.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from routed.config import EngineConfig, ModelConfig
from routed.engine.engine import LLMEngine
from routed.errors import RoutedError
from routed.loader import load_model
from routed.model.deepseek_v3 import Transformer
from routed.model.experts import RoutedExperts
from routed.parallel.ep import LoadSpec, launch
from routed.progress import progress_bar
from routed.quant.linear import model_bytes, own_bytes
from routed.sampling import SamplingParams
from routed.tokenizer import Tokenizer


# Prefills run before the timed ones. oneDNN builds a kernel for every new GEMM shape (0.6-1.5 ms each on
# one thread, measured), and each prefill hands the routed experts new token counts, so the first prefills at a
# length run up to 2.5x slower than the steady state a serving engine reaches; ten bring tiny and the demo model
# within ~10% of it (20 consecutive 256-token prefills: 53 ms falling to 19-21 ms on tiny, 66 to 29-33 on demo).
PREFILL_WARMUP = 10


def engine_info(model: torch.nn.Module) -> dict[str, Any]:
    """Which engine a bench ran: version, commit, and the compiled paths in use (see the module docstring)."""
    import routed
    from routed.model import gemv

    return {"version": routed.__version__, "commit": _commit(), "gemv": gemv._state["kernel"] is not None,
            # the one-token step without eager's per-op overhead: compiled, or routed's native layers (which of the two)
            "compiled_decode": (getattr(model, "_one_token_plan", None) is not None
                                or getattr(model, "_native", None) is not None),
            "native_decode": getattr(model, "_native", None) is not None,
            "attention": getattr(model, "attn_impl", None),
            "native_bf16_products": gemv.native_half_products(torch.bfloat16)}


def _commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _median(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "spread": max(xs) - min(xs), "runs": [round(x, 3) for x in xs]}


def _rss_bytes() -> int | None:
    """This process's resident memory now (Linux: /proc/self/statm); None elsewhere."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def runtime_rss_bytes() -> int | None:
    """Resident memory of Python, PyTorch with its compiler, and routed before any weight (~0.36 GB here): a fixed
    cost. The compiler's code (inductor, dynamo, sympy: ~0.12 GB of modules, which the loader's compile imports) is
    imported first, so that it counts as runtime, as the rest of PyTorch does, not against the weights."""
    import torch._inductor.compile_fx  # noqa: F401

    return _rss_bytes()


def memory_bandwidth_gbs(mb: int = 64, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of this machine, best of `repeats`. Two `mb` buffers,
    4x this machine's 32 MB L3 at the default: 256 MB ones read the same (29.7-32.0 against 29.6-30.8 GB/s,
    three alternating runs) but raised a small model's peak RSS by half a GB."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def bytes_per_decode_step(model: Transformer, batch: int) -> int:
    """Weight bytes one decode step of `batch` tokens reads: all weights but the embedding table (one row per
    token) and the routed experts (the expected fraction touched, 1 − (1 − k/E)^batch)."""
    cfg = model.config
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.n_routed_experts) ** batch if cfg.n_routed_experts else 0
    total = 0.0
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        if isinstance(module, RoutedExperts):
            total += touched * own_bytes(module)
        elif isinstance(module, torch.nn.Embedding):
            total += batch * own_bytes(module) / module.num_embeddings
        else:
            total += own_bytes(module)
    return int(total)


class ExpertsTouched:
    """Distinct routed experts each MoE layer ran per forward call, keyed by the call's token count (hooks).
    One-token steps run eager meanwhile (the same routing; a Python hook would split the compiled step)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.by_tokens: dict[int, list[int]] = {}
        self.handles: list[Any] = []
        self.plan = self.native = None

    def __enter__(self) -> "ExpertsTouched":
        self.plan = getattr(self.model, "_one_token_plan", None)
        self.native = getattr(self.model, "_native", None)
        self.model._one_token_plan = self.model._native = None

        def hook(_module: Any, inputs: Any, output: Any) -> None:
            self.by_tokens.setdefault(inputs[0].shape[0], []).append(int((output[1] > 0).sum()))

        self.handles = [m.register_forward_hook(hook) for m in self.model.modules() if isinstance(m, RoutedExperts)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.model._one_token_plan, self.model._native = self.plan, self.native

    def mean(self, tokens: int) -> float | None:
        """Mean over the calls that saw `tokens` tokens (a decode step of `tokens` sequences, or a prefill)."""
        seen = self.by_tokens.get(tokens)
        return round(sum(seen) / len(seen), 3) if seen else None


def _prefill(engine: LLMEngine, prompt_len: int, rng: random.Random) -> float:
    ids = [rng.randrange(1000, engine.model.config.vocab_size - 1) for _ in range(prompt_len)]
    engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return prompt_len / (time.perf_counter() - start)


def _decode(engine: LLMEngine, batch: int, gen_len: int, rng: random.Random, prompt_len: int = 16) -> float:
    vocab = engine.model.config.vocab_size
    for _ in range(batch):
        engine.add_request([rng.randrange(1000, vocab - 1) for _ in range(prompt_len)],
                           SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True))
    while any(r.num_computed < len(r.prompt_ids) for r in engine.requests.values()):
        engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return batch * steps / (time.perf_counter() - start)


def bench(path: str | Path, prompt_len: int = 512, gen_len: int = 128, batches: tuple[int, ...] = (1, 8, 16),
          quant: str | None = None, dtype: str = "bf16", repeats: int = 3, price_per_hour: float = 0.10,
          compare_transformers: bool = False, progress: bool = True, max_ram_gb: float | None = None,
          ep: int = 1, placement: str | None = None, ep_timeout_s: float = 120.0) -> dict[str, Any]:
    bandwidth = memory_bandwidth_gbs()  # before the load: its buffers, freed since, never add to the weights' peak
    ModelConfig.from_pretrained(path)  # a wrong folder: the checkpoint's error, before the tokenizer's
    before_tokenizer = runtime_rss_bytes()
    # the tokenizer is a fixed cost of serving, whatever the weights (a 129280-token BPE: ~75 MB resident): runtime
    tok = Tokenizer.from_pretrained(path)
    runtime_rss = _rss_bytes()
    tokenizer_rss = None if runtime_rss is None or before_tokenizer is None else runtime_rss - before_tokenizer
    start = time.perf_counter()
    if ep > 1:  # expert parallelism: ranks 1.. on this machine share the cores with rank 0
        if max_ram_gb:
            raise RoutedError("expert parallelism and --max-ram (expert offload) do not combine; pick one")
        spec = LoadSpec(str(path), dtype, False, quant, placement, threads=max(1, torch.get_num_threads() // ep))
        model = launch(spec, ep, ep_timeout_s, progress=progress)
    else:
        model = load_model(path, dtype, progress=progress, quant=quant, max_ram_gb=max_ram_gb, routing_telemetry=False)
    load_s = time.perf_counter() - start
    weight_bytes = model_bytes(model)
    config = EngineConfig(max_num_seqs=max(batches), max_num_batched_tokens=max(prompt_len, max(batches)),
                          kv_cache_gb=0.5, enable_prefix_caching=False, routing_telemetry=False)
    engine = LLMEngine(model, tok, config)
    rng = random.Random(0)
    runs: list[dict[str, Any]] = []
    with progress_bar("benchmark", total=repeats * (1 + len(batches)), enabled=progress) as advance:
        _decode(engine, 1, 4, rng)  # warm-up
        for _ in range(PREFILL_WARMUP):  # untimed: see PREFILL_WARMUP
            _prefill(engine, prompt_len, rng)
        prefill = []
        for _ in range(repeats):
            prefill.append(_prefill(engine, prompt_len, rng))
            advance()
        with ExpertsTouched(model) as touched:
            _prefill(engine, prompt_len, rng)
        runs.append({"kind": "prefill", "batch": 1, "prompt_len": prompt_len, "tokens_per_second":
                     statistics.median(prefill), **_median(prefill), "experts_touched": touched.mean(prompt_len)})
        for b in batches:
            rates = []
            store = getattr(model, "expert_store", None)
            before = (store.stats.hits, store.stats.misses, store.stats.bytes_read) if store else None
            for _ in range(repeats):
                rates.append(_decode(engine, b, gen_len, rng))
                advance()
            offload = {}
            if store is not None:  # per decoded token, over this batch size's runs
                hits, misses, read = (a - b0 for a, b0 in zip(
                    (store.stats.hits, store.stats.misses, store.stats.bytes_read), before))
                tokens = repeats * b * gen_len
                offload = {"offload_hit_rate": hits / max(hits + misses, 1),
                           "offload_bytes_read_per_token": read / tokens}
            with ExpertsTouched(model) as touched:  # untimed: decode steps are the calls with b tokens
                _decode(engine, b, min(gen_len, 16), rng)
            step_bytes = bytes_per_decode_step(model, b)
            floor = bandwidth * 1e9 / step_bytes * b  # tokens/s if every step only streamed its weights
            runs.append({"kind": "decode", "batch": b, "context": 16 + gen_len // 2,
                         "tokens_per_second": statistics.median(rates), **_median(rates),
                         "weight_bytes_per_step": step_bytes, "bandwidth_floor_tok_s": floor,
                         "fraction_of_floor": statistics.median(rates) / floor,
                         "experts_touched": touched.mean(b), **offload})
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out: dict[str, Any] = {
        "model": {"path": str(path), "config": json.loads((Path(path) / "config.json").read_text())},
        "dtype": dtype, "quant": quant, "max_ram_gb": max_ram_gb, "threads": torch.get_num_threads(),
        "engine": engine_info(model), "load_seconds": load_s,
        "weight_bytes": weight_bytes, "peak_rss_bytes": peak_rss, "runtime_rss_bytes": runtime_rss,
        "tokenizer_rss_bytes": tokenizer_rss,
        "memory_bandwidth_gbs": bandwidth,
        "kv_cache_bytes": engine.runner.cache.numel() * engine.runner.cache.element_size(),
        "runs": runs,
    }
    if (ranks := engine.ranks()) is not None:  # (token, expert) pairs each rank computed over the whole bench
        pairs = [r["expert_pairs"] for r in ranks]
        out["ep"] = {"ranks": len(ranks), "placement": placement, "expert_pairs_per_rank": pairs,
                     "max_over_mean": max(pairs) * len(pairs) / max(sum(pairs), 1)}
        engine.close()
    best_decode = max(r["tokens_per_second"] for r in runs if r["kind"] == "decode")
    out["cost"] = {"price_per_hour": price_per_hour,
                   "usd_per_mtok_input": price_per_hour / 3600 / runs[0]["tokens_per_second"] * 1e6,
                   "usd_per_mtok_output": price_per_hour / 3600 / best_decode * 1e6}
    if compare_transformers:
        del engine, model
        try:
            out["transformers"] = bench_transformers(path, prompt_len, min(gen_len, 32), repeats, dtype)
        except Exception as e:  # noqa: BLE001 — transformers' own limits (an FP8 checkpoint needs accelerate...):
            out["transformers_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"  # keep routed's figures
            return out
        ours = {"prefill": runs[0]["tokens_per_second"],
                "decode_b1": next(r["tokens_per_second"] for r in runs if r["kind"] == "decode" and r["batch"] == 1)}
        out["ratio_vs_transformers"] = {k: ours[k] / out["transformers"][k] for k in ours if k in out["transformers"]}
    return out


def bench_transformers(path: str | Path, prompt_len: int, gen_len: int, repeats: int, dtype: str) -> dict[str, float]:
    """transformers on the same checkpoint: prefill of prompt_len and greedy decode at batch 1."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prefill, decode = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            ids = torch.randint(1000, vocab - 1, (1, prompt_len), generator=g)
            start = time.perf_counter()
            model(ids, logits_to_keep=1)  # the last position's logits, as generate() and routed compute them
            prefill.append(prompt_len / (time.perf_counter() - start))
            ids = torch.randint(1000, vocab - 1, (1, 16), generator=g)
            model.generate(ids, max_new_tokens=1, do_sample=False)  # prefill alone, subtracted below
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
            decode.append((gen_len - 1) / (time.perf_counter() - start - first))
    return {"prefill": statistics.median(prefill), "decode_b1": statistics.median(decode),
            "prefill_spread": max(prefill) - min(prefill), "decode_spread": max(decode) - min(decode)}
