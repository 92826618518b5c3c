"""Expert parallelism on this machine: --ep 1 against --ep 2 (contiguous and EPLB placements), same script.

For each configuration: prefill a text (a skewed workload: one Python source file), then greedy decode at
batch 1 and batch B; report tokens/s (median of repeats) and the (token, expert) pairs each rank computed,
measured by the engine's dispatch counters, against the load EPLB predicted from a recording.

    python benchmarks/ep_scaling.py --model checkpoints/small --text /usr/lib/python3.11/argparse.py \
        --recording docs/eplb_small_argparse.safetensors --tokens 1024 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.parallel.ep import model_eps
from routed.parallel.eplb import balanced_placement, contiguous_placement, imbalance
from routed.progress import progress_bar
from routed.sampling import SamplingParams
from routed.telemetry import Recording
from routed.tokenizer import Tokenizer


def run_config(model: str, dtype: str, ids: list[int], ep: int, placement: str | None, threads: int,
               batch: int, gen: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    config = EngineConfig(ep=ep, placement=placement, max_num_seqs=batch, max_num_batched_tokens=512,
                          kv_cache_gb=0.5, enable_prefix_caching=False)
    start = time.perf_counter()
    engine = LLMEngine.from_pretrained(model, dtype, config, progress=False)
    load_s = time.perf_counter() - start
    try:
        engine.reset_routing()
        prefill, decode1, decodeB = [], [], []
        greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        for _ in range(repeats):
            engine.add_request(ids, greedy)
            start = time.perf_counter()
            while engine.has_unfinished():
                engine.step()
            prefill.append(len(ids) / (time.perf_counter() - start))
        per_layer = [ep_.rank_tokens().double() for ep_ in model_eps(engine.model)]  # [ranks] per MoE layer
        pairs_prefill = [r["expert_pairs"] for r in engine.ranks()] if ep > 1 else None
        for b, rates in ((1, decode1), (batch, decodeB)):
            for _ in range(repeats):
                for i in range(b):
                    engine.add_request(ids[i * 16 : i * 16 + 16], SamplingParams(max_tokens=gen, temperature=0,
                                                                                ignore_eos=True))
                engine.step()  # the prompts
                start, steps = time.perf_counter(), 0
                while engine.has_unfinished():
                    engine.step()
                    steps += 1
                rates.append(b * steps / (time.perf_counter() - start))
    finally:
        engine.close()
    out = {"ep": ep, "placement": placement and Path(placement).name, "threads_per_rank": threads,
           "load_s": load_s, "prefill_tok_s": statistics.median(prefill), "decode_b1_tok_s": statistics.median(decode1),
           f"decode_b{batch}_tok_s": statistics.median(decodeB),
           "spread": {"prefill": max(prefill) - min(prefill), "decode_b1": max(decode1) - min(decode1)}}
    if pairs_prefill is not None:
        out["prefill_pairs_per_rank"] = pairs_prefill
        out["prefill_max_over_mean_mean_over_layers"] = statistics.mean(
            float(t.max() / t.mean()) for t in per_layer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--recording", required=True, help="routing recording of the model on similar text")
    ap.add_argument("--tokens", type=int, default=1024, help="prompt tokens for the prefill figure")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gen", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    ids = Tokenizer.from_pretrained(args.model).encode(Path(args.text).read_text())[: args.tokens]
    rec = Recording.load(args.recording)
    load_LE = rec.counts_TLE.sum(0).double()
    cores = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp())
    balanced = balanced_placement(load_LE, 2, layers=rec.layers)
    contiguous = contiguous_placement(load_LE.shape[1], load_LE.shape[0], 2, layers=rec.layers)
    balanced.save(tmp / "balanced.json")
    predicted = {name: float(imbalance(p.rank_loads(load_LE)).mean())
                 for name, p in (("contiguous", contiguous), ("balanced", balanced))}
    configs = [(1, None, cores), (2, None, max(1, cores // 2)), (2, str(tmp / "balanced.json"), max(1, cores // 2))]
    results = []
    with progress_bar("ep configurations", total=len(configs)) as advance:
        for ep, placement, threads in configs:
            results.append(run_config(args.model, args.dtype, ids, ep, placement, threads, args.batch, args.gen,
                                      args.repeats))
            advance()
    base = results[0]
    for r in results:
        r["prefill_vs_ep1"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        r["decode_b1_vs_ep1"] = r["decode_b1_tok_s"] / base["decode_b1_tok_s"]
    report = {"model": args.model, "dtype": args.dtype, "text": args.text, "prompt_tokens": len(ids),
              "cores": cores, "predicted_max_over_mean_mean_over_layers": predicted, "runs": results}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
