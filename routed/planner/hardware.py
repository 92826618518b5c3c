"""Hardware for the planner: presets with a source for every figure, this machine probed, or a user's JSON file.

`get_hardware(spec)` accepts a preset name (`h800`, `h100`, `h200`, `a100`, `b200`), `local`, or the path of a
JSON file holding one object with these fields (units per device; bandwidths one direction):

    {"name": "my-box", "memory_gb": 80, "memory_bandwidth_gb_s": 3350, "bf16_tflops": 989.4,
     "fp8_tflops": 1978.9,            # optional; null: no fp8 tensor cores (fp8 weights run at the bf16 rate)
     "nvlink_gb_s": 450,              # optional, default 0: device-to-device inside a node
     "network_gb_s": 50,              # optional, default 0: per-device network (InfiniBand/RoCE/EFA) across nodes
     "devices_per_node": 8,           # optional, default 8
     "price_per_hour": 2.5,           # optional: USD per device-hour
     "price_source": "...", "sources": {"compute": "...", ...},   # optional: where the figures come from
     "overlap_memory_compute": true,  # optional, default true: step terms combine as max (GPU), else add (CPU)
     "eager": false, "score_ns": null, "logit_ns": null,  # optional: routed's eager CPU engine runs here
     "naive_score_ns": null,          # optional: ... and its naive-form (prefill) attention's cost per score
     "row_gb_s": null, "block_us": null, "compiled_score_ns": null}  # optional: its compiled one-token decode

`local` (combining memory and compute time by addition, and running routed's eager engine, see roofline.py) is
measured on first use, at torch's current thread count (or the thread count of the bench files being
calibrated on), in this order:

1. three probes of routed's own eager code, first, while the allocator is fresh (after the large copy below has
   been freed, glibc serves the attention's fp32 score tensors from memory it already holds and the probe read
   ~6.5 ns per score where the engine spends ~11.5): its absorbed attention over a causal prefix of 128-384
   tokens (ns per score element); then its naive form as a prefill runs it (keys expanded beforehand, queries in
   causal chunks, routed.model.attention.attend_expanded) at the same widths and lengths (ns per score element
   of the chunks; after the absorbed probe, as in the engine, whose earlier and larger tensors have raised
   glibc's mmap threshold: run first in a fresh process it read 8-10 ns per score where `routed bench`'s own
   prefills spend 4.7-5.6, measured inside them; after the absorbed probe 4.8-4.9); and the fp32 cast and
   argmax over 16 rows of a 129,280-entry vocabulary (ns per logit);
2. a memory-bandwidth probe (copy of a 256 MiB tensor: bytes read + written over the time) and a bf16 matmul
   probe (2048³);
3. in a child process (so that its compiled graphs stay out of the caller's), routed's compiled decode path
   (roofline.py, "compiled one-token steps"): the one-row read rate `row_gb_s` — routed.model.gemv's compiled
   multiply-sum over 256 MiB of distinct 4096 x 1024 bf16 matrices, far more than the L3 cache (32 MB here),
   so every byte comes from memory — and, from `Transformer.compile_decode` on an in-memory model of the
   `tiny` preset's widths with the score probe's attention widths (4 layers, 1 dense + 3 MoE, 1,024-token
   vocabulary: 5.5 MB of weights, held in cache, so a block call costs what a block costs beyond reading its
   weights), every one-token step timed (per block: over the layers) at contexts 16-47, as `routed bench`
   decodes, and at contexts 4,112-4,143: the cost per attention score (`compiled_score_ns`, from the difference
   of the two medians) and the fixed cost per block (`block_us`, the rest: the block's share of the step's
   compiled calls). Where nothing can be compiled (no C compiler) these stay null, as the engine then stays
   eager.

Cached per thread count in `~/.cache/routed/local_hardware.json`; an entry is re-measured when the CPU, the
torch version or the probe differ (delete the file to re-measure after a change the fingerprint cannot see).
Dense TFLOPs are without 2:4 sparsity. GB = 1e9 bytes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from routed.errors import RoutedError

_HOPPER = ("https://glennklockwood.com/garden/processors/h100 (GH100 theoretical peaks: bf16 989.4, "
           "fp8 1978.9 TFLOPS dense)")
_PRICES_2026 = ("https://www.mercatus-ai.com/blog/cloud-gpu-pricing (May 2026, specialty-cloud on-demand range; "
                "midpoint)")
_DEEPEP = "https://github.com/deepseek-ai/DeepEP README: CX7 InfiniBand 400 Gb/s per GPU, ~50 GB/s"


@dataclass(slots=True, frozen=True)
class Hardware:
    name: str
    memory_gb: float  # per device
    memory_bandwidth_gb_s: float
    bf16_tflops: float  # dense
    fp8_tflops: float | None = None  # dense; None: no fp8 units
    nvlink_gb_s: float = 0.0  # per device, one direction, inside a node
    network_gb_s: float = 0.0  # per device, one direction, across nodes
    devices_per_node: int = 8
    price_per_hour: float | None = None  # USD per device-hour
    price_source: str = ""
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    # True: a kernel's memory traffic and arithmetic overlap (GPU roofline: max); False: they add (CPU)
    overlap_memory_compute: bool = True
    eager: bool = False  # plans run routed's eager engine (roofline.py: op overhead, activations, scores, logits)
    score_ns: float | None = None  # eager: ns per attention score (both einsums over the keys, masked softmax)
    naive_score_ns: float | None = None  # eager: ns per score of the naive form's causal query chunks (prefill)
    logit_ns: float | None = None  # eager: ns per logit element (fp32 cast and argmax)
    row_gb_s: float | None = None  # compiled one-row products (routed.model.gemv): weight GB/s; None: no compiler
    block_us: float | None = None  # compiled one-token step: µs per decoder block beyond its weight reads
    compiled_score_ns: float | None = None  # ... and ns per attention score in it

    def describe(self) -> str:
        fp8 = f", fp8 {self.fp8_tflops:g}" if self.fp8_tflops else ""
        links = f", NVLink {self.nvlink_gb_s:g} GB/s, network {self.network_gb_s:g} GB/s" if self.nvlink_gb_s else ""
        eager = (f", {self.score_ns:.3g} ns/score, {self.logit_ns:.3g} ns/logit"
                 if self.score_ns is not None and self.logit_ns is not None else "")
        if self.naive_score_ns is not None:
            eager += f", naive form {self.naive_score_ns:.3g} ns/score"
        if self.compiles:
            eager += (f", compiled decode: one-row reads {self.row_gb_s:g} GB/s, {self.block_us:.3g} µs/block, "
                      f"{self.compiled_score_ns:.3g} ns/score")
        return (f"{self.name}: {self.memory_gb:g} GB, {self.memory_bandwidth_gb_s:g} GB/s, bf16 {self.bf16_tflops:g}"
                f"{fp8} TFLOPS{links}{eager}")

    @property
    def compiles(self) -> bool:
        """routed's compiled one-token decode was probed here (so the engine can compile on this machine)."""
        return all(getattr(self, k) is not None for k in COMPILED_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


HARDWARE_PRESETS: dict[str, Hardware] = {
    "h800": Hardware(
        "H800 SXM5", 80, 3350, 989.4, 1978.9, nvlink_gb_s=200, network_gb_s=50, price_per_hour=2.0,
        price_source="DeepSeek's own assumption: V3 tech report Table 1 and the open-infra-index day-6 cost "
                     "accounting ($2 per H800 GPU-hour)",
        sources={"memory, compute": "same GH100 silicon and HBM3 as the H100 SXM5 (cut on NVLink and FP64 only: "
                                    "https://aiwiki.ai/wiki/nvidia_h800); " + _HOPPER,
                 "nvlink": "400 GB/s bidirectional (export-control cut from 900); DeepSeek-V3 TR §3.2.2 measures "
                           "160 GB/s usable",
                 "network": _DEEPEP + "; DeepSeek-V3 TR §3.2.2 (IB 50 GB/s)"}),
    "h100": Hardware(
        "H100 SXM5", 80, 3350, 989.4, 1978.9, nvlink_gb_s=450, network_gb_s=50, price_per_hour=3.0,
        price_source=_PRICES_2026 + ": $2.50-3.50",
        sources={"memory, compute": _HOPPER + "; 80 GB HBM3 3.35 TB/s (NVIDIA H100 datasheet)",
                 "nvlink": "NVLink 4: 900 GB/s bidirectional per GPU (NVIDIA H100 datasheet)",
                 "network": "one ConnectX-7 400 Gb/s NIC per GPU (DGX H100)"}),
    "h200": Hardware(
        "H200 SXM", 141, 4800, 989.4, 1978.9, nvlink_gb_s=450, network_gb_s=50, price_per_hour=4.0,
        price_source=_PRICES_2026 + ": $3.50-4.50",
        sources={"memory, compute": "141 GB HBM3e at 4.8 TB/s, H100 compute (NVIDIA H200 datasheet; " + _HOPPER + ")",
                 "nvlink": "NVLink 4: 900 GB/s bidirectional per GPU",
                 "network": "one 400 Gb/s NIC per GPU (HGX H200 reference design)"}),
    "a100": Hardware(
        "A100 SXM4 80GB", 80, 2039, 312, None, nvlink_gb_s=300, network_gb_s=25, price_per_hour=1.3,
        price_source=_PRICES_2026 + ": $1.10-1.50",
        sources={"memory, compute": "NVIDIA A100 datasheet: 80 GB HBM2e, 2,039 GB/s, bf16 312 TFLOPS dense, no fp8",
                 "nvlink": "NVLink 3: 600 GB/s bidirectional per GPU",
                 "network": "one HDR 200 Gb/s NIC per GPU (DGX A100)"}),
    "b200": Hardware(
        "B200 (HGX)", 180, 8000, 2250, 4500, nvlink_gb_s=900, network_gb_s=50, price_per_hour=5.89,
        price_source="RunPod on-demand B200 rate as quoted by https://usagepricing.com/blueprint/billing-units/"
                     "gpu-hour-pricing (2026)",
        sources={"memory": "180 GB HBM3e usable per GPU (DGX B200: 1,440 GB per 8), 8 TB/s "
                           "(https://docs.vultr.com/inference-cookbook/cuda/getting-started/hardware-overview)",
                 "compute": "https://glennklockwood.com/garden/processors/B200 (HGX B200 at 1,000 W: bf16 2,250, "
                            "fp8 4,500 TFLOPS dense)",
                 "nvlink": "NVLink 5: 1.8 TB/s bidirectional per GPU",
                 "network": "one ConnectX-7 400 Gb/s NIC per GPU (DGX B200)"}),
}

COMPILED_FIELDS = ("row_gb_s", "block_us", "compiled_score_ns")  # routed's compiled decode (roofline.py)
_REQUIRED = ("memory_gb", "memory_bandwidth_gb_s", "bf16_tflops")
_OPTIONAL = ("fp8_tflops", "nvlink_gb_s", "network_gb_s", "devices_per_node", "price_per_hour", "price_source",
             "sources", "name", "overlap_memory_compute", "eager", "score_ns", "logit_ns", "naive_score_ns",
             *COMPILED_FIELDS)


def get_hardware(spec: str) -> Hardware:
    """A preset name, `local`, or a JSON file path -> Hardware; RoutedError says which were possible."""
    key = spec.lower()
    if key in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[key]
    if key == "local":
        return local_hardware()
    path = Path(spec)
    if path.suffix == ".json" or path.exists():
        return hardware_from_file(path)
    raise RoutedError(f"unknown hardware {spec!r}; choose from {', '.join(HARDWARE_PRESETS)}, local, "
                      "or the path of a JSON file describing your own (see `routed plan --help`)")


def hardware_from_file(path: Path) -> Hardware:
    if not path.is_file():
        raise RoutedError(f"{path}: no such hardware file")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RoutedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise RoutedError(f"{path}: expected one JSON object")
    return hardware_from_dict(raw, str(path))


def hardware_from_dict(raw: dict[str, Any], source: str = "<dict>") -> Hardware:
    missing = [k for k in _REQUIRED if k not in raw]
    unknown = [k for k in raw if k not in _REQUIRED + _OPTIONAL]
    if missing:
        raise RoutedError(f"{source}: missing field(s) {', '.join(missing)} (units: GB, GB/s, TFLOPS)")
    if unknown:
        raise RoutedError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(_REQUIRED + _OPTIONAL)}")
    for k in _REQUIRED + ("fp8_tflops", "nvlink_gb_s", "network_gb_s", "devices_per_node", "price_per_hour",
                          "score_ns", "logit_ns", "naive_score_ns", *COMPILED_FIELDS):
        v = raw.get(k)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
            raise RoutedError(f"{source}: field {k} is {v!r}; expected a non-negative number")
    for k in _REQUIRED:
        if raw[k] <= 0:
            raise RoutedError(f"{source}: field {k} must be positive")
    return Hardware(
        name=str(raw.get("name", Path(source).stem)), memory_gb=float(raw["memory_gb"]),
        memory_bandwidth_gb_s=float(raw["memory_bandwidth_gb_s"]), bf16_tflops=float(raw["bf16_tflops"]),
        fp8_tflops=float(raw["fp8_tflops"]) if raw.get("fp8_tflops") else None,
        nvlink_gb_s=float(raw.get("nvlink_gb_s", 0)), network_gb_s=float(raw.get("network_gb_s", 0)),
        devices_per_node=int(raw.get("devices_per_node", 8)) or 1,
        price_per_hour=float(raw["price_per_hour"]) if raw.get("price_per_hour") is not None else None,
        price_source=str(raw.get("price_source", "")), sources=dict(raw.get("sources") or {source: "user file"}),
        overlap_memory_compute=bool(raw.get("overlap_memory_compute", True)),
        eager=bool(raw.get("eager", False)),
        score_ns=float(raw["score_ns"]) if raw.get("score_ns") is not None else None,
        logit_ns=float(raw["logit_ns"]) if raw.get("logit_ns") is not None else None,
        naive_score_ns=float(raw["naive_score_ns"]) if raw.get("naive_score_ns") is not None else None,
        **{k: float(raw[k]) if raw.get(k) is not None else None for k in COMPILED_FIELDS},
    )


# ---- this machine --------------------------------------------------------------------------------------
PROBE_VERSION = 4  # 2: + score_ns, logit_ns (routed's eager engine); 3: eager probes first, + compiled decode;
# 4: + naive_score_ns (the naive-form prefill attention, after the absorbed probe)
def cache_path() -> Path:
    return Path.home() / ".cache" / "routed" / "local_hardware.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fingerprint(threads: int) -> dict[str, Any]:
    import torch

    return {"cpu": _cpu_name(), "threads": threads, "torch": torch.__version__, "probe": PROBE_VERSION}


def local_hardware(path: Path | None = None, remeasure: bool = False, threads: int | None = None) -> Hardware:
    """This machine at `threads` torch threads (default: the current count), from the cache when its
    fingerprint still matches, else probed (about a second). The cache keeps one entry per thread count."""
    import torch

    path = path or cache_path()
    threads = threads or torch.get_num_threads()
    fp = _fingerprint(threads)
    entries: dict[str, Any] = {}
    if path.is_file():
        try:
            entries = dict(json.loads(path.read_text()).get("entries", {}))
            cached = entries.get(str(threads))
            if cached and cached.get("fingerprint") == fp and not remeasure:
                return hardware_from_dict(cached["hardware"], str(path))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RoutedError):
            entries = {}  # a stale or damaged cache is simply measured again
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        hw = probe_local()
    finally:
        torch.set_num_threads(before)
    entries[str(threads)] = {"fingerprint": fp, "hardware": hw.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"entries": entries}, indent=2) + "\n")
    return hw


def _median_seconds(repeats: int) -> Any:
    def median_seconds(fn: Any) -> float:
        fn()  # warm-up: page faults, kernel selection
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return median_seconds


def probe_local(copy_mib: int = 256, matmul_n: int = 2048, repeats: int = 5, compiled: bool = True,
                row_mib: int = 256) -> Hardware:
    """This machine at torch's current thread count; see the module docstring for what is probed, in order.
    `compiled=False` skips the compiled-decode probes (a child process that compiles for a few seconds)."""
    import torch

    median_seconds = _median_seconds(repeats)
    score_ns, naive_score_ns, logit_ns = probe_eager(median_seconds)  # first: a fresh allocator (module docstring)
    src = torch.empty(copy_mib * 2**20 // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    copy_s = median_seconds(lambda: dst.copy_(src))
    bandwidth = 2 * src.numel() * 4 / copy_s / 1e9  # read + write
    del src, dst
    a = torch.randn(matmul_n, matmul_n).to(torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n).to(torch.bfloat16)
    mm_s = median_seconds(lambda: torch.matmul(a, b))
    tflops = 2 * matmul_n**3 / mm_s / 1e12
    del a, b
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    threads = torch.get_num_threads()
    sources = {"score_ns": f"measured first (fresh allocator): routed's absorbed attention, 8 heads over "
                           f"128/256/384 causal tokens, median of {repeats} each, median of the three",
               "naive_score_ns": f"measured second: routed's naive form (attend_expanded over causal chunks of "
                                 f"{_query_chunk()} queries, keys expanded beforehand), 8 heads over 128/256/384 "
                                 f"tokens, median of {repeats} each, median of the three",
               "logit_ns": f"measured: fp32 cast and argmax of 16 x 129,280 logits, median of {repeats}",
               "memory_bandwidth_gb_s": f"measured: torch copy of {copy_mib} MiB, median of {repeats}",
               "bf16_tflops": f"measured: bf16 matmul {matmul_n}x{matmul_n}x{matmul_n}, median of {repeats}",
               "memory_gb": "physical memory (sysconf)"}
    fast: dict[str, float | None] = dict.fromkeys(COMPILED_FIELDS)
    if compiled:
        fast, why = probe_compiled(threads, repeats, row_mib)
        sources["row_gb_s"] = (f"measured in a child process: routed.model.gemv's compiled multiply-sum over "
                               f"{row_mib} MiB of distinct 4096x1024 bf16 matrices, median of {repeats}" if fast
                               else f"not measured: {why}")
        sources["block_us, compiled_score_ns"] = (
            "measured in a child process: Transformer.compile_decode on an in-memory model of tiny's widths with "
            "the score probe's attention widths (1 dense + 3 MoE layers, weights in cache), every step timed per block "
            f"over one-token steps at contexts 16-47 and {16 + LONG_CONTEXT}-{47 + LONG_CONTEXT} (the second "
            "sweep over each), medians: per score from their difference, per block the rest"
            if fast else "not measured")
        fast = fast or dict.fromkeys(COMPILED_FIELDS)
    return Hardware(
        name=f"local ({_cpu_name()}, {threads} threads)", memory_gb=round(memory, 2),
        memory_bandwidth_gb_s=round(bandwidth, 2), bf16_tflops=round(tflops, 4), devices_per_node=1,
        overlap_memory_compute=False,  # CPU GEMMs at decode sizes take load time plus math time
        eager=True, score_ns=round(score_ns, 3), logit_ns=round(logit_ns, 3), naive_score_ns=round(naive_score_ns, 3),
        **{k: (round(v, 3) if v is not None else None) for k, v in fast.items()},
        sources=sources,
    )


COMPILED_PROBE_TIMEOUT_S = 600
# the compiled-decode probe's attention widths: the eager score probe's (probe_eager), on tiny's other widths
PROBE_ATTENTION = {"num_attention_heads": 8, "num_key_value_heads": 8, "kv_lora_rank": 128, "qk_nope_head_dim": 64,
                   "qk_rope_head_dim": 32, "v_head_dim": 64}
LONG_CONTEXT = 4096  # the second sweep's contexts are this much longer: the difference is the attention's


def probe_compiled(threads: int, repeats: int = 5, row_mib: int = 256
                   ) -> tuple[dict[str, float] | None, str]:
    """({row_gb_s, block_us, compiled_score_ns} of routed's compiled decode path, or None; why not) — measured in a
    child process at `threads` torch threads, so its compiled graphs and allocations stay out of this one."""
    import subprocess
    import sys

    code = (f"from routed.planner.hardware import _probe_compiled_here as p; "
            f"p({int(threads)}, {int(repeats)}, {int(row_mib)})")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                              timeout=COMPILED_PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"the compiled-decode probe took over {COMPILED_PROBE_TIMEOUT_S} s"
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return None, f"the compiled-decode probe failed ({tail})"
    result = json.loads(lines[-1])
    if result.get("error"):
        return None, str(result["error"])
    return {k: float(result[k]) for k in COMPILED_FIELDS}, ""


def _probe_compiled_here(threads: int, repeats: int, row_mib: int, layers: int = 4, steps: int = 32) -> None:
    """The child of probe_compiled: prints one JSON line.

    Block calls are timed over one-token steps at contexts 16-47, as `routed bench` decodes, on a second sweep
    over those lengths: the first call at a new context length costs ~1 ms more once per process (oneDNN builds
    a kernel for the attention's new shape, as in the eager engine), which the bench's medians of repeated
    runs over the same lengths do not see either."""
    import torch

    from routed.config import ModelConfig
    from routed.model import gemv
    from routed.model.attention import PagedBatch
    from routed.model.deepseek_v3 import Transformer
    from routed.presets import PRESETS

    torch.set_num_threads(threads)
    median_seconds = _median_seconds(repeats)
    bf16 = torch.bfloat16
    # one-row read rate: the engine's compiled GEMV kernel (the same function, compiled the same way)
    try:
        kernel = torch.compile(gemv._gemv, dynamic=True)
        rows, cols = 4096, 1024
        count = max(2, row_mib * 2**20 // (rows * cols * 2))
        weights = [torch.full((rows, cols), 0.01, dtype=bf16) for _ in range(count)]
        x = torch.full((cols,), 0.5, dtype=bf16)
        with torch.inference_mode():
            seconds = median_seconds(lambda: [kernel(x, w) for w in weights])
    except Exception as e:  # noqa: BLE001 — no compiler: the engine stays eager too
        print(json.dumps({"error": f"cannot compile ({str(e).splitlines()[0][:160]})"}))
        return
    row_gb_s = len(weights) * rows * cols * 2 / seconds / 1e9
    del weights
    # fixed cost of a compiled block: a model of tiny's widths (the eager score probe's attention widths) whose
    # weights sit in cache; and the cost per attention score from the same blocks at a ~1,000-token longer context
    raw = {**PRESETS["tiny"], "num_hidden_layers": layers, "vocab_size": 1024, "num_nextn_predict_layers": 0,
           **PROBE_ATTENTION}
    cfg = ModelConfig.from_dict(raw, source="compiled-decode probe")
    g = torch.Generator().manual_seed(0)
    model = Transformer(cfg, bf16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("mlp.gate.weight") else 0.02))
    model.eval()
    if not model.compile_decode():
        print(json.dumps({"error": "Transformer.compile_decode failed"}))
        return
    calls: list[float] = []  # per one-token step: its compiled calls' time over the layers (time per block)
    forward = model.forward_hidden

    def timed(*args: Any) -> Any:
        t0 = time.perf_counter()
        out = forward(*args)
        calls.append((time.perf_counter() - t0) / layers)
        return out

    model.forward_hidden = timed  # type: ignore[method-assign]
    short, long = 16, 16 + LONG_CONTEXT
    cache = model.new_cache(long + steps + 8)
    medians = {}
    with torch.inference_mode():
        for first in (short, long):
            for sweep in range(2):  # the first sweep meets each context length once (see above); the second is timed
                calls.clear()
                for step in range(steps):
                    ctx = first + step
                    batch = PagedBatch(cache, torch.tensor([ctx]), [(0, 1)], [torch.arange(ctx + 1)])
                    model.forward_hidden(torch.tensor([[7 + step]]), torch.tensor([[ctx]]), batch)
            medians[first] = statistics.median(calls)
    heads = cfg.num_attention_heads
    score_s = (medians[long] - medians[short]) / (heads * (long - short))
    keys = short + steps / 2  # the short sweep's median context (+1 for the new key)
    print(json.dumps({"row_gb_s": row_gb_s, "block_us": (medians[short] - score_s * heads * keys) * 1e6,
                      "compiled_score_ns": score_s * 1e9}))


def _query_chunk() -> int:
    from routed.model.attention import QUERY_CHUNK

    return QUERY_CHUNK


def probe_eager(median_seconds: Any, heads: int = 8, rows: int = 16, vocab: int = 129280
                ) -> tuple[float, float, float]:
    """(ns per absorbed attention score, ns per naive-form score, ns per logit element) of routed's own eager code.

    Absorbed scores: routed's absorbed attention (routed.model.attention.absorbed_attention: the scores einsum,
    fp32 cast and scale, mask, softmax, cast back and the einsum over the latent values) of one sequence over its
    own causal prefix, `heads` heads of a mid-sized shape (nope/rope/value 64/32/64, latent 128), at 128, 256
    and 384 tokens: the median of the three per-element times. Per score element it is nearly the same from
    tiny's shape to small's (7-16 ns, the spread of repeated measurements), because these batched matmuls over
    heads are far too narrow to reach the GEMM rate.
    Naive-form scores, second (module docstring): the same sequences as a prefill attends them in the naive form
    (routed.model.attention.paged_attention): keys and values expanded beforehand (expand_keys: a GEMM, which the
    planner counts as FLOPs), then attend_expanded per chunk of QUERY_CHUNK queries over the keys up to the
    chunk's last one, the output written into the step's buffer; per score element of the chunks (query x
    visible key x head), the median of the three lengths. On one thread here 4-7 ns in isolation from the demo
    model's widths to small's; inside `routed bench`'s 256-token prefills 5.3-5.6 (demo) and 4.7-5.4 (medium).
    Logits: fp32 cast and argmax of `rows` rows."""
    import torch

    from routed.model.attention import QUERY_CHUNK, absorbed_attention, attend_expanded, expand_keys

    per_score, per_naive = [], []
    bf16 = torch.bfloat16
    for tokens in (128, 256, 384):
        q_nope = torch.randn(1, tokens, heads, 64).to(bf16)
        q_pe = torch.randn(1, tokens, heads, 32).to(bf16)
        latent = torch.randn(1, tokens, 128 + 32).to(bf16)
        kv_b = torch.randn(heads, 64 + 64, 128).to(bf16)
        mask = (torch.arange(tokens).unsqueeze(0) <= torch.arange(tokens).unsqueeze(1)).unsqueeze(0)
        seconds = median_seconds(lambda: absorbed_attention(q_nope, q_pe, latent, mask, kv_b, 0.1))
        per_score.append(seconds / (heads * tokens * tokens) * 1e9)
    for tokens in (128, 256, 384):  # after the absorbed probe: see the module docstring
        q_nope = torch.randn(1, tokens, heads, 64).to(bf16)
        q_pe = torch.randn(1, tokens, heads, 32).to(bf16)
        latent = torch.randn(1, tokens, 128 + 32).to(bf16)
        kv_b = torch.randn(heads, 64 + 64, 128).to(bf16)
        mask_TS = torch.arange(tokens).unsqueeze(0) <= torch.arange(tokens).unsqueeze(1)
        k_BHSD, v_BHSV = expand_keys(latent, kv_b, 64)
        out = q_nope.new_empty(1, tokens, heads, 64)
        chunks = [(a, min(a + QUERY_CHUNK, tokens)) for a in range(0, tokens, QUERY_CHUNK)]

        def naive() -> None:
            for a, b in chunks:
                out[:, a:b] = attend_expanded(q_nope[:, a:b], q_pe[:, a:b], k_BHSD[:, :, :b], v_BHSV[:, :, :b],
                                              mask_TS[None, a:b, :b], 0.1, masked_from=a)

        seconds = median_seconds(naive)
        per_naive.append(seconds / (heads * sum((b - a) * b for a, b in chunks)) * 1e9)
    logits = torch.randn(rows, vocab).to(bf16)
    logit_s = median_seconds(lambda: [int(row.argmax()) for row in logits.float()])  # the runner, then sample_one
    return statistics.median(per_score), statistics.median(per_naive), logit_s / logits.numel() * 1e9
