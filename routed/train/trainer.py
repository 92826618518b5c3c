"""`train(...)`: train a DeepSeek-V3-family model from scratch (or resume) into a Hugging Face checkpoint folder.

Contract:
* model config: a preset name (`routed.presets.PRESETS`), a config.json file, or a folder holding one; its
  `vocab_size`, `bos_token_id` and `eos_token_id` are set from the tokenizer;
* tokenizer: copied from `tokenizer` (a folder with tokenizer.json) or trained as a byte-level BPE on the
  training split (`vocab_size` tokens, DeepSeek-V3 special tokens and chat template);
* data: see `routed.train.data` (tokenized once into `tokens.safetensors` in the output folder);
* optimisation: fp32 master weights, AdamW (β = 0.9, 0.95; weight decay on matrices only), linear warmup +
  cosine to `min_lr_ratio · lr`, gradient-norm clipping, optional bf16 autocast (routers stay fp32);
  balance by the correction-bias update (γ) and/or the sequence-wise loss (α); MTP loss weight λ;
* output: `routed.train.checkpoint` layout, saved every `save_every` steps and at the end; `resume=True`
  continues from the folder's training state to `steps` total steps (the RNG of the data sampler included,
  so an interrupted and resumed run draws the same windows as an uninterrupted one);
* progress: a rich bar (loss, tokens/s, MaxVio) on a terminal, otherwise one line per `log_every` steps on
  stderr; every step's figures go to `metrics.jsonl`.

Bad inputs (unknown preset, missing data, a folder that is not resumable, a tokenizer larger than the
config's vocabulary, ...) raise RoutedError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from routed.config import ModelConfig
from routed.errors import RoutedError
from routed.model.deepseek_v3 import Transformer
from routed.tokenizer import Tokenizer
from routed.train import checkpoint as ckpt
from routed.train.balance import RouterTap, all_gates, fp32_routers
from routed.train.bpe import train_bpe
from routed.train.data import Corpus, build_corpus, eval_windows, find_files, random_windows, split_files
from routed.train.display import Display
from routed.train.fast import use_training_experts
from routed.train.steps import EvalStats, StepStats, evaluate, lr_at, train_step

log = logging.getLogger(__name__)
AMP = {"fp32": None, "bf16": torch.bfloat16}
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(slots=True)
class TrainConfig:
    steps: int = 1000
    seq_len: int = 256
    batch: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    gamma: float = 1e-3  # bias update speed; 0 = off
    alpha: float = 0.0  # sequence-wise balance loss weight; 0 = off
    mtp_lambda: float = 0.3  # MTP loss weight; 0 = off
    dtype: str = "bf16"  # compute: fp32, or bf16 autocast over fp32 master weights
    save_dtype: str = "bf16"  # dtype of model.safetensors
    seed: int = 0
    vocab_size: int | None = None  # of a tokenizer trained here; default: the config's vocab_size
    glob: str = "**/*.py"  # files of a --data folder
    val_every: int = 20  # every n-th file is validation
    val_tokens: int = 32768  # validation tokens per evaluation
    eval_every: int = 250
    save_every: int = 500
    log_every: int = 10
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "batch", "val_every", "val_tokens", "eval_every", "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise RoutedError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "init_std"):
            if not getattr(self, name) > 0:
                raise RoutedError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("gamma", "alpha", "mtp_lambda", "weight_decay", "grad_clip", "warmup", "min_lr_ratio"):
            if getattr(self, name) < 0:
                raise RoutedError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.dtype not in AMP or self.save_dtype not in SAVE_DTYPES:
            raise RoutedError(f"dtype and save_dtype must be fp32 or bf16, got {self.dtype!r}, {self.save_dtype!r}")


@dataclass(slots=True)
class TrainResult:
    out: str
    step: int
    tokens: int  # trained tokens, all sessions
    seconds: float  # training time, all sessions (evaluation and saving included)
    tokens_per_second: float  # median over this session's steps (step compute only)
    train_loss: float  # total loss, mean of the last log_every steps
    train_max_vio: float  # mean over the last log_every steps
    val: dict[str, Any] = field(default_factory=dict)  # EvalStats of the final evaluation

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- setup ---------------------------------------------------------------------------------------------
def resolve_model_config(spec: str | Path | dict[str, Any]) -> dict[str, Any]:
    """A preset name, a config.json path, a checkpoint folder, or a dict -> the raw config dict (validated)."""
    from routed.presets import PRESETS

    if isinstance(spec, dict):
        raw = dict(spec)
    elif str(spec) in PRESETS:
        raw = dict(PRESETS[str(spec)])
    else:
        path = Path(spec)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise RoutedError(f"--config {spec}: not a preset ({', '.join(PRESETS)}) and no such config.json")
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise RoutedError(f"{file}: not valid JSON ({e})") from None
        raw.pop("quantization_config", None)  # trained weights are never FP8
    ModelConfig.from_dict(raw, source=str(spec))
    return raw


def _prepare_tokenizer(out: Path, tokenizer: str | Path | None, texts: list[str], vocab_size: int,
                       max_len: int) -> Tokenizer:
    if tokenizer is None:
        log.info("training a %d-token byte-level BPE on %d documents", vocab_size, len(texts))
        train_bpe(texts, vocab_size, out, model_max_length=max_len)
    else:
        src = Path(tokenizer)
        if not (src / "tokenizer.json").is_file():
            raise RoutedError(f"--tokenizer {tokenizer}: no tokenizer.json in that folder")
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
    tok = Tokenizer.from_pretrained(out)
    if tok.eos_token_id is None:
        raise RoutedError("the tokenizer has no EOS token; documents are separated by EOS")
    return tok


def _fit_config(raw: dict[str, Any], tok: Tokenizer, trained_here: bool) -> dict[str, Any]:
    """The config with the tokenizer's vocabulary and BOS/EOS ids (a given tokenizer may be padded, as V3's)."""
    raw = dict(raw)
    raw["vocab_size"] = tok.vocab_size if trained_here else max(int(raw["vocab_size"]), tok.vocab_size)
    raw["bos_token_id"], raw["eos_token_id"] = tok.bos_token_id, tok.eos_token_id
    return raw


def init_weights(model: Transformer, std: float, seed: int) -> None:
    """Normal(0, std) matrices, output projections scaled by 1/sqrt(2·layers), norms at 1, biases at 0."""
    g = torch.Generator().manual_seed(seed)
    depth = model.config.num_hidden_layers + len(model.mtp)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                scale = std / (2 * depth) ** 0.5 if ("o_proj" in name or "down_proj" in name) else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for gate in all_gates(model):
            if gate.e_score_correction_bias is not None:
                gate.e_score_correction_bias.zero_()
            gate.reset_counters()


def build_model(raw: dict[str, Any]) -> Transformer:
    cfg = ModelConfig.from_dict(raw, source="config.json")
    model = Transformer(cfg, torch.float32, with_mtp=cfg.num_nextn_predict_layers > 0)
    model.requires_grad_(True)
    model.set_impl(attn="naive")  # the expanded form: the usual training path (spec §3.2)
    use_training_experts(model)  # same outputs, a backward without per-expert full-size zero fills
    model.train()
    return model


def build_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; the correction biases are buffers, so they are never in it."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass(slots=True)
class _Run:
    """What a session needs, whether it starts fresh or resumes."""

    out: Path
    cfg: TrainConfig
    raw_config: dict[str, Any]
    corpus: Corpus
    info: dict[str, Any]
    model: Transformer
    optimizer: torch.optim.AdamW
    generator: torch.Generator


def _start(out: Path, cfg: TrainConfig, model_config: str | Path | dict[str, Any] | None, data: str | Path | None,
           tokenizer: str | Path | None) -> _Run:
    if model_config is None or data is None:
        raise RoutedError("a new run needs --config and --data")
    if (out / ckpt.STATE_JSON).exists():
        raise RoutedError(f"{out} already holds a training run; pass --resume to continue it or choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise RoutedError(f"{out} exists and is not empty; choose a new --out")
    raw = resolve_model_config(model_config)
    files = find_files(data, cfg.glob)
    train_texts, val_texts = split_files(files, cfg.val_every)
    out.mkdir(parents=True, exist_ok=True)
    vocab = cfg.vocab_size if cfg.vocab_size is not None else int(raw["vocab_size"])
    tok = _prepare_tokenizer(out, tokenizer, train_texts, vocab, int(raw.get("max_position_embeddings", 4096)))
    raw = _fit_config(raw, tok, trained_here=tokenizer is None)
    corpus = build_corpus(train_texts, val_texts, lambda t: tok.encode(t, add_special_tokens=False),
                          tok.eos_token_id, cfg.seq_len + 1)
    corpus.save(out / ckpt.TOKENS)
    torch.manual_seed(cfg.seed)
    model = build_model(raw)
    init_weights(model, cfg.init_std, cfg.seed)
    info = {"step": 0, "tokens": 0, "elapsed_seconds": 0.0, "train_config": asdict(cfg), "data": str(data),
            "tokenizer": str(tokenizer) if tokenizer else f"byte-level BPE trained here ({tok.vocab_size} tokens)",
            "files": corpus.files, "val_files": corpus.val_files, "train_tokens_in_corpus": corpus.train.numel(),
            "val_tokens_in_corpus": corpus.val.numel()}
    generator = torch.Generator().manual_seed(cfg.seed + 1)
    return _Run(out, cfg, raw, corpus, info, model, build_optimizer(model, cfg), generator)


def _resume(out: Path, overrides: dict[str, Any]) -> _Run:
    state_file = out / ckpt.STATE_JSON
    if not state_file.is_file():
        raise RoutedError(f"--resume: {out} holds no training run ({ckpt.STATE_JSON} missing)")
    try:
        stored = json.loads(state_file.read_text(encoding="utf-8"))["train_config"]
        raw = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise RoutedError(f"--resume: cannot read {state_file} or config.json ({e})") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{**{k: v for k, v in stored.items() if k in known}, **overrides})
    model = build_model(raw)
    optimizer = build_optimizer(model, cfg)
    generator = torch.Generator()
    info = ckpt.load_training_state(out, model, optimizer, generator)
    info["train_config"] = asdict(cfg)
    ckpt.trim_metrics(out, int(info["step"]))
    return _Run(out, cfg, raw, Corpus.load(out / ckpt.TOKENS), info, model, optimizer, generator)


def _save(run: _Run, step: int, elapsed: float) -> None:
    run.info.update(step=step, elapsed_seconds=round(elapsed, 2))
    ckpt.save_model(run.model, run.out, run.raw_config, SAVE_DTYPES[run.cfg.save_dtype])
    ckpt.save_training_state(run.out, run.model, run.optimizer, run.generator, run.info)


def train(
    out: str | Path,
    cfg: TrainConfig,
    model_config: str | Path | dict[str, Any] | None = None,
    data: str | Path | None = None,
    tokenizer: str | Path | None = None,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train to `cfg.steps` total steps; see the module docstring. On resume, `overrides` (the settings the
    caller gave explicitly) replace the stored ones and `cfg` is ignored."""
    out = Path(out)
    run = _resume(out, overrides or {}) if resume else _start(out, cfg, model_config, data, tokenizer)
    cfg, model = run.cfg, run.model
    amp = AMP[cfg.dtype]
    if amp is not None:
        fp32_routers(model)
    tap = RouterTap.attach(model)
    gates = all_gates(model)
    if cfg.gamma > 0 and not any(g.e_score_correction_bias is not None for g in gates):
        log.warning("gamma %.g has no effect: this config's routers have no correction bias", cfg.gamma)
    val_windows = eval_windows(run.corpus.val, cfg.seq_len + 1, cfg.val_tokens)
    step, tokens = int(run.info["step"]), int(run.info["tokens"])
    elapsed0, t_session = float(run.info["elapsed_seconds"]), time.perf_counter()
    step_seconds: list[float] = []
    recent: list[StepStats] = []
    last_eval: EvalStats | None = None
    metrics = (out / ckpt.METRICS).open("a", encoding="utf-8")
    try:
        with Display(cfg.steps, step, cfg.log_every, progress) as display:
            while step < cfg.steps:
                windows = random_windows(run.corpus.train, cfg.batch, cfg.seq_len + 1, run.generator)
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
                stats = train_step(model, run.optimizer, windows, lr=lr, mtp_lambda=cfg.mtp_lambda, alpha=cfg.alpha,
                                   gamma=cfg.gamma, grad_clip=cfg.grad_clip, tap=tap, gates=gates, amp_dtype=amp)
                step, tokens = step + 1, tokens + stats.tokens
                run.info["tokens"] = tokens
                step_seconds.append(stats.seconds)
                recent = (recent + [stats])[-cfg.log_every:]
                row = {"step": step, **{k: getattr(stats, k) for k in StepStats.__slots__}}
                row["tokens_per_second"] = stats.tokens / stats.seconds
                metrics.write(json.dumps(row) + "\n")
                display.update(step, stats)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    last_eval = evaluate(model, val_windows, cfg.batch, gates, amp)
                    metrics.write(json.dumps({"step": step, "eval": asdict(last_eval)}) + "\n")
                    display.note(f"step {step}: validation loss {last_eval.loss:.4f} (MTP {last_eval.mtp:.4f}), "
                                 f"MaxVio {last_eval.max_vio:.3f}")
                if step % cfg.save_every == 0 or step == cfg.steps:
                    metrics.flush()
                    _save(run, step, elapsed0 + time.perf_counter() - t_session)
    finally:
        metrics.close()
        tap.detach()
    if last_eval is None:  # nothing left to train: report on the saved weights
        last_eval = evaluate(model, val_windows, cfg.batch, gates, amp)
    return TrainResult(
        out=str(out), step=step, tokens=tokens, seconds=round(elapsed0 + time.perf_counter() - t_session, 2),
        tokens_per_second=round(cfg.batch * cfg.seq_len / statistics.median(step_seconds), 1) if step_seconds else 0.0,
        train_loss=round(statistics.fmean(s.loss for s in recent), 4) if recent else float("nan"),
        train_max_vio=round(statistics.fmean(s.max_vio for s in recent), 4) if recent else float("nan"),
        val=asdict(last_eval),
    )
