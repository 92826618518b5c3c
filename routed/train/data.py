"""Training data: text files -> one token stream per split, tokenized once, sampled as random windows.

* `find_files(path, pattern)`: a file, or the files under a folder matching a glob (sorted, so the order and
  the split are the same on every run). `path = "stdlib"` names the Python standard library's own `.py`
  source (`sysconfig.get_paths()["stdlib"]`) without site-packages and test folders: a license-clean corpus
  present on every machine.
* `split_files`: every `val_every`-th file is held out for validation (a single file: its last
  1/`val_every` of characters), so validation text is never trained on.
* `tokenize_split`: each document is its tokens followed by EOS, concatenated into one int32 stream.
* `random_windows`: B windows of T + 1 tokens at uniform random offsets (inputs = [:, :-1], targets = [:, 1:]).
* `eval_windows`: a fixed set of non-overlapping windows spread evenly over the validation stream.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from routed.errors import RoutedError

STDLIB = "stdlib"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(slots=True)
class Corpus:
    train: torch.Tensor  # int32 [n_train] token stream
    val: torch.Tensor  # int32 [n_val]
    files: int  # documents read
    val_files: int

    def save(self, path: Path) -> None:
        save_file({"train": self.train, "val": self.val,
                   "counts": torch.tensor([self.files, self.val_files], dtype=torch.int64)}, str(path))

    @classmethod
    def load(cls, path: Path) -> Corpus:
        t = load_file(str(path))
        return cls(t["train"], t["val"], int(t["counts"][0]), int(t["counts"][1]))


def find_files(path: str | Path, pattern: str = "**/*.py") -> list[Path]:
    """The documents to train on, sorted; `stdlib` = the standard library's .py files (no tests)."""
    if str(path) == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        pattern = "**/*.py"
    else:
        root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise RoutedError(f"--data {path}: no such file or folder (give a text file, a folder, or 'stdlib')")
    files = sorted(p for p in root.glob(pattern)
                   if p.is_file() and not (_SKIP_DIRS & set(p.relative_to(root).parts[:-1])))
    if not files:
        raise RoutedError(f"--data {path}: no files match {pattern!r} (set --glob)")
    return files


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise RoutedError(f"{file}: cannot read ({e})") from None


def split_files(files: list[Path], val_every: int) -> tuple[list[str], list[str]]:
    """(train texts, validation texts): every val_every-th file held out, or a single file's tail."""
    if len(files) == 1:
        text = read_text(files[0])
        cut = len(text) - len(text) // val_every
        return [text[:cut]], [text[cut:]]
    train, val = [], []
    for i, f in enumerate(files):
        (val if i % val_every == val_every // 2 else train).append(read_text(f))
    return train, val


def tokenize_split(texts: list[str], encode: Callable[[str], list[int]], eos_id: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(encode(text))
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def build_corpus(train_texts: list[str], val_texts: list[str], encode: Callable[[str], list[int]],
                 eos_id: int, min_tokens: int) -> Corpus:
    corpus = Corpus(tokenize_split(train_texts, encode, eos_id), tokenize_split(val_texts, encode, eos_id),
                    len(train_texts) + len(val_texts), len(val_texts))
    for name, stream in (("training", corpus.train), ("validation", corpus.val)):
        if stream.numel() < min_tokens:
            raise RoutedError(f"the {name} split has {stream.numel()} tokens, fewer than one window of "
                              f"{min_tokens}; give more data or a shorter --seq-len")
    return corpus


def random_windows(stream: torch.Tensor, batch: int, window: int, g: torch.Generator) -> torch.Tensor:
    """[batch, window] int64 windows starting at uniform random offsets of the stream."""
    starts = torch.randint(0, stream.numel() - window + 1, (batch,), generator=g)
    return torch.stack([stream[s: s + window] for s in starts.tolist()]).long()


def eval_windows(stream: torch.Tensor, window: int, max_tokens: int) -> torch.Tensor:
    """[n, window] int64 windows spread evenly over the whole validation stream (every document gets its
    share, not just the first files), non-overlapping, n·window ≤ max(max_tokens, window)."""
    fit = stream.numel() // window
    n = max(1, min(fit, max_tokens // window))
    starts = torch.linspace(0, (fit - 1) * window, n).long() // window * window
    return torch.stack([stream[s: s + window] for s in starts.tolist()]).long()
