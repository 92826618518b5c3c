"""The `routed` command line: generate, inspect, random-checkpoint.

Errors a user can cause (bad path, bad config, corrupt file, bad flag value) print one line on stderr and
exit with status 1; nothing here prints a traceback for them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from routed.argtypes import positive_int
from routed.errors import RoutedError


DEMO_MODEL = Path(__file__).parent / "demo_model"


def _model_or_demo(args: argparse.Namespace) -> None:
    """`--model` defaults to the demo model shipped inside the package."""
    if args.model is None:
        if not (DEMO_MODEL / "config.json").is_file():
            raise RoutedError("no --model given and the bundled demo model is missing from this install")
        args.model = str(DEMO_MODEL)


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def cmd_generate(args: argparse.Namespace) -> int:
    _model_or_demo(args)
    from routed.llm import LLM
    from routed.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or [],
    )
    t0 = time.perf_counter()
    from routed.config import EngineConfig

    llm = LLM(args.model, dtype=args.dtype, engine_config=EngineConfig(
        speculative=args.speculative, max_ram_gb=args.max_ram, quant=args.quant, **_ep_config(args)),
        progress=not args.json)
    load_seconds = time.perf_counter() - t0
    if args.chat:
        prompt_ids = [llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                        add_generation_prompt=True, tokenize=True)]
    else:
        prompt_ids = [llm.tokenizer.encode(args.prompt)]

    def stream(_row: int, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    stats = llm.generate_ids(prompt_ids, params, on_text=None if args.json else stream)
    out = stats.outputs[0]
    if args.json:
        print(json.dumps({
            "text": out.text,
            "token_ids": out.token_ids,
            "finish_reason": out.finish_reason,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "seconds": round(stats.seconds, 4),
            "tokens_per_second": round(stats.completion_tokens / stats.seconds, 3) if stats.seconds else None,
            "prefill_seconds": round(stats.prefill_seconds, 4),
            "decode_seconds": round(stats.decode_seconds, 4),
            "load_seconds": round(load_seconds, 3),
            **({"spec_acceptance_rate": round(llm.engine.stats().spec_acceptance_rate, 4)}
               if args.speculative else {}),
        }))
    else:
        sys.stdout.write("\n")
        rate = stats.completion_tokens / stats.seconds if stats.seconds else 0.0
        print(f"[{stats.prompt_tokens} prompt + {stats.completion_tokens} generated tokens in "
              f"{stats.seconds:.2f}s, {rate:.1f} tok/s, finish: {out.finish_reason}; load {load_seconds:.1f}s]",
              file=sys.stderr)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from routed.summary import inspect_checkpoint

    info = inspect_checkpoint(args.model)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    p, lay, ex = info["parameters"], info["layers"], info["experts"]
    console = Console()
    console.print(f"[bold]{info['path']}[/bold]  ({info['model_type']}{', FP8' if info['fp8'] else ''})")
    console.print(f"parameters: {_human(p['total'])} total, {_human(p['main_model'])} main model, "
                  f"{_human(p['mtp'])} MTP; active per token {_human(p['active_per_token'])} "
                  f"({_human(p['active_per_token_excl_embedding'])} without the input embedding)")
    console.print(f"layers: {lay['total']} ({lay['dense']} dense, {lay['moe']} MoE) + {lay['mtp_modules']} MTP")
    console.print(f"experts: {ex['routed']} routed ({ex['per_token']} per token, {ex['groups']} groups, "
                  f"{ex['groups_per_token']} kept), {ex['shared']} shared; {ex['scoring']} / {ex['topk_method']}, "
                  f"scaling {ex['routed_scaling_factor']}")
    console.print(f"latent cache: {info['latent_cache_bytes_per_token']:,} bytes per token (bf16)")
    console.print("bytes by dtype: " + ", ".join(f"{k} {_human(v, 'B')}" for k, v in info["bytes_by_dtype"].items()))
    table = Table("tensor group", "tensors", "params", "bytes", "dtypes", "loader")
    for g in info["groups"]:
        table.add_row(g["name"], str(g["tensors"]), _human(g["params"]), _human(g["bytes"], "B"),
                      ",".join(g["dtypes"]), g["action"])
    console.print(table)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _model_or_demo(args)
    import os

    from routed.config import EngineConfig
    from routed.server.serve import serve

    from routed.config import ModelConfig
    from routed.loader import scan_checkpoint
    from routed.tokenizer import Tokenizer

    # fail fast on what can be checked in a second; the weights themselves load in the background
    ModelConfig.from_pretrained(args.model)
    scan_checkpoint(args.model)
    Tokenizer.from_pretrained(args.model)
    engine_config = EngineConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_gb=args.kv_cache_gb, max_model_len=args.max_model_len, max_waiting=args.max_waiting,
        enable_prefix_caching=not args.no_prefix_caching, routing_window_tokens=args.routing_window,
        record_routing=args.record_routing, speculative=args.speculative, max_ram_gb=args.max_ram,
        quant=args.quant, **_ep_config(args),
    )
    serve(args.model, args.host, args.port, args.api_key or os.environ.get("ROUTED_API_KEY"), args.dtype,
          engine_config, args.served_model_name, args.max_body_bytes, args.drain_timeout, args.price_per_hour)
    return 0


def _read_text_tokens(path: str, model_path: str, max_tokens: int) -> list[int]:
    from routed.tokenizer import Tokenizer

    file = Path(path)
    if not file.is_file():
        raise RoutedError(f"{path}: no such text file")
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RoutedError(f"{path}: cannot read ({e})") from None
    ids = Tokenizer.from_pretrained(model_path).encode(text)[:max_tokens]
    if len(ids) < 2:
        raise RoutedError(f"{path}: the text has fewer than 2 tokens")
    return ids


def cmd_stats(args: argparse.Namespace) -> int:
    from routed.loader import load_model
    from routed.telemetry import Recording
    from routed.telemetry.report import record_text, write_report

    if bool(args.recording) == bool(args.model):
        raise RoutedError("give either --model with --text, or --recording")
    if args.recording:
        rec, total, title = Recording.load(args.recording), None, Path(args.recording).stem
    else:
        if not args.text:
            raise RoutedError("--model needs --text FILE to run over")
        ids = _read_text_tokens(args.text, args.model, args.max_tokens)
        model = load_model(args.model, args.dtype, progress=not args.json)
        rec, total = record_text(model, ids, args.chunk_tokens)
        title = f"{Path(args.model).name} on {Path(args.text).name}"
        if args.save_recording:
            rec.save(args.save_recording)
    paths = write_report(rec, Path(args.out), title, total)
    if args.json:
        print(json.dumps(paths))
    else:
        print(Path(paths["summary"]).read_text())
        print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return 0


def _as_stored(path: str) -> str | None:
    """`quant` that loads a checkpoint's own values: an FP8 one dequantized ("none", not the int8 it loads as by
    default), any other as it is."""
    from routed.config import ModelConfig

    return "none" if ModelConfig.from_pretrained(path).fp8 else None


def cmd_compare_routing(args: argparse.Namespace) -> int:
    from routed.loader import load_model
    from routed.telemetry.compare import compare_routing

    ids = _read_text_tokens(args.text, args.reference, args.max_tokens)
    result = compare_routing(load_model(args.model, args.dtype, progress=not args.json),  # as it would serve
                             load_model(args.reference, args.dtype, progress=not args.json,
                                        quant=_as_stored(args.reference)), ids, args.chunk_tokens)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("layer", "identical top-k set", "mean overlap")
    for layer, same, over in zip(result.layers, result.identical, result.overlap):
        table.add_row(str(layer), f"{same:.1%}", f"{over:.1%}")
    console = Console()
    console.print(table)
    console.print(f"{result.tokens} tokens; mean KL(reference || model) of next-token distributions: "
                  f"{result.kl:.5f} nats")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from routed.config import ModelConfig
    from routed.loader import load_model, require_empty_folder, write_checkpoint
    from routed.quant.intq import IntFormat
    from routed.quant.linear import quantize_model
    from routed.telemetry.compare import compare_routing

    fmt = IntFormat(8 if args.to == "int8" else 4, args.group_size)
    if (bits := ModelConfig.from_pretrained(args.model).int_quant) is not None:
        raise RoutedError(f"{args.model} is already quantized (int{bits[0]}); quantize the float checkpoint it came from")
    require_empty_folder(Path(args.out))  # before minutes of loading and quantizing, not after
    model = load_model(args.model, "bf16", progress=not args.json, quant=_as_stored(args.model))
    quantize_model(model, fmt)
    out = write_checkpoint(model, args.model, args.out, {"quantization_config": fmt.as_config(),
                                                         "torch_dtype": "bfloat16"})
    del model
    report: dict[str, Any] = {"out": str(out), "format": args.to, "group_size": args.group_size}
    if args.check_tokens:
        import json as _json

        sample = Path(_json.__file__).with_name("decoder.py").read_text()  # stdlib text: on every machine
        from routed.tokenizer import Tokenizer

        ids = Tokenizer.from_pretrained(args.model).encode(sample)[: args.check_tokens]
        result = compare_routing(load_model(out, progress=False),
                                 load_model(args.model, "bf16", progress=False, quant=_as_stored(args.model)), ids)
        report["quality"] = result.as_dict()
    if args.json:
        print(json.dumps(report))
    else:
        print(f"wrote {args.to} checkpoint to {out}")
        if "quality" in report:
            q = report["quality"]
            print(f"quality on {q['tokens']} tokens of stdlib json/decoder.py: mean KL vs bf16 {q['kl']:.5f} nats; "
                  "identical top-k expert sets per layer: "
                  + ", ".join(f"L{layer} {x:.1%}" for layer, x in zip(q["layers"], q["identical"])))
    return 0


def _peak_rss_text(result: dict) -> str:
    """'peak RSS 2.80 GB = 0.44 GB runtime (0.08 the tokenizer) + 1.12x the weights and cache': the runtime
    (Python, PyTorch with its compiler, routed and the checkpoint's tokenizer, before any weight) is a fixed cost
    that a small model's ratio would otherwise carry as if it grew with the weights."""
    peak, sized = result["peak_rss_bytes"], result["weight_bytes"] + result["kv_cache_bytes"]
    runtime = result.get("runtime_rss_bytes")
    if runtime is None:
        return f"peak RSS {peak / 1e9:.2f} GB ({peak / sized:.2f}x the weights and cache)"
    tokenizer = result.get("tokenizer_rss_bytes")
    of_it = "" if tokenizer is None else f" ({tokenizer / 1e9:.2f} the tokenizer)"
    return (f"peak RSS {peak / 1e9:.2f} GB = {runtime / 1e9:.2f} GB runtime{of_it} + {(peak - runtime) / sized:.2f}x "
            f"the weights and cache")


def cmd_bench(args: argparse.Namespace) -> int:
    _model_or_demo(args)
    from routed.bench import bench

    try:
        batches = tuple(sorted({int(b) for b in args.batch.split(",")}))
    except ValueError:
        raise RoutedError(f"--batch {args.batch!r}: expected comma-separated integers like 1,8,16") from None
    if not batches or min(batches) < 1:
        raise RoutedError("--batch sizes must be at least 1")
    result = bench(args.model, args.prompt_len, args.gen_len, batches, args.quant, args.dtype, args.repeats,
                   args.price_per_hour, args.compare_transformers, progress=not args.json, max_ram_gb=args.max_ram,
                   **_ep_config(args))
    failed = 1 if "transformers_error" in result else 0  # routed's figures still printed, then the error
    if args.json:
        print(json.dumps(result, indent=2))
        return failed
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{args.model}[/bold] {args.dtype}{' ' + args.quant if args.quant else ''}, "
                  f"{result['threads']} threads: load {result['load_seconds']:.1f} s, weights "
                  f"{result['weight_bytes'] / 1e9:.2f} GB + KV cache {result['kv_cache_bytes'] / 1e9:.2f} GB, "
                  f"{_peak_rss_text(result)}, copy bandwidth {result['memory_bandwidth_gbs']:.1f} GB/s")
    table = Table("run", "tok/s (median)", "spread", "weight MB / step", "bandwidth floor tok/s", "of floor")
    for r in result["runs"]:
        name = f"prefill {r['prompt_len']}" if r["kind"] == "prefill" else f"decode batch {r['batch']}"
        floor = r.get("bandwidth_floor_tok_s")
        if "offload_hit_rate" in r:
            name += f" (offload hits {r['offload_hit_rate']:.0%}, {r['offload_bytes_read_per_token'] / 1e6:.1f} MB/token)"
        table.add_row(name, f"{r['tokens_per_second']:.1f}", f"{r['spread']:.1f}",
                      f"{r['weight_bytes_per_step'] / 1e6:.0f}" if floor else "",
                      f"{floor:.1f}" if floor else "", f"{r['fraction_of_floor']:.0%}" if floor else "")
    console.print(table)
    cost = result["cost"]
    console.print(f"at ${cost['price_per_hour']:.2f}/hour: ${cost['usd_per_mtok_input']:.2f} per million input "
                  f"tokens, ${cost['usd_per_mtok_output']:.2f} per million output tokens")
    if "ep" in result:
        ep = result["ep"]
        console.print(f"expert parallelism: {ep['ranks']} ranks, (token, expert) pairs per rank "
                      f"{ep['expert_pairs_per_rank']}, max/mean {ep['max_over_mean']:.3f}")
    if "transformers" in result:
        hf, ratio = result["transformers"], result["ratio_vs_transformers"]
        console.print(f"transformers, same checkpoint: prefill {hf['prefill']:.1f} tok/s, decode batch 1 "
                      f"{hf['decode_b1']:.1f} tok/s -> routed is {ratio['prefill']:.2f}x (prefill) and "
                      f"{ratio['decode_b1']:.2f}x (decode)")
    if failed:
        print(f"routed: error: --compare-transformers: transformers could not run this checkpoint "
              f"({result['transformers_error']}); routed's figures are above", file=sys.stderr)
    return failed


def cmd_random_checkpoint(args: argparse.Namespace) -> int:
    from routed.presets import write_random_checkpoint

    out = write_random_checkpoint(args.preset, args.out, seed=args.seed, fp8_weights=args.fp8)
    print(f"wrote a random {args.preset} checkpoint to {out}", file=sys.stderr)
    return 0


def _ep_config(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields of --ep / --placement / --ep-timeout (torchrun sets the world size itself)."""
    from routed.parallel.ep import torchrun_env

    env = torchrun_env()
    ep = env[1] if env is not None and args.ep == 1 else args.ep
    if args.placement is not None and not Path(args.placement).is_file():
        raise RoutedError(f"--placement {args.placement}: no such file (write one with `routed eplb`)")
    return {"ep": ep, "placement": args.placement, "ep_timeout_s": args.ep_timeout}


def _add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: all cores; on a machine other jobs share, use fewer — a thread "
                        "that waits for a busy core stalls every step)")


def _add_quant_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                   help="weights at load: int8 / int4 quantize a float or FP8 checkpoint's weights as they are read "
                        "(a `routed quantize` checkpoint needs none); none keeps them in --dtype. Default: an FP8 "
                        "checkpoint becomes int8 (one byte per weight, as stored), others load as stored")


def _add_ep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ep", type=positive_int, default=1, metavar="N",
                   help="expert parallelism: shard the routed experts over N ranks (processes) on this machine; "
                        "under torchrun, the ranks torchrun starts (default 1)")
    p.add_argument("--placement", default=None, metavar="FILE",
                   help="expert placement from `routed eplb` (replicas of hot experts; default: contiguous blocks)")
    p.add_argument("--ep-timeout", type=float, default=120.0, metavar="S",
                   help="seconds a rank may stay silent in a step before it is declared hung (default 120)")


def run_torchrun_worker(args: argparse.Namespace) -> int:
    """Under torchrun, ranks > 0 of generate/serve/bench load their experts and follow rank 0's steps."""
    import torch

    from routed.parallel.ep import LoadSpec, run_worker

    _model_or_demo(args)
    spec = LoadSpec(args.model, args.dtype, mtp=getattr(args, "speculative", None) == "mtp",
                    quant=getattr(args, "quant", None), placement=args.placement, threads=torch.get_num_threads())
    return run_worker(spec, args.ep_timeout)


def build_parser() -> argparse.ArgumentParser:
    from routed.presets import PRESETS

    parser = argparse.ArgumentParser(
        prog="routed", description="Run DeepSeek-V3-family MoE models (V3/R1/V3.1, V2-Lite, Moonlight, Kimi-K2).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt, streaming it to stdout",
                       description="Generate from a checkpoint folder; text streams to stdout, timings to stderr.")
    g.add_argument("prompt", help="the prompt text (with --chat: the user message)")
    g.add_argument("--model", default=None,
                   help="checkpoint folder (config.json, *.safetensors, tokenizer.json); default: the bundled demo model")
    g.add_argument("--max-tokens", type=positive_int, default=64, help="tokens to generate at most (default 64)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop when TEXT appears (repeatable)")
    g.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight dtype (default bf16)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the checkpoint's chat template")
    _add_quant_arg(g)
    g.add_argument("--max-ram", type=float, default=None, metavar="GB",
                   help="keep routed experts beyond this budget on disk behind an LRU cache")
    g.add_argument("--speculative", choices=["mtp"], default=None,
                   help="draft with the MTP module and verify in the same step (greedy: same output, faster)")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, token_ids, prompt/completion tokens, seconds, tokens/s")
    _add_threads_arg(g)
    _add_ep_args(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("inspect", help="parameters, layers, experts, bytes and the loader's plan for a checkpoint",
                       description="Read config.json and safetensors headers (no weights) and report.")
    i.add_argument("--model", required=True, help="checkpoint folder")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_inspect)

    s = sub.add_parser("serve", help="serve an OpenAI-compatible API (chat, completions, models, metrics)",
                       description="Serve the model over HTTP with continuous batching. Binds 127.0.0.1 unless "
                                   "--host says otherwise; SIGTERM drains in-flight requests, then exits 0.")
    s.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (or set ROUTED_API_KEY)")
    s.add_argument("--served-model-name", default=None, help="model id clients send (default: the folder name)")
    s.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight dtype (default bf16)")
    s.add_argument("--max-num-seqs", type=positive_int, default=16, help="running requests per step (default 16)")
    s.add_argument("--max-num-batched-tokens", type=positive_int, default=512,
                   help="tokens per step, decode rows plus prefill chunks (default 512)")
    s.add_argument("--kv-cache-gb", type=float, default=1.0, help="memory for the latent cache (default 1.0)")
    s.add_argument("--max-model-len", type=positive_int, default=None,
                   help="prompt + output cap (default: the model's context, at most 32768)")
    s.add_argument("--max-waiting", type=positive_int, default=256,
                   help="queued requests beyond which new ones get 429 (default 256)")
    s.add_argument("--no-prefix-caching", action="store_true", help="do not reuse cached prompt prefixes")
    _add_quant_arg(s)
    s.add_argument("--max-ram", type=float, default=None, metavar="GB",
                   help="keep routed experts beyond this budget on disk behind an LRU cache")
    s.add_argument("--speculative", choices=["mtp"], default=None,
                   help="draft one token per step with the checkpoint's MTP module (greedy requests)")
    s.add_argument("--routing-window", type=positive_int, default=4096,
                   help="tokens in the sliding window of the routing telemetry (default 4096)")
    s.add_argument("--record-routing", metavar="FILE", default=None,
                   help="write routing counts over time to FILE (safetensors) for `routed stats --recording`")
    s.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body accepted; larger gets 413 (default 1 MiB)")
    s.add_argument("--price-per-hour", type=float, default=0.10,
                   help="machine price for the $/Mtok gauges (default 0.10: a 2-vCPU cloud VM, on-demand)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default 30)")
    _add_threads_arg(s)
    _add_ep_args(s)
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("stats", help="routing pictures and a summary from a text or a recording",
                        description="Expert-load heatmap (layers x experts), per-layer balance, balance over time "
                                    "and a Markdown summary of the measures and alerts.")
    st.add_argument("--model", help="checkpoint folder to run over --text")
    st.add_argument("--text", help="UTF-8 text file to run the model over")
    st.add_argument("--recording", help="a file written by `routed serve --record-routing`")
    st.add_argument("--out", default="routing-report", help="folder for the PNGs and summary (default routing-report)")
    st.add_argument("--chunk-tokens", type=positive_int, default=256, help="tokens per window (default 256)")
    st.add_argument("--max-tokens", type=positive_int, default=16384, help="read at most this many tokens")
    st.add_argument("--save-recording", help="also save the counts as a recording file")
    st.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    st.add_argument("--json", action="store_true", help="print the written paths as JSON")
    st.set_defaults(func=cmd_stats)

    cr = sub.add_parser("compare-routing", help="how far a checkpoint's routing moved from a reference's",
                        description="Per layer: fraction of tokens whose top-k expert set is identical, mean "
                                    "overlap; and the KL divergence of next-token distributions.")
    cr.add_argument("--model", required=True, help="checkpoint to check (e.g. a quantized one)")
    cr.add_argument("--reference", required=True, help="checkpoint it should match (e.g. the bf16 original)")
    cr.add_argument("--text", required=True, help="UTF-8 text file to run both over")
    cr.add_argument("--chunk-tokens", type=positive_int, default=256)
    cr.add_argument("--max-tokens", type=positive_int, default=4096)
    cr.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    cr.add_argument("--json", action="store_true")
    cr.set_defaults(func=cmd_compare_routing)

    q = sub.add_parser("quantize", help="write an int8 or int4 weight-only checkpoint (and check its quality)",
                       description="Quantize every linear weight (attention, MLPs, experts, lm_head; not the router "
                                   "or kv_b_proj) and write a checkpoint routed loads directly. Reports the KL "
                                   "divergence and the routing agreement against the original.")
    q.add_argument("--model", required=True, help="float (bf16/fp32/FP8) checkpoint folder")
    q.add_argument("--to", required=True, choices=["int8", "int4"])
    q.add_argument("--group-size", type=int, default=32, choices=[32, 64, 128, 256], help="int4 group (default 32)")
    q.add_argument("--out", required=True, help="new folder to write")
    q.add_argument("--check-tokens", type=int, default=512,
                   help="tokens of sample text for the quality check; 0 skips it (default 512)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quantize)

    b = sub.add_parser("bench", help="prefill and decode throughput, memory, bandwidth floor, cost",
                       description="Measure load time, peak RSS, prefill and decode tokens/s (median of repeats), "
                                   "weight bytes per step against the machine's memory bandwidth, and $/Mtok. "
                                   "--json output feeds `routed plan --calibrate`.")
    b.add_argument("--model", default=None, help="checkpoint folder (default: the bundled demo model)")
    b.add_argument("--prompt-len", type=positive_int, default=512, help="prefill length (default 512)")
    b.add_argument("--gen-len", type=positive_int, default=128, help="decode tokens per request (default 128)")
    b.add_argument("--batch", default="1,8,16", help="decode batch sizes (default 1,8,16)")
    _add_quant_arg(b)
    b.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    b.add_argument("--repeats", type=positive_int, default=3, help="runs per figure (default 3)")
    b.add_argument("--price-per-hour", type=float, default=0.10,
                   help="machine price for $/Mtok (default 0.10: a 2-vCPU cloud VM, on-demand, 2025 list prices)")
    b.add_argument("--compare-transformers", action="store_true", help="also time transformers, same checkpoint")
    _add_threads_arg(b)
    b.add_argument("--max-ram", type=float, default=None, metavar="GB",
                   help="keep routed experts beyond this budget on disk behind an LRU cache")
    b.add_argument("--json", action="store_true")
    _add_ep_args(b)
    b.set_defaults(func=cmd_bench)

    from routed.parallel.eplb_cli import add_parser as add_eplb_parser
    from routed.planner.cli import add_parser as add_plan_parser

    add_plan_parser(sub)
    add_eplb_parser(sub)

    from routed.train.cli import add_parser as add_train_parser

    add_train_parser(sub)

    r = sub.add_parser("random-checkpoint", help="write a random-weight checkpoint in the Hugging Face layout",
                       description="Write config.json, safetensors shards and the DeepSeek-V3 tokenizer files. "
                                   "Presets: " + ", ".join(PRESETS))
    r.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model shape")
    r.add_argument("--out", required=True, help="new folder to write")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("--fp8", action="store_true", help="store decoder linear weights as FP8 with 128x128 scales")
    r.set_defaults(func=cmd_random_checkpoint)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if hasattr(args, "ep") and os.environ.get("RANK", "0") != "0":  # a torchrun rank > 0
            return run_torchrun_worker(args)
        return args.func(args)
    except RoutedError as e:
        print(f"routed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("routed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
