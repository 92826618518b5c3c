"""Training progress: a rich bar with loss, tokens/s and MaxVio on a terminal, plain log lines elsewhere.

`Display(total, start, enabled)` is a context manager; `update(step, stats)` after every step,
`note(text)` for evaluations and saves. When stderr is not a terminal (a background run writing to a
file) it prints one line every `log_every` steps instead of redrawing a bar.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from routed.train.steps import StepStats


class Display:
    def __init__(self, total: int, start: int, log_every: int, enabled: bool = True) -> None:
        self.total, self.start, self.log_every, self.enabled = total, start, log_every, enabled
        self.console = Console(stderr=True)
        self.bar: Progress | None = None
        self.task = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> Display:
        if self.enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("MaxVio {task.fields[mv]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.total, completed=self.start,
                                          loss="-", tps="-", mv="-")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.__exit__(exc_type, exc, tb)

    def update(self, step: int, stats: StepStats) -> None:
        tps = stats.tokens / stats.seconds if stats.seconds else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{stats.loss:.3f}", tps=f"{tps:,.0f}",
                            mv=f"{stats.max_vio:.2f}")
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            elapsed = time.perf_counter() - self.t0
            print(f"step {step}/{self.total}  loss {stats.loss:.4f} (main {stats.main:.4f}, mtp {stats.mtp:.4f}, "
                  f"bal {stats.balance:.4f})  lr {stats.lr:.2e}  gnorm {stats.grad_norm:.2f}  "
                  f"{tps:,.0f} tok/s  MaxVio {stats.max_vio:.3f}  {elapsed:.0f}s", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)
