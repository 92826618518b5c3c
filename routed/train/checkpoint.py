"""Training output folder: a Hugging Face checkpoint plus the state to resume from. Never a pickle.

    config.json                  the model config (HF field names; `torch_dtype` = the weights' dtype)
    model.safetensors            HF tensor names: experts un-stacked (`mlp.experts.{e}.gate_proj.weight`), MTP
                                 modules at `model.layers.{N+k}.*` with their own copies of `embed_tokens` and
                                 `shared_head.head` (as DeepSeek's checkpoints carry them); router weight and
                                 `e_score_correction_bias` in fp32, everything else in the chosen dtype
    tokenizer.json, tokenizer_config.json
    training_state.safetensors   fp32 master weights, AdamW moments and step per parameter, the correction
                                 biases, the data sampler's RNG state
    training_state.json          step, tokens seen, elapsed seconds, the training settings
    tokens.safetensors           the tokenized corpus (train / val streams), so it is tokenized once
    metrics.jsonl                one JSON line per logged step and per evaluation

The first four files are a complete checkpoint for `routed.load_model`, `routed.LLM` and transformers'
`AutoModelForCausalLM`. Files are written under a temporary name and renamed, so an interrupted save never
leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from routed.errors import RoutedError
from routed.loader import checkpoint_table
from routed.model.deepseek_v3 import Transformer

STATE_JSON, STATE_TENSORS, TOKENS, METRICS = ("training_state.json", "training_state.safetensors",
                                               "tokens.safetensors", "metrics.jsonl")
_FP32_NAMES = ("e_score_correction_bias", "mlp.gate.weight")
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def hf_tensors(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's weights under the checkpoint's names (the inverse of `checkpoint_table`)."""
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, target in checkpoint_table(model).items():
        t = state[target.key] if target.expert is None else state[target.key][target.expert]
        out[name] = t.detach().to(torch.float32 if name.endswith(_FP32_NAMES) else dtype).contiguous().clone()
    n_main = model.config.num_hidden_layers
    for k in range(len(model.mtp)):
        out[f"model.layers.{n_main + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{n_main + k}.shared_head.head.weight"] = out["lm_head.weight"].clone()
    return out


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    tmp.chmod(0o644)  # the safetensors writer creates 0600 files; checkpoints are meant to be shared
    os.replace(tmp, path)


def save_json(path: Path, data: Any) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8"))


def save_model(model: Transformer, out: Path, raw_config: dict[str, Any], dtype: torch.dtype) -> None:
    """config.json + model.safetensors (the tokenizer files are written once, when training starts)."""
    save_json(out / "config.json", {**raw_config, "torch_dtype": DTYPE_NAMES[dtype]})
    tensors = hf_tensors(model, dtype)
    _write_atomic(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def save_training_state(out: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator, info: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {"rng.data": generator.get_state().clone()}
    for key, p in model.named_parameters():
        tensors[f"param.{key}"] = p.detach().float().contiguous().clone()
        st = optimizer.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in st:
                tensors[f"{moment}.{key}"] = st[moment].detach().contiguous().clone()
        if "step" in st:
            tensors[f"step.{key}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1).clone()
    for key, b in model.named_buffers(remove_duplicate=True):
        if key.endswith("e_score_correction_bias"):
            tensors[f"buffer.{key}"] = b.detach().float().contiguous().clone()
    _write_atomic(out / STATE_TENSORS, lambda p: save_file(tensors, str(p)))
    save_json(out / STATE_JSON, info)


def load_training_state(out: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                        generator: torch.Generator) -> dict[str, Any]:
    """Restore weights, biases, AdamW state and the sampler RNG; return training_state.json."""
    for name in (STATE_JSON, STATE_TENSORS, "config.json", "tokenizer.json", TOKENS):
        if not (out / name).is_file():
            raise RoutedError(f"--resume: {out / name} is missing; {out} is not a complete `routed train` folder")
    try:
        info = json.loads((out / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(out / STATE_TENSORS))
    except Exception as e:  # json or safetensors errors: a damaged folder
        raise RoutedError(f"--resume: cannot read the training state in {out} ({e})") from None
    params = dict(model.named_parameters())
    missing = [k for k in params if f"param.{k}" not in tensors]
    if missing:
        raise RoutedError(f"--resume: {out / STATE_TENSORS} has no weights for {missing[0]}; was it written for "
                          f"another config?")
    with torch.no_grad():
        for key, p in params.items():
            src = tensors[f"param.{key}"]
            if src.shape != p.shape:
                raise RoutedError(f"--resume: {key} has shape {list(src.shape)} in the state, {list(p.shape)} "
                                  f"from config.json")
            p.copy_(src)
            if f"exp_avg.{key}" in tensors:
                optimizer.state[p] = {"step": tensors[f"step.{key}"][0].clone(),
                                      "exp_avg": tensors[f"exp_avg.{key}"].clone(),
                                      "exp_avg_sq": tensors[f"exp_avg_sq.{key}"].clone()}
        for key, b in model.named_buffers(remove_duplicate=True):
            if f"buffer.{key}" in tensors:
                b.copy_(tensors[f"buffer.{key}"])
    generator.set_state(tensors["rng.data"])
    return info


def trim_metrics(out: Path, step: int) -> None:
    """Drop metric lines past `step` (logged after the last save by a run that was then interrupted)."""
    path = out / METRICS
    if not path.is_file():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    _write_atomic(path, lambda p: p.write_text("".join(x + "\n" for x in keep), encoding="utf-8"))
