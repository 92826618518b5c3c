"""Request state as the engine tracks it: token ids, progress through the cache, outputs. No tensors.

A request's tokens are `prompt_ids + output_ids`; `num_computed` of them have latents in the cache (in the
blocks of `block_table`). Preemption frees the blocks and sets `num_computed` to 0: the request is recomputed
from its tokens later, outputs included, so nothing it already produced is lost.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from routed.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely alternatives, best first


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    draft: int | None = None  # MTP's guess for the token after the last one, verified in the next step

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    text: str  # new text since the last output (stop strings and partial characters held back)
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
