"""SchedulerOutput -> batch tensors -> model -> sampled token ids (and logprobs).

All scheduled tokens of the step are flattened into one row, so dense and MoE layers run once over every
token of every request (routed experts see all the step's tokens grouped by expert); attention runs per
request over its own blocks (see `routed.model.attention.paged_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routed.engine.request import TokenLogprob
from routed.engine.scheduler import SchedulerOutput
from routed.model.attention import PagedBatch
from routed.model.deepseek_v3 import Transformer
from routed.sampling import sample_one


@dataclass(slots=True)
class Sampled:
    token_id: int
    logprob: TokenLogprob | None


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        self.cache = model.new_cache(num_blocks * block_size)
        self.generators: dict[str, torch.Generator | None] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        positions = torch.arange(start, end)
        table = torch.tensor(block_table)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> dict[str, Sampled]:
        ids, positions, slots, bounds, key_slots, last = [], [], [], [], [], []
        offset = 0
        for s in sched.seqs:
            req, end = s.request, s.start + s.num_tokens
            ids.extend(req.all_ids[s.start : end])
            positions.append(torch.arange(s.start, end))
            slots.append(self._slots(req.block_table, s.start, end))
            key_slots.append(self._slots(req.block_table, 0, end))
            bounds.append((offset, offset + s.num_tokens))
            offset += s.num_tokens
            if s.samples:
                last.append(offset - 1)
        batch = PagedBatch(self.cache, torch.cat(slots), bounds, key_slots)
        hidden = self.model.forward_hidden(torch.tensor([ids]), torch.cat(positions).unsqueeze(0), batch)
        if not last:
            return {}
        logits = self.model.logits(hidden[0, last])
        out: dict[str, Sampled] = {}
        for row, s in enumerate(x for x in sched.seqs if x.samples):
            req = s.request
            if req.request_id not in self.generators:
                self.generators[req.request_id] = req.params.generator()
            token = sample_one(logits[row], req.params, req.output_ids, self.generators[req.request_id])
            out[req.request_id] = Sampled(token, self._logprob(logits[row], token, req.params.logprobs))
        return out

    @staticmethod
    def _logprob(logits_V: torch.Tensor, token: int, top_n: int | None) -> TokenLogprob | None:
        """The model's own log-probabilities (before penalties and temperature), as OpenAI reports them."""
        if top_n is None:
            return None
        logp = logits_V.log_softmax(-1)
        top = logp.topk(top_n) if top_n else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return TokenLogprob(token, float(logp[token]), alternatives)
