"""`LLM`: load a checkpoint folder and generate from it with a static batch over the latent cache.

Prompts are prefilled together (right-padded; padding writes past a row's end are masked and later
overwritten), then every row decodes one token per step with the absorbed MLA path until it hits EOS, a
stop token or string, or max_tokens. Continuous batching is the engine's job (routed.engine).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from routed.errors import RoutedError
from routed.loader import load_model, resolve_dtype
from routed.sampling import SamplingParams, sample
from routed.tokenizer import IncrementalDecoder, Tokenizer

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


class _StopText:
    """Incremental text with stop strings: releases only text that cannot be the start of a stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.released = stops, "", 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, delta: str) -> tuple[str, str | None]:
        """-> (text safe to emit now, the stop string hit or None)."""
        self.text += delta
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.released - len(stop)))
            if at >= 0:
                self.text = self.text[:at]
                return self._release(len(self.text)), stop
        return self._release(max(self.released, len(self.text) - self.hold)), None

    def flush(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.released = self.text[self.released:upto], max(self.released, upto)
        return out


class LLM:
    """`LLM(path).generate(prompts, SamplingParams(...))` and `.chat(messages, ...)`."""

    def __init__(self, model: str | Path, dtype: torch.dtype | str = torch.bfloat16, progress: bool = True) -> None:
        self.path = Path(model)
        self.model = load_model(self.path, resolve_dtype(dtype), progress=progress)
        self.tokenizer = Tokenizer.from_pretrained(self.path)
        self.config = self.model.config
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos

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

    @torch.inference_mode()
    def generate_ids(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> GenerationStats:
        B = len(prompt_ids)
        if B == 0:
            return GenerationStats()
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * B
        if len(plist) != B:
            raise RoutedError(f"got {len(plist)} sampling params for {B} prompts")
        self._check_prompts(prompt_ids, plist)
        lens = [len(p) for p in prompt_ids]
        T = max(lens)
        max_len = max(n + p.max_tokens for n, p in zip(lens, plist))
        cache = self.model.new_cache(B, max_len)
        generators = [p.generator() for p in plist]
        decoders = [IncrementalDecoder(self.tokenizer, skip_special_tokens=True) for _ in range(B)]
        stops = [_StopText(p.stop) for p in plist]
        outs = [CompletionOutput("", [], list(p), "length") for p in prompt_ids]
        done = [False] * B

        start = time.perf_counter()
        tokens = torch.zeros(B, T, dtype=torch.long)
        for row, p in enumerate(prompt_ids):
            tokens[row, : len(p)] = torch.tensor(p)
        positions = torch.arange(T).expand(B, T)
        hidden = self.model.forward_hidden(tokens, positions, cache, kv_len=T)
        logits = self.model.logits(hidden[torch.arange(B), torch.tensor(lens) - 1])
        prefill_done = time.perf_counter()

        pos = list(lens)
        for _ in range(max(p.max_tokens for p in plist)):
            next_ids = sample(logits, plist, generators).tolist()
            for row, tok in enumerate(next_ids):
                if not done[row]:
                    done[row] = self._accept(row, tok, outs[row], plist[row], decoders[row], stops[row], on_text)
            if all(done):
                break
            step = torch.tensor(next_ids).unsqueeze(1)
            hidden = self.model.forward_hidden(step, torch.tensor(pos).unsqueeze(1), cache, kv_len=max(pos) + 1)
            logits = self.model.logits(hidden[:, -1])
            pos = [p + 1 for p in pos]
        for row in range(B):  # rows that ran out of max_tokens keep their held-back text
            if outs[row].finish_reason == "length":
                tail = stops[row].push(decoders[row].flush())[0] + stops[row].flush()
                outs[row].text += tail
                if on_text and tail:
                    on_text(row, tail)
        end = time.perf_counter()
        return GenerationStats(
            prompt_tokens=sum(lens),
            completion_tokens=sum(len(o.token_ids) for o in outs),
            prefill_seconds=prefill_done - start,
            decode_seconds=end - prefill_done,
            outputs=outs,
        )

    # ---- helpers ------------------------------------------------------------------------------------
    def _check_prompts(self, prompt_ids: list[list[int]], plist: list[SamplingParams]) -> None:
        vocab = self.config.vocab_size
        for row, (p, sp) in enumerate(zip(prompt_ids, plist)):
            if not p:
                raise RoutedError(f"prompt {row} is empty")
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise RoutedError(f"prompt {row} has token id {bad[0]} outside the vocabulary (0..{vocab - 1})")
            if len(p) + sp.max_tokens > self.config.max_position_embeddings:
                raise RoutedError(
                    f"prompt {row} has {len(p)} tokens; with max_tokens {sp.max_tokens} that exceeds the "
                    f"model's context of {self.config.max_position_embeddings} tokens"
                )

    def _accept(
        self,
        row: int,
        tok: int,
        out: CompletionOutput,
        params: SamplingParams,
        decoder: IncrementalDecoder,
        stop_text: _StopText,
        on_text: Callable[[int, str], None] | None,
    ) -> bool:
        """Append one sampled token; return True when the row is finished."""
        out.token_ids.append(tok)
        if (tok in self.eos_token_ids and not params.ignore_eos) or tok in params.stop_token_ids:
            out.finish_reason, out.stop_reason = "stop", tok
            delta = stop_text.push(decoder.flush())[0] + stop_text.flush()
        else:
            delta, hit = stop_text.push(decoder.push(tok))
            if hit is not None:
                out.finish_reason, out.stop_reason = "stop", hit
            elif len(out.token_ids) < params.max_tokens:
                out.text += delta
                if on_text and delta:
                    on_text(row, delta)
                return False
        out.text += delta
        if on_text and delta:
            on_text(row, delta)
        return out.finish_reason == "stop" or len(out.token_ids) >= params.max_tokens
