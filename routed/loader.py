"""Checkpoint folder (safetensors, memory-mapped) -> Transformer parameters.

* Files: `model.safetensors`, or shards listed in `model.safetensors.index.json`. Never a pickle (`.bin`, `.pt`).
  Tensors are read from the file with plain reads (no mmap whose pages would count as resident); one already
  in the target dtype goes straight into its parameter, so peak memory stays near the weight bytes.
* Names: the model's parameter names are the checkpoint's, through one table (`checkpoint_table`) with the
  two restructurings written as data: stacked routed experts and MTP layers at `mtp.{k}`.
* FP8 (`weight_scale_inv` siblings): dequantised at load, block by block in fp32, rounded once to the target
  dtype — the model holds bf16/fp32 weights (this CPU has no fast FP8 matmul).
* Duplicates and extras that are skipped on purpose: MTP layers (index >= num_hidden_layers) unless asked for,
  the MTP modules' copies of the embedding and head, legacy `rotary_emb.inv_freq` buffers.
* A missing `e_score_correction_bias` loads as zeros with a warning (routing health flags it).
* Anything else missing, unexpected or mis-shaped: one RoutedError naming the tensor and both shapes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.malloc import advise_huge_pages, keep_freed_memory, release_freed_memory
from routed.model import gemv
from routed.model.deepseek_v3 import Gate, MoE, Transformer
from routed.model.experts import RoutedExperts
from routed.progress import progress_bar
from routed.quant import fp8, intq, kernels
from routed.quant.intq import IntFormat, quantize_int4, quantize_int8
from routed.quant.linear import finalize_model, model_bytes, quantize_model

if TYPE_CHECKING:
    from routed.parallel.ep import EPShard

READ_CHUNK_ROWS = 4096  # rows of a weight converted or quantized at once while loading (`_read_rows`)
QUANT_CHOICES = {"none": None, "int8": IntFormat(8), "int4": IntFormat(4, 32)}

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
_EXPERTS = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<proj>gate_proj|up_proj|down_proj)(?:_(?P<kind>qweight|scales_zeros|scales))?$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT_TENSOR = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.")
_MTP_DUPLICATES = (".embed_tokens.weight", ".shared_head.head.weight")


@dataclass(slots=True, frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code: BF16, F32, F8_E4M3, ...
    offset: int = 0  # absolute byte offset of the data in the file
    nbytes: int = 0


_TORCH_CODES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.int8: "I8",
                torch.uint8: "U8", torch.int64: "I64", torch.int32: "I32", torch.float8_e4m3fn: "F8_E4M3"}
_CODE_DTYPES = {code: dtype for dtype, code in _TORCH_CODES.items()}


def _data_offsets(file: Path) -> dict[str, tuple[int, int]]:
    """name -> (absolute start, length) from the safetensors header (8-byte size, then JSON)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {name: (base + meta["data_offsets"][0], meta["data_offsets"][1] - meta["data_offsets"][0])
            for name, meta in header.items() if name != "__metadata__"}


@dataclass(slots=True, frozen=True)
class Target:
    """Where a checkpoint tensor goes: a state-dict key, optionally one expert's slice of a stacked tensor."""

    key: str
    expert: int | None
    shape: tuple[int, ...]


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.bfloat16, torch.float32):
            raise RoutedError(f"dtype {dtype} is not supported; use bf16 or fp32")
        return dtype
    if dtype not in DTYPES:
        raise RoutedError(f"dtype {dtype!r} is not supported; use bf16 or fp32")
    return DTYPES[dtype]


def scan_checkpoint(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor in the folder's safetensors files: name -> file, shape, dtype (headers only)."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise RoutedError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        pickles = [p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = (f" (found {', '.join(sorted(pickles)[:3])}: routed never unpickles; convert to safetensors)"
                if pickles else "")
        raise RoutedError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")
    infos: dict[str, TensorInfo] = {}
    for file in files:
        if not file.is_file():
            raise RoutedError(f"{file}: listed in the index but missing")
        try:
            with safe_open(file, framework="pt") as f:
                offsets = _data_offsets(file)
                for name in f.keys():
                    sl = f.get_slice(name)
                    infos[name] = TensorInfo(file, tuple(sl.get_shape()), sl.get_dtype(), *offsets[name])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise RoutedError(f"{file}: not a readable safetensors file ({e})") from None
    return infos


def checkpoint_table(model: Transformer) -> dict[str, Target]:
    """Checkpoint tensor name -> where it lands in the model."""
    n_main = model.config.num_hidden_layers
    table: dict[str, Target] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        hf = key
        if key.startswith("mtp."):
            k, rest = key[len("mtp."):].split(".", 1)
            hf = f"model.layers.{n_main + int(k)}.{rest}"
        m = _EXPERTS.match(hf)
        if m:
            experts = model.get_submodule(key.rsplit(".", 1)[0])
            for slot, e in enumerate(experts.logical_ids):  # a replica twice on one rank: loaded once, copied
                name = f"{m['prefix']}.{e}.{m['proj']}.{m['kind'] or 'weight'}"
                table.setdefault(name, Target(key, slot, tuple(tensor.shape[1:])))
        else:
            table[hf] = Target(key, None, tuple(tensor.shape))
    return table


def is_skipped(name: str, cfg: ModelConfig, with_mtp: bool) -> bool:
    """Tensors present in real checkpoints that routed does not load, by design."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        return not with_mtp or name.endswith(_MTP_DUPLICATES)
    return False


def load_model(
    path: str | Path, dtype: torch.dtype | str = torch.bfloat16, *, mtp: bool = False, progress: bool = True,
    quant: str | None = None, max_ram_gb: float | None = None, shard: EPShard | None = None,
    routing_telemetry: bool = True,
) -> Transformer:
    """Load a DeepSeek-V3-family checkpoint folder into a Transformer in eval mode.

    `quant="int8"|"int4"` quantizes a float checkpoint's linear weights as they are read (see routed.quant);
    a checkpoint written by `routed quantize` loads quantized as it is. An FP8 checkpoint is re-quantized to int8
    unless `quant` says otherwise: one byte per weight, as stored, on the int8 kernels (its FP8 weights kept at
    rest and widened per product ran 6-12x slower than int8's here: BENCHMARKS.md); `quant="none"` dequantizes
    it to `dtype` (twice its size in bf16). `max_ram_gb` below the model's size
    keeps the routed experts that do not fit on disk, read on demand through an LRU cache (routed.offload).
    `shard` (expert parallelism): load only this rank's routed experts (routed.parallel.ep).
    `routing_telemetry`: whether the routers count routing per expert (`Gate.counting`, which an engine's
    `routing_telemetry` sets): set before the decode step is compiled, so that an engine with the same setting
    does not compile it again (~3 s with inductor's cache warm, `small`).
    """
    keep_freed_memory()  # prefill's large temporaries reused warm, not faulted in afresh (routed.malloc)
    folder = Path(path)
    dtype = resolve_dtype(dtype)
    cfg = ModelConfig.from_pretrained(folder)
    if mtp and cfg.num_nextn_predict_layers == 0:
        raise RoutedError(f"{cfg.source}: num_nextn_predict_layers is 0, so this checkpoint has no MTP module")
    infos = scan_checkpoint(folder)
    if quant is None and cfg.fp8 and not cfg.int_quant and not max_ram_gb:  # offloaded experts stay float
        quant = "int8"
        log.info("%s: FP8 weights re-quantized to int8 at load (quant='none' dequantizes them instead)", folder)
    if quant is not None:
        if cfg.int_quant:
            raise RoutedError(f"{folder} is already quantized (int{cfg.int_quant[0]}) and loads as it is; drop --quant")
        if quant not in QUANT_CHOICES:
            raise RoutedError(f"quant {quant!r} is not supported; choose from {', '.join(QUANT_CHOICES)}")
    fmt = QUANT_CHOICES[quant] if quant is not None else None
    quant = quant if fmt is not None else None  # "none": the weights in `dtype`
    int_fmt = fmt or (IntFormat(*cfg.int_quant) if cfg.int_quant else None)  # of the weights in memory
    with torch.device("meta"):
        model = Transformer(cfg, dtype=dtype, with_mtp=mtp)
        if shard is not None:
            if max_ram_gb:
                raise RoutedError("expert parallelism and --max-ram (expert offload) do not combine; pick one")
            _shard_experts(model, shard, dtype)
        if int_fmt is not None:  # quantized checkpoint, or quantize each weight as it is read
            quantize_model(model, int_fmt, from_weights=False)
    offloaded = _plan_offload(model, folder, infos, cfg, dtype, max_ram_gb, quant) if max_ram_gb else False
    model.to_empty(device="cpu")
    advise_huge_pages(list(model.parameters()) + list(model.buffers()))  # before the reads fault them in
    table = checkpoint_table(model)
    state = model.state_dict(keep_vars=True)
    absent_bias = [n for n in table if n.endswith("e_score_correction_bias") and n not in infos]
    if absent_bias:  # some conversions drop it: run, but loudly (the routing health check flags it too)
        log.warning("%s: %d layers have no e_score_correction_bias; using zeros — routing will not match the "
                    "trained model", folder, len(absent_bias))
        for name in absent_bias:
            state[table.pop(name).key].zero_()
    requant = _split_requant(table, fmt) if fmt else {}
    _check_names(table, infos, cfg, mtp, folder, offloaded or shard is not None)
    by_file: dict[Path, list[str]] = {}
    # each file read front to back, so that the kernel's readahead runs ahead of the reads (a cold `small`, the
    # model's order with 91 seeks back: 8.5-9.2 s; in the file's: 5.6-5.8, BENCHMARKS.md)
    for name in sorted(table, key=lambda n: infos[n].offset):
        by_file.setdefault(infos[name].file, []).append(name)
    with progress_bar(f"loading {folder.name}", total=len(table), enabled=progress) as advance:
        for file, names in by_file.items():
            with open(file, "rb", buffering=0) as raw:
                for name in names:
                    target = table[name]
                    info = infos[name]
                    if name in requant:  # read in float (FP8 dequantized) a row chunk at a time, quantize, store
                        with torch.no_grad():
                            _store_quantized(_read_rows(name, infos, cfg), requant[name], state, fmt)
                        advance()
                        continue
                    dest = state[target.key] if target.expert is None else state[target.key][target.expert]
                    with torch.no_grad():
                        if _TORCH_CODES.get(dest.dtype) == info.dtype and dest.is_contiguous() \
                                and dest.numel() * dest.element_size() == info.nbytes:
                            _read_into(raw, info, dest)  # straight from the file: no second copy in memory
                        else:  # dtype change or FP8: convert, a row chunk at a time
                            for at, rows in _read_rows(name, infos, cfg):
                                dest[at].copy_(rows)
                    advance()
    del state  # it holds every weight as loaded: finalize_model's packing must free the unpacked int4 ones
    if requant:
        release_freed_memory()  # the chunks read and quantized, before the packing and the compile add theirs
    for module in model.modules():
        if isinstance(module, Gate):
            module.reset_counters()  # to_empty left them uninitialised
        if isinstance(module, RoutedExperts):
            _copy_duplicate_slots(module)
    big = model_bytes(model) >= gemv.MIN_MODEL_BYTES  # worth compiling (~3 s, ~12 s the first time on a machine)
    if kernels.WANTED and (int_fmt is not None or (big and dtype == torch.bfloat16)):
        with progress_bar("routed's CPU kernels (built once per machine, ~50 s)", total=1,
                          enabled=progress) as advance:
            kernels.int_dot()
            advance()
    finalize_model(model, dtype)
    model.eval()
    for _, gate in model.gates():
        gate.counting = routing_telemetry
    if big:
        if dtype == torch.bfloat16 and not kernels.BF16_DOT:  # with it, routed's bf16_dot takes every one-row product
            gemv.enable()
        if int_fmt is not None and int_fmt.bits == 4:  # the prefill's int4 GEMMs widen their weights through it
            with progress_bar("compiling the int4 widening", total=1, enabled=progress) as advance:
                # into the dtype the GEMMs run in (fp32 without native bf16 products); ~13 s the first time, ~1 s after
                intq.enable_widen(gemv.wide_dtype(dtype), int_fmt.group_size)
                advance()
        if not (offloaded or shard is not None):
            model.compile_decode(progress=progress)
    release_freed_memory()  # the load's transients, kept by keep_freed_memory's thresholds
    return model


def _shard_experts(model: Transformer, shard: EPShard, dtype: torch.dtype) -> None:
    """Give each MoE layer only this rank's experts (by the shard's placement) and its dispatch."""
    from routed.parallel.ep import ExpertParallel

    cfg = model.config
    layers = [(i, layer) for i, layer in enumerate(model.model.layers)]
    layers += [(cfg.num_hidden_layers + k, layer) for k, layer in enumerate(model.mtp)]
    for index, layer in layers:
        moe = layer.mlp
        if not isinstance(moe, MoE):
            continue
        phy2log = shard.layer_slots(index, cfg.n_routed_experts)
        with torch.device("cpu"):  # we are inside the meta-device skeleton
            moe.ep = ExpertParallel(phy2log, shard.rank, shard.world, cfg.n_routed_experts)
        moe.experts = RoutedExperts(len(moe.ep.local), cfg.hidden_size, cfg.moe_intermediate_size, dtype)
        moe.experts.logical_ids = moe.ep.local


def _copy_duplicate_slots(experts: RoutedExperts) -> None:
    """A rank holding two replicas of one expert loads it once (the name table's first slot): copy it over."""
    first: dict[int, int] = {}
    for slot, e in enumerate(experts.logical_ids):
        if e in first:
            with torch.no_grad():
                for t in experts.state_dict().values():
                    t[slot].copy_(t[first[e]])
        else:
            first[e] = slot


def _split_requant(table: dict[str, Target], fmt: IntFormat) -> dict[str, list[Target]]:
    """For load-time quantization: replace each `X.qweight` / `X.scales[_zeros]` pair of the quantized skeleton
    by the checkpoint's float `X.weight` (shape [N, K]); return X.weight -> [qweight target, scales target]."""
    requant: dict[str, list[Target]] = {}
    for name in [n for n in table if n.endswith(".qweight")]:
        base = name[: -len(".qweight")]
        q = table.pop(name)
        s = table.pop(base + (".scales" if fmt.bits == 8 else ".scales_zeros"))
        N, K = q.shape[0], q.shape[1] * (2 if fmt.bits == 4 else 1)
        table[base + ".weight"] = Target(q.key, q.expert, (N, K))
        requant[base + ".weight"] = [q, s]
    return requant


def _store_quantized(chunks: Iterator[tuple[Any, torch.Tensor]], targets: list[Target],
                     state: dict[str, torch.Tensor], fmt: IntFormat) -> None:
    """Quantize a weight's row chunks (int8 per row, int4 per row and group: chunks quantize as the whole does)
    into its qweight and scales targets."""
    q_dest, s_dest = (state[t.key] if t.expert is None else state[t.key][t.expert] for t in targets)
    for at, w in chunks:
        q, s = quantize_int8(w) if fmt.bits == 8 else quantize_int4(w, fmt.group_size)
        q_dest[at].copy_(q)
        (s_dest[at] if fmt.bits == 8 else s_dest[:, at]).copy_(s)


def _read_into(raw, info: TensorInfo, dest: torch.Tensor) -> None:  # noqa: ANN001
    """Read a tensor's bytes from the open file directly into its destination's memory."""
    raw.seek(info.offset)
    view = memoryview(dest.view(torch.uint8).reshape(-1).numpy())
    done = 0
    while done < info.nbytes:
        n = raw.readinto(view[done:])
        if not n:
            raise RoutedError(f"{info.file}: truncated (tensor data ends early)")
        done += n


def _read_tensor(info: TensorInfo) -> torch.Tensor:
    """A checkpoint tensor in its stored dtype, read from the file (no mmap)."""
    dtype = _CODE_DTYPES.get(info.dtype)
    if dtype is None:
        raise RoutedError(f"{info.file}: tensor dtype {info.dtype} is not supported")
    out = torch.empty(info.shape, dtype=dtype)
    with open(info.file, "rb", buffering=0) as raw:
        _read_into(raw, info, out)
    return out


def _read_rows(name: str, infos: dict[str, TensorInfo], cfg: ModelConfig,
               rows: int | None = None) -> Iterator[tuple[Any, torch.Tensor]]:
    """A checkpoint tensor as (its rows' slice, rows) chunks of `rows` rows (a multiple of FP8's block rows),
    FP8 weights dequantized (fp32) with their block scales: a converted or quantized weight's transients stay
    a chunk's, not the whole tensor's (`small`'s lm_head read whole in bf16 for int8: 0.26 GB)."""
    info, rows = infos[name], rows or READ_CHUNK_ROWS
    if len(info.shape) < 2 or info.shape[0] <= rows:
        yield ..., _read(name, infos, cfg)  # the whole tensor
        return
    scale, block = _fp8_scale(name, infos, cfg) if info.dtype == "F8_E4M3" else (None, (1, 1))
    rows = rows // block[0] * block[0]
    row_bytes = info.nbytes // info.shape[0]
    for r0 in range(0, info.shape[0], rows):
        r1 = min(info.shape[0], r0 + rows)
        chunk = _read_tensor(TensorInfo(info.file, (r1 - r0, *info.shape[1:]), info.dtype,
                                        info.offset + r0 * row_bytes, (r1 - r0) * row_bytes))
        if scale is not None:
            chunk = fp8.dequantize(chunk, scale[r0 // block[0] : -(-r1 // block[0])], block, torch.float32)
        yield slice(r0, r1), chunk


def _read(name: str, infos: dict[str, TensorInfo], cfg: ModelConfig) -> torch.Tensor:
    """A checkpoint tensor, FP8 weights dequantized (fp32) with their block scales."""
    tensor = _read_tensor(infos[name])
    if tensor.dtype != torch.float8_e4m3fn:
        return tensor
    scale, block = _fp8_scale(name, infos, cfg)
    return fp8.dequantize(tensor, scale, block, torch.float32)


def _fp8_scale(name: str, infos: dict[str, TensorInfo], cfg: ModelConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """An FP8 weight's block scales (`weight_scale_inv`, checked against its shape) and the block size."""
    scale_name = name + "_scale_inv"
    if scale_name not in infos:
        raise RoutedError(f"{name}: FP8 weight without its {scale_name}")
    block = cfg.fp8.block_size if cfg.fp8 else (128, 128)
    scale, shape = _read_tensor(infos[scale_name]), infos[name].shape
    if tuple(scale.shape) != fp8.scale_grid(shape, block):
        raise RoutedError(f"{scale_name}: scale grid {tuple(scale.shape)} does not match weight {tuple(shape)} in "
                          f"{block[0]}x{block[1]} blocks (expected {fp8.scale_grid(shape, block)})")
    return scale, block


def _plan_offload(model: Transformer, folder: Path, infos: dict[str, TensorInfo], cfg: ModelConfig,
                  dtype: torch.dtype, max_ram_gb: float, quant: str | None) -> bool:
    """Offload the routed experts behind an LRU cache if the weights exceed `max_ram_gb`; True if so."""
    from routed.model.experts import RoutedExperts
    from routed.offload import ExpertStore

    if quant or cfg.int_quant:
        raise RoutedError("--max-ram (expert offload) works on float checkpoints; drop the quantization")
    experts = [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedExperts)]
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expert_bytes = sum(t.numel() for _, m in experts for t in m.parameters()) * itemsize
    other_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) - expert_bytes
    budget = int(max_ram_gb * 1e9) - other_bytes
    if budget >= expert_bytes:
        return False
    if budget <= 0:
        raise RoutedError(f"--max-ram {max_ram_gb} GB cannot hold even the non-expert weights "
                          f"({other_bytes / 1e9:.2f} GB)")

    def read(name: str) -> torch.Tensor:
        info = infos.get(name)
        if info is None:
            raise RoutedError(f"{folder}: tensor {name} is missing")
        return _read(name, infos, cfg).to(dtype)

    store = ExpertStore(budget, read)
    for name, module in experts:
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        prefix = name if layer >= 0 else name.replace("mtp.", f"model.layers.{cfg.num_hidden_layers}.", 1)
        module.offload_(store, layer, prefix)
    model.expert_store = store
    log.info("offloading routed experts: %.2f GB on disk, LRU cache of %.2f GB", expert_bytes / 1e9, budget / 1e9)
    return True


def _check_names(
    table: dict[str, Target], infos: dict[str, TensorInfo], cfg: ModelConfig, mtp: bool, folder: Path,
    offloaded: bool = False,
) -> None:
    missing = sorted(n for n in table if n not in infos)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise RoutedError(f"{folder}: tensor {missing[0]} is missing{more}; expected shape "
                          f"{list(table[missing[0]].shape)}")
    unexpected = sorted(
        n for n in infos
        if n not in table and not n.endswith("_scale_inv") and not is_skipped(n, cfg, mtp)
        and not (offloaded and _EXPERT_TENSOR.match(n))
    )
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise RoutedError(f"{folder}: unexpected tensor {unexpected[0]} with shape "
                          f"{list(infos[unexpected[0]].shape)}{more}; is config.json the checkpoint's own?")
    for name, target in table.items():
        found = infos[name].shape
        if found != target.shape:
            raise RoutedError(f"{folder}: tensor {name} has shape {list(found)}, expected {list(target.shape)} "
                              f"from config.json")
        if infos[name].dtype == "F8_E4M3" and name + "_scale_inv" not in infos:
            raise RoutedError(f"{folder}: FP8 tensor {name} has no {name}_scale_inv")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def require_empty_folder(out: Path) -> None:
    """An output folder must be new or empty: nothing a user has is overwritten."""
    if out.exists() and not out.is_dir():
        raise RoutedError(f"{out} is a file, not a folder; choose a new folder")
    if out.exists() and any(out.iterdir()):
        raise RoutedError(f"{out} exists and is not empty; choose a new folder")


def write_checkpoint(model: Transformer, source: str | Path, out: str | Path, config_changes: dict,
                     shard_bytes: int = 1 << 30) -> Path:
    """Write `model` in the checkpoint layout it was loaded from (the inverse of the name table), with
    source's config.json updated by `config_changes` (None removes a key) and its tokenizer files copied."""
    import shutil

    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    require_empty_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = json.loads((source / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    state = model.state_dict()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, target in checkpoint_table(model).items():
        tensor = state[target.key] if target.expert is None else state[target.key][target.expert]
        if size > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out
