"""LLMEngine: `step()` = schedule -> run -> update, over a paged latent cache with continuous batching.

Single-threaded: call `add_request`, `abort` and `step` from one thread (the async engine runs this in a
background thread and hands it commands between steps).
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from routed.config import EngineConfig
from routed.engine.kv_cache import BlockManager
from routed.engine.request import Request, RequestOutput
from routed.engine.runner import ModelRunner, Sampled
from routed.engine.scheduler import Scheduler
from routed.errors import RoutedError
from routed.loader import load_model, resolve_dtype
from routed.model.deepseek_v3 import Transformer
from routed.parallel.ep import LoadSpec, launch, model_eps, torchrun_env
from routed.sampling import SamplingParams
from routed.telemetry import RoutingMonitor
from routed.tokenizer import IncrementalDecoder, Tokenizer

log = logging.getLogger(__name__)


class StopText:
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
        out, self.released = self.text[self.released : upto], max(self.released, upto)
        return out


@dataclass(slots=True)
class EngineStats:
    waiting: int
    running: int
    num_blocks: int
    free_blocks: int
    cache_usage: float
    prefix_cache_hit_rate: float
    preemptions: int
    spec_drafted: int = 0
    spec_accepted: int = 0

    @property
    def spec_acceptance_rate(self) -> float:
        return self.spec_accepted / self.spec_drafted if self.spec_drafted else 0.0


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        context = min(config.max_model_len or min(cfg.max_position_embeddings, 32768), cfg.max_position_embeddings)
        if config.speculative == "mtp" and not len(model.mtp):
            raise RoutedError("--speculative mtp needs a checkpoint with an MTP module (num_nextn_predict_layers "
                              "> 0) loaded with mtp=True")
        layers = cfg.num_hidden_layers + len(model.mtp)
        bytes_per_block = layers * cfg.latent_dim * model.dtype.itemsize * config.block_size
        by_memory = int(config.kv_cache_gb * 2**30 // bytes_per_block)
        by_seats = config.max_num_seqs * math.ceil(context / config.block_size)
        num_blocks = min(by_memory, by_seats)
        if num_blocks < 2:
            raise RoutedError(f"kv_cache_gb={config.kv_cache_gb} holds fewer than 2 cache blocks; give it more")
        self.max_model_len = min(context, num_blocks * config.block_size)
        if self.max_model_len < context:
            log.warning("the latent cache holds %d tokens: max_model_len capped from %d", self.max_model_len, context)
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.blocks)
        self.runner = ModelRunner(model, num_blocks, config.block_size, speculative=config.speculative == "mtp")
        self.drafted = self.accepted = 0  # speculative decoding: drafts verified, drafts accepted
        self.routing = RoutingMonitor(model, config.routing_window_tokens, record_path=config.record_routing)
        switched = False
        for _, gate in model.gates():
            switched |= gate.counting != config.routing_telemetry
            gate.counting = config.routing_telemetry
        for layer in model.mtp:  # the monitor reads the main layers' routers only
            layer.mlp.gate.counting = False
        if switched and getattr(model, "_one_token_plan", None) is not None:
            model.compile_decode(progress=True)  # the compiled step for this telemetry setting now, not later
        self.requests: dict[str, Request] = {}
        self._text: dict[str, tuple[IncrementalDecoder, StopText]] = {}
        self._ids = itertools.count()
        self.preemptions = 0
        eos = set(cfg.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = eos

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype | str = torch.bfloat16, config: EngineConfig | None = None,
        progress: bool = True,
    ) -> LLMEngine:
        config = config or EngineConfig()
        mtp = config.speculative == "mtp"
        if config.ep > 1 or torchrun_env():
            if config.max_ram_gb:
                raise RoutedError("expert parallelism and --max-ram (expert offload) do not combine; pick one")
            spec = LoadSpec(str(path), str(resolve_dtype(dtype)).removeprefix("torch."), mtp, config.quant,
                            config.placement, threads=max(1, torch.get_num_threads() // config.ep))
            model = launch(spec, config.ep, config.ep_timeout_s, progress)
        else:
            model = load_model(path, resolve_dtype(dtype), progress=progress, mtp=mtp, quant=config.quant,
                               max_ram_gb=config.max_ram_gb, routing_telemetry=config.routing_telemetry)
        try:
            return cls(model, Tokenizer.from_pretrained(path), config)
        except BaseException:
            if getattr(model, "ep_group", None) is not None:
                model.ep_group.close()
            raise

    def close(self) -> None:
        """Stop the expert-parallel workers, if any (idempotent)."""
        if (group := getattr(self.model, "ep_group", None)) is not None:
            group.close()

    def ranks(self) -> list[dict] | None:
        """Expert-parallel ranks (pid, alive, expert pairs computed), or None without expert parallelism."""
        group = getattr(self.model, "ep_group", None)
        return group.ranks(self.model) if group is not None else None

    def reset_routing(self) -> None:
        """Zero the routing telemetry (both windows, alerts) and the per-rank expert counters."""
        self.routing.reset()
        for ep in model_eps(self.model):
            ep.slot_tokens.zero_()

    def check_ranks(self) -> None:
        """Raise RankFailed if an expert-parallel worker has died (cheap; called between steps)."""
        if (group := getattr(self.model, "ep_group", None)) is not None:
            group.check()

    # ---- requests -----------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; a RoutedError says what is wrong with it (empty, bad ids, too long)."""
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RoutedError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_ids, params)
        req = Request(request_id, list(prompt_ids), params)
        self.requests[request_id] = req
        self._text[request_id] = (IncrementalDecoder(self.tokenizer, skip_special_tokens=True), StopText(params.stop))
        self.scheduler.add(req)
        return request_id

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RoutedError if the request cannot run; reads nothing that step() changes (thread-safe)."""
        vocab = self.model.config.vocab_size
        if not prompt_ids:
            raise RoutedError("the prompt is empty")
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RoutedError(f"the prompt has a token id outside the vocabulary (0..{vocab - 1})")
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise RoutedError(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens {params.max_tokens} that exceeds the "
                f"context of {self.max_model_len} tokens"
            )

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its cache blocks at once; False if it is unknown or already done."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        req.finish_reason = "abort"
        self._finish(req)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self.scheduler.waiting), running=len(self.scheduler.running),
            num_blocks=self.blocks.num_blocks, free_blocks=self.blocks.num_free, cache_usage=self.blocks.usage,
            prefix_cache_hit_rate=self.blocks.hit_rate, preemptions=self.preemptions,
            spec_drafted=self.drafted, spec_accepted=self.accepted,
        )

    # ---- the loop ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.preemptions += len(sched.preempted)
        if not sched.seqs:
            return []
        sampled = self.runner.run(sched)
        if self.config.routing_telemetry:
            self.routing.collect()
        outputs = []
        for s in sched.seqs:
            req = s.request
            result = sampled.get(req.request_id)
            req.num_computed += s.num_tokens + (1 if result is not None and result.accepted else 0)
            self.blocks.commit(req)
            if result is None:
                continue
            if result.accepted is not None:
                self.drafted += 1
                self.accepted += result.accepted
            outputs.append(self._append(req, result))
        return outputs

    def _append(self, req: Request, sampled: Sampled) -> RequestOutput:
        """Append the step's token(s) one by one, stopping at the first that finishes the request."""
        decoder, stop_text = self._text[req.request_id]
        params, new_ids, text = req.params, [], ""
        for tok in sampled.token_ids:
            req.output_ids.append(tok)
            new_ids.append(tok)
            if (tok in self.eos_token_ids and not params.ignore_eos) or tok in params.stop_token_ids:
                req.finish_reason, req.stop_reason = "stop", tok
                text += stop_text.push(decoder.flush())[0] + stop_text.flush()
                break
            delta, hit = stop_text.push(decoder.push(tok))
            text += delta
            if hit is not None:
                req.finish_reason, req.stop_reason = "stop", hit
                break
            if len(req.output_ids) >= params.max_tokens or req.num_tokens >= self.max_model_len:
                req.finish_reason = "length"
                text += stop_text.push(decoder.flush())[0] + stop_text.flush()
                break
        req.draft = sampled.draft if req.finish_reason is None else None
        out = RequestOutput(
            req.request_id, new_ids, text, finished=req.finish_reason is not None, finish_reason=req.finish_reason,
            stop_reason=req.stop_reason, prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.num_cached_tokens, logprobs=sampled.logprobs[: len(new_ids)],
        )
        if out.finished:
            self._finish(req)
        return out

    def _finish(self, req: Request) -> None:
        self.scheduler.finish(req)
        self.runner.forget(req.request_id)
        self.requests.pop(req.request_id, None)
        self._text.pop(req.request_id, None)
