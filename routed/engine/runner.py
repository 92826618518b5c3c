"""SchedulerOutput -> batch tensors -> model -> sampled token ids (and logprobs, and MTP drafts).

All scheduled tokens of the step are flattened into one row, so dense and MoE layers run once over every
token of every request (routed experts see all the step's tokens grouped by expert); attention runs per
request over its own blocks (see `routed.model.attention.paged_attention`).

Speculative decoding with MTP (greedy requests): a decoding request carries a draft d for the position after
its last token; the step computes [last, d] and reads two sets of logits. If the first argmax equals d, d is
accepted and the second argmax comes free (2 tokens); otherwise the first argmax is the one new token. Then
the MTP module runs over the step's verified positions i (its own cache layer), fed the main hidden h_i and
the token t_{i+1}; its output at the last position drafts the token after the new last one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from routed.engine.request import TokenLogprob
from routed.engine.scheduler import ScheduledSeq, SchedulerOutput
from routed.model.attention import PagedBatch
from routed.model.deepseek_v3 import Transformer
from routed.parallel.ep import RankFailed
from routed.sampling import greedy_ids, sample_one


@dataclass(slots=True)
class Sampled:
    token_ids: list[int]  # 1, or 2 when a draft was accepted
    logprobs: list[TokenLogprob] = field(default_factory=list)
    accepted: bool | None = None  # None: no draft was verified
    draft: int | None = None  # the next draft, when speculating


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int, speculative: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        self.speculative = speculative
        self.cache = model.new_cache(num_blocks * block_size)
        self.generators: dict[str, torch.Generator | None] = {}
        self.ep = getattr(model, "ep_group", None)  # expert parallelism: workers mirror every model call
        if self.ep is not None:
            self.ep.send(("cache", (num_blocks * block_size,), None))
            self.ep.send(("set_impl", (model.attn_impl,), None))

    def _call(self, op: str, args: tuple, batch: PagedBatch) -> torch.Tensor:
        """model.op(*args, batch) here, and on every expert-parallel worker over its own cache."""
        if self.ep is None:
            return getattr(self.model, op)(*args, batch)
        try:
            with self.ep.lock:  # no heartbeat between the command and the step's collectives
                self.ep.send((op, args, (batch.slots_N, batch.seq_bounds, batch.key_slots)))
                return getattr(self.model, op)(*args, batch)
        except RankFailed as e:  # a collective inside the model failed: say which rank, if known
            raise self.ep.diagnose(str(e)) from None

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _paged(self, spans: list[tuple[list[int], int, int]]) -> tuple[torch.Tensor, PagedBatch]:
        """The positions [1, N] and the PagedBatch of each sequence's tokens [start, stop), given its block table.

        One pass per sequence: its context's slots, whose tail is what the step's tokens write. Built in numpy
        and handed to torch once per tensor — as torch ops (arange, index, cat, twice per sequence) they took
        ~0.3 ms of a decode step on `small` (int4: ~20 ms), each call slow right after the step's weights went
        through the caches."""
        bs = self.block_size
        positions, slots, key_slots, bounds, offset = [], [], [], [], 0
        for table, start, stop in spans:
            context = np.arange(stop)
            keys = np.asarray(table, dtype=np.int64)[context // bs] * bs + context % bs
            key_slots.append(torch.from_numpy(keys))
            slots.append(keys[start:stop])  # the step's tokens write the last slots of their context
            positions.append(context[start:stop])
            bounds.append((offset, offset + stop - start))
            offset += stop - start
        batch = PagedBatch(self.cache, torch.from_numpy(np.concatenate(slots)), bounds, key_slots)
        return torch.from_numpy(np.concatenate(positions)).unsqueeze(0), batch

    @torch.inference_mode()
    def run(self, sched: SchedulerOutput) -> dict[str, Sampled]:
        ids, spans, rows = [], [], []
        offset = 0
        for s in sched.seqs:
            req = s.request
            end = s.start + s.num_tokens + (s.draft is not None)
            ids.extend(req.all_ids[s.start : s.start + s.num_tokens] + ([s.draft] if s.draft is not None else []))
            spans.append((req.block_table, s.start, end))
            rows.append(offset)
            offset += end - s.start
        positions, batch = self._paged(spans)
        ids_BT = torch.tensor([ids])
        sampling = [(s, first + s.num_tokens - 1) for s, first in zip(sched.seqs, rows) if s.samples]
        if (len(ids) == 1 and sampling and not self.speculative and self.ep is None
                and (logits := self.model.decode_logits(ids_BT, positions, batch)) is not None):
            return {sampling[0][0].request.request_id: self._sample(sampling[0][0], logits)}  # decode at batch 1
        hidden = self._call("forward_hidden", (ids_BT, positions), batch)
        out = {}
        if sampling:  # one lm_head matmul over every row that samples (the last row, and the draft's row)
            logit_rows = [r + i for s, r in sampling for i in range(2 if s.draft is not None else 1)]
            logits = self.model.logits(hidden[0, logit_rows])
            at = 0
            for s, _ in sampling:
                n_rows = 2 if s.draft is not None else 1
                out[s.request.request_id] = self._sample(s, logits[at : at + n_rows])
                at += n_rows
        if self.speculative:
            self._draft(sched, rows, hidden[0], out)
        return out

    def _sample(self, s: ScheduledSeq, logits: torch.Tensor) -> Sampled:
        """Sample the next token from the logits after the request's last token; verify the draft if any."""
        req = s.request
        if req.request_id not in self.generators:
            self.generators[req.request_id] = req.params.generator()
        token = sample_one(logits[0], req.params, req.output_ids, self.generators[req.request_id])
        result = Sampled([token], [lp] if (lp := self._logprob(logits[0], token, req.params.logprobs)) else [])
        if s.draft is not None:
            result.accepted = token == s.draft
            if result.accepted:
                bonus = sample_one(logits[1], req.params, req.output_ids + [token], self.generators[req.request_id])
                result.token_ids.append(bonus)
                if (lp := self._logprob(logits[1], bonus, req.params.logprobs)) is not None:
                    result.logprobs.append(lp)
        return result

    def _draft(self, sched: SchedulerOutput, rows: list[int], hidden_ND: torch.Tensor,
               out: dict[str, Sampled]) -> None:
        """Run MTP over each sequence's verified positions; draft for greedy requests that sampled."""
        h_rows, next_ids, spans, last = [], [], [], []
        offset = 0
        for s, first in zip(sched.seqs, rows):
            req = s.request
            if not req.params.greedy:  # only greedy requests are drafted for; others skip the MTP
                continue
            sampled = out.get(req.request_id)
            tokens = req.all_ids + (sampled.token_ids if sampled else [])
            valid = s.num_tokens + (1 if sampled is not None and sampled.accepted else 0)
            stop = min(s.start + valid, len(tokens) - 1)  # position i needs t_{i+1}
            if stop <= s.start:
                continue
            h_rows.extend(range(first, first + stop - s.start))
            next_ids.extend(tokens[s.start + 1 : stop + 1])
            spans.append((req.block_table, s.start, stop))
            offset += stop - s.start
            if sampled is not None and stop == len(tokens) - 1:
                last.append((req.request_id, offset - 1))
        if not h_rows:
            return
        positions, batch = self._paged(spans)
        mtp_hidden = self._call("forward_mtp", (hidden_ND[h_rows].unsqueeze(0), torch.tensor([next_ids]), 0,
                                                positions), batch)
        if last:
            drafts = greedy_ids(self.model.logits(mtp_hidden[0, [row for _, row in last]]))
            for (request_id, _), draft in zip(last, drafts):
                out[request_id].draft = draft

    @staticmethod
    def _logprob(logits_V: torch.Tensor, token: int, top_n: int | None) -> TokenLogprob | None:
        """The model's own log-probabilities (before penalties and temperature), as OpenAI reports them."""
        if top_n is None:
            return None
        logp = logits_V.log_softmax(-1)
        top = logp.topk(top_n) if top_n else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        return TokenLogprob(token, float(logp[token]), alternatives)
