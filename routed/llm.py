"""`LLM`: load a checkpoint folder and generate from it — the offline face of the engine.

`generate` / `chat` queue every prompt in an LLMEngine and step it until all are finished (continuous
batching over the paged latent cache, absorbed MLA), collecting text, token ids and finish reasons.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from routed.config import EngineConfig
from routed.engine.engine import LLMEngine
from routed.errors import RoutedError
from routed.sampling import SamplingParams

Message = dict[str, str]


@dataclass(slots=True)
class CompletionOutput:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop token or string) or "length"
    stop_reason: str | int | None = None


@dataclass(slots=True)
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds


class LLM:
    """`LLM(path).generate(prompts, SamplingParams(...))` and `.chat(messages, ...)`."""

    def __init__(
        self, model: str | Path, dtype: torch.dtype | str = torch.bfloat16, engine_config: EngineConfig | None = None,
        progress: bool = True,
    ) -> None:
        self.engine = LLMEngine.from_pretrained(model, dtype, engine_config, progress=progress)
        self.model, self.tokenizer = self.engine.model, self.engine.tokenizer

    def close(self) -> None:
        """Stop expert-parallel workers, if any (also done at exit)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API ---------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[CompletionOutput]:
        """Complete each prompt (text, or token ids). `on_text(row, delta)` streams text as it is decoded."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        return self.generate_ids(ids, params, on_text).outputs

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[CompletionOutput]:
        """Reply to one conversation (a list of {role, content}) or to several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=True)
               for c in conversations]  # type: ignore[arg-type]
        return self.generate_ids(ids, params, on_text).outputs

    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> GenerationStats:
        """Run every prompt through the engine (continuous batching) until all are finished."""
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompt_ids)
        if len(plist) != len(prompt_ids):
            raise RoutedError(f"got {len(plist)} sampling params for {len(prompt_ids)} prompts")
        rows: dict[str, int] = {}
        try:
            for row, (ids, p) in enumerate(zip(prompt_ids, plist)):
                rows[self.engine.add_request(ids, p)] = row
        except RoutedError as e:
            for request_id in rows:
                self.engine.abort(request_id)
            raise RoutedError(f"prompt {len(rows)}: {e}") from None
        outs = [CompletionOutput("", [], list(ids), "length") for ids in prompt_ids]
        start = time.perf_counter()
        first_token_at: float | None = None
        waiting_first = set(rows)
        while self.engine.has_unfinished():
            for o in self.engine.step():
                row = rows[o.request_id]
                waiting_first.discard(o.request_id)
                out = outs[row]
                out.token_ids.extend(o.new_token_ids)
                out.text += o.text
                if o.text and on_text:
                    on_text(row, o.text)
                if o.finished:
                    out.finish_reason, out.stop_reason = o.finish_reason or "length", o.stop_reason
            if first_token_at is None and not waiting_first:
                first_token_at = time.perf_counter()
        end = time.perf_counter()
        first_token_at = first_token_at or end
        return GenerationStats(
            prompt_tokens=sum(len(p) for p in prompt_ids),
            completion_tokens=sum(len(o.token_ids) for o in outs),
            prefill_seconds=first_token_at - start,
            decode_seconds=end - first_token_at,
            outputs=outs,
        )
