"""Continuous batching: two queues and a token budget -> SchedulerOutput (plain data).

Each step: running requests first, in arrival order, each asking for all its uncomputed tokens (1 for a
decoding request, the rest of the prompt for one mid-prefill) capped by the remaining budget — that cap is
chunked prefill. When the cache has too few free blocks, the most recently admitted running request is
preempted (blocks freed, recomputed later). Then waiting requests are admitted in order while there is
budget, a free seat (max_num_seqs) and blocks for their first chunk; admission reuses prefix-cached blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from routed.config import EngineConfig
from routed.engine.kv_cache import BlockManager
from routed.engine.request import Request, Status


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    start: int  # first position computed this step (= tokens already in the cache)
    num_tokens: int  # tokens computed this step
    samples: bool  # whether this chunk reaches the end of the request's tokens, so a token is sampled
    draft: int | None = None  # a drafted token computed after the request's own tokens (speculative decoding)


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            draft = req.draft if req.draft is not None and n == req.num_tokens - req.num_computed == 1 \
                and budget >= 2 else None
            while not self.blocks.allocate(req, n + (draft is not None)):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.seqs.append(ScheduledSeq(req, req.num_computed, n, req.num_computed + n == req.num_tokens, draft))
                budget -= n + (draft is not None)
                i += 1
                continue
            break  # the request itself was preempted: nothing behind it can run either

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            self.blocks.admit(req)
            n = min(req.num_tokens - req.num_computed, budget)
            if not self.blocks.allocate(req, n):
                self.blocks.release(req)  # give back prefix hits; try again next step
                break
            self.waiting.popleft()
            self.blocks.record_admission(req)
            req.status = Status.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, req.num_computed, n, req.num_computed + n == req.num_tokens))
            budget -= n
        return out

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.blocks.release(req)
        req.status = Status.WAITING
        req.draft = None
        req.num_preemptions += 1
        self.waiting.appendleft(req)
        out.preempted.append(req.request_id)

    def finish(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks at once."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.release(req)
        req.status = Status.FINISHED
