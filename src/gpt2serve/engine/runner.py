"""The execution path, chosen once at load: how a scheduled step becomes sampled tokens.

One runner per device and configuration (`choose_runner`; the start-up log names it):

  eager        every step through the model's forward, op by op, with the kernels the
               weights were loaded for (--enforce_eager; CPU without our C kernels, e.g.
               GPT2SERVE_C_KERNELS=0; CUDA when no KV block can be spared)
  plan         CPU, fp32 or int8 weights in fused layers with our attention kernel:
               decode-only steps replay a plan of kernel calls bound to fixed buffers
               (decode_plan.py), and with fp32 weights greedy or top-k rows read the LM
               head's int8 screen (packing.HeadScreen)
  cuda-graphs  CUDA: decode-only steps replay captured graphs (cuda_graphs.py)

Steps with prompt chunks run eagerly on every runner. Each runner takes a ScheduledStep and
returns a StepOutput: it builds the step's tensors, runs the pass, takes the rows of logits
that are sampled (or scored) and samples them; the network itself (model.py) chooses nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import kernels, metrics
from ..model import GPT, Group, KVCache
from ..packing import HeadScreen
from .cuda_graphs import DecodeGraphs
from .decode_plan import DecodePlan
from .kv_cache import BlockManager
from .sampler import Sampled, Sampler, prompt_logprobs
from .scheduler import Chunk, ScheduledStep
from .sequence import Request, Sequence

log = logging.getLogger("gpt2serve.engine")

BetweenLayers = Callable[[], None] | None


@dataclass
class StepOutput:
    """What a step produced: a token for each of `rows` (sequences that failed alone are in
    `failed` instead), and the log-probabilities of prompt tokens that were asked for."""

    rows: list[Sequence] = field(default_factory=list)
    sampled: list[Sampled] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    prompt_logprobs: list[tuple[Request, list]] = field(default_factory=list)


class EagerRunner:
    name = "eager"

    def __init__(self, model: GPT, cache: KVCache, sampler: Sampler,
                 attention_in_place: bool = True):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.device = cache.kv.device
        # Decode rows and prompt chunks attend in place through their block tables where our
        # C kernels serve the cache (kernels.decode_attention, kernels.prompt_attention),
        # instead of gathering their blocks. `attention_in_place` False keeps torch's ops:
        # the "eager-torch-attention" runner, the reference the other runners are tested on.
        rows = next(model.parameters()).dtype  # (the model's: the cache may be another)
        self.in_place = attention_in_place and kernels.runs_decode_attention(cache.kv, rows)
        self.prompt_in_place = (attention_in_place
                                and kernels.runs_prompt_attention(cache.kv, rows))

    @classmethod
    def declines(cls, model: GPT, cache: KVCache) -> str | None:
        """Why this runner cannot serve the model and cache; None if it can."""
        return None

    def describe(self) -> str:
        attention = ("attention in place through the block tables" if self.in_place else
                     "attention by torch's ops on gathered blocks")
        return f"every step op by op through the model, {attention}"

    def execute(self, step: ScheduledStep, between_layers: BetweenLayers = None) -> StepOutput:
        """Run the step's pass and sample its rows. `between_layers` (only called for steps
        with decode rows) may run a pass of its own between two layers (GPT.forward)."""
        out = StepOutput()
        if step.decode and not step.chunks:
            logits = self.decode(step.decode, between_layers)
        else:
            groups = [self._decode_group(step.decode)] if step.decode else []
            groups.append(self._chunk_group(step.chunks))
            hidden = self.model.forward(self.cache, groups,
                                        between_layers if step.decode else None)
            logits = self._logits(step, hidden, out)
        if step.rows:
            self.sample(logits, step.rows, out)
        return out

    def decode(self, seqs: list[Sequence], between_layers: BetweenLayers) -> Tensor:
        """Logits [B, V] of a decode-only step's rows. A runner may leave -inf where a row's
        sampling cannot pick the token (the plan runner's screen)."""
        hidden = self.model.forward(self.cache, [self._decode_group(seqs)], between_layers)
        return self.model.logits(hidden[0])

    # ---- tensors ------------------------------------------------------------------------

    def _decode_group(self, seqs: list[Sequence]) -> Group:
        tokens, positions, tables = decode_inputs(seqs)
        return Group(self.cache, torch.tensor(tokens, device=self.device)[:, None],
                     torch.tensor(positions, device=self.device), self._table(tables),
                     in_place=self.in_place)

    def _chunk_group(self, chunks: list[Chunk]) -> Group:
        width = max(c.length for c in chunks)
        tokens = torch.zeros(len(chunks), width, dtype=torch.long)
        for row, c in enumerate(chunks):
            tokens[row, :c.length] = torch.tensor(c.request.prompt_ids[c.start:c.start + c.length])
        return Group(self.cache, tokens.to(self.device),
                     torch.tensor([c.start for c in chunks], device=self.device),
                     self._table([c.request.blocks for c in chunks]),
                     torch.tensor([c.length for c in chunks], device=self.device),
                     in_place=self.prompt_in_place)

    def _table(self, block_lists: list[list[int]]) -> Tensor:
        """Block tables [N, widest] (padding points at block 0 and is never attended to)."""
        width = max(map(len, block_lists))
        return torch.tensor([b + [0] * (width - len(b)) for b in block_lists],
                            device=self.device)

    def _logits(self, step: ScheduledStep, hidden: list[Tensor], out: StepOutput) -> Tensor:
        """Logits of the rows sampled, in step.rows' order, in one product: every decode row,
        the last row of each prompt read to its end (once for all its sequences), and every
        row of a prompt whose tokens are scored (OpenAI's echo with logprobs), which go to
        out.prompt_logprobs."""
        decode = len(step.decode)
        picked = [hidden[0]] if decode else []
        scored, first_token_rows = [], []
        chunk_hidden = hidden[-1].view(len(step.chunks), -1, hidden[-1].shape[-1])
        offset = decode
        for row, c in enumerate(step.chunks):
            if c.request.wants_prompt_logprobs is not None:
                picked.append(chunk_hidden[row, :c.length])
                scored.append((c, offset))
                offset += c.length
            elif c.last:
                picked.append(chunk_hidden[row, c.length - 1:c.length])
                offset += 1
            if c.last:
                first_token_rows += [offset - 1] * len(c.request.seqs)
        if not picked:
            return hidden[-1][:0]
        logits = self.model.logits(torch.cat(picked))
        for c, at in scored:
            request = c.request
            following = request.prompt_ids[c.start + 1:c.start + c.length + 1]
            out.prompt_logprobs.append((request, prompt_logprobs(
                logits[at:at + c.length], following, request.wants_prompt_logprobs)))
        rows = list(range(decode)) + first_token_rows
        if not rows:  # (prompt rows scored, none sampled)
            return logits[:0]
        if rows != list(range(len(logits))):  # (a decode step's rows are all in order)
            logits = logits[torch.tensor(rows, device=self.device)]
        return logits

    # ---- sampling -----------------------------------------------------------------------

    def sample(self, logits: Tensor, seqs: list[Sequence], out: StepOutput) -> None:
        """A token for each sequence from its row of logits, in one batched pass. Every
        sampling row's uniform number is drawn first, so should that pass fail, each row is
        retried alone with the number it had: only the rows that fail are failed, and the
        others draw what they would have."""
        live = [i for i, s in enumerate(seqs) if not s.finish_reason]  # siblings may have failed
        if len(live) < len(seqs):
            logits, seqs = logits[torch.tensor(live, device=logits.device)], [seqs[i] for i in live]
        if not seqs:
            return
        self._sample(logits, seqs, self.sampler.uniforms(seqs), out)

    def _sample(self, logits: Tensor, seqs: list[Sequence], uniforms: list[float | None],
                out: StepOutput) -> None:
        try:
            sampled = self.sampler.sample(logits, seqs, uniforms)
        except Exception as e:
            if len(seqs) == 1:
                log.exception("sampling failed")
                out.failed.append((seqs[0], e))
                return
            log.exception("batched sampling failed; sampling each sequence alone")
            for i, seq in enumerate(seqs):
                self._sample(logits[i:i + 1], [seq], uniforms[i:i + 1], out)
            return
        out.rows += seqs
        out.sampled += sampled


class PlanRunner(EagerRunner):
    name = "plan"

    def __init__(self, model: GPT, cache: KVCache, sampler: Sampler, max_batch_size: int,
                 context: int, screen: bool = True,
                 screen_outcomes: dict | None = None):
        super().__init__(model, cache, sampler)
        self.plan = DecodePlan(model, cache, max_batch_size, context)
        self.screen = HeadScreen.of(model.head) if screen else None
        # the model's gpt2serve_head_screen_steps_total counters, by outcome
        self.screen_outcomes = screen_outcomes or metrics.ModelMetrics().head_screen

    @classmethod
    def declines(cls, model: GPT, cache: KVCache) -> str | None:
        if DecodePlan.serves(model, cache):
            return None
        return ("the layers are not fused or attention is not our C kernel's (fp16/bf16 "
                "weights, not on CPU, GPT2SERVE_C_KERNELS=0, no AVX2, or an activation "
                "other than GELU's tanh form)")

    def describe(self) -> str:
        screen = ("greedy and top-k rows read the LM head's int8 screen" if self.screen
                  else "no int8 screen of the LM head")
        return f"decode steps replay bound kernel calls; {screen}"

    def decode(self, seqs: list[Sequence], between_layers: BetweenLayers) -> Tensor:
        """Where each row's token depends on its k largest logits alone (greedy decoding,
        top-k sampling), the head's screen computes just those: the same k largest logits
        for the sampler, from the head's int8 copy and the few panels that can hold them."""
        hidden = self.plan.run(*decode_inputs(seqs), between_layers)
        screen = self.screen
        ks = self.sampler.largest_needed(seqs) if screen is not None else None
        if ks is None:
            return self.plan.logits(len(seqs))
        m, k, start = len(seqs), max(ks), time.perf_counter()
        screened = screen.serves(m) and screen.choice.screens(m, k) and screen.promising(ks)
        logits = screen.logits(hidden, ks, self.model.ln_f) if screened else None
        if screened:
            self.screen_outcomes["decided" if logits is not None else "full"].inc()
        if logits is None:
            logits = self.plan.logits(m)
        screen.choice.observe(m, k, screened, time.perf_counter() - start)
        return logits


class CudaGraphRunner(EagerRunner):
    name = "cuda-graphs"

    def __init__(self, model: GPT, cache: KVCache, sampler: Sampler, max_batch_size: int,
                 context: int, scratch_block: int):
        super().__init__(model, cache, sampler)
        self.graphs = DecodeGraphs(model, cache, max_batch_size, context, scratch_block,
                                   capture=self.device.type == "cuda")

    @classmethod
    def declines(cls, model: GPT, cache: KVCache) -> str | None:
        return None  # (off CUDA its steps run uncaptured: padded fixed shapes, for tests)

    def describe(self) -> str:
        captured = "captured" if self.graphs.capture else "uncaptured (not on CUDA)"
        return f"decode steps replay CUDA graphs, {captured}"

    def decode(self, seqs: list[Sequence], between_layers: BetweenLayers) -> Tensor:
        logits = self.graphs.run(*decode_inputs(seqs))
        if between_layers is not None:  # prompts that arrived wait for the step: it is short
            between_layers()
        return logits


def decode_inputs(seqs: list[Sequence]) -> tuple[list[int], list[int], list[list[int]]]:
    """Each decode row's token, position and block table."""
    return [s.tokens[-1] for s in seqs], [s.length - 1 for s in seqs], [s.blocks for s in seqs]


RUNNERS = ("eager", "plan", "plan-unscreened", "cuda-graphs", "eager-torch-attention")


def choose_runner(model: GPT, cache: KVCache, sampler: Sampler, blocks: BlockManager,
                  max_batch_size: int, context: int, enforce_eager: bool,
                  name: str | None = None) -> EagerRunner:
    """The runner for this model, cache and configuration (`name` forces one of RUNNERS:
    tests and benchmarks; ValueError where it declines). CUDA graphs take a cache block
    for good, for their padding rows."""
    if name is None:
        name = _default_runner(model, cache, blocks, context, enforce_eager)
    if name not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {name!r}")
    if name.startswith("eager"):
        return EagerRunner(model, cache, sampler, attention_in_place=name == "eager")
    if name.startswith("plan"):
        if why := PlanRunner.declines(model, cache):
            raise ValueError(f"the plan runner cannot serve this model: {why}")
        return PlanRunner(model, cache, sampler, max_batch_size, context,
                          screen=name == "plan", screen_outcomes=blocks.metrics.head_screen)
    if blocks.available <= blocks.blocks_for(context):
        raise ValueError("CUDA graphs need a KV-cache block to spare for padding rows")
    return CudaGraphRunner(model, cache, sampler, max_batch_size, context, blocks.set_aside())


def _default_runner(model: GPT, cache: KVCache, blocks: BlockManager, context: int,
                    enforce_eager: bool) -> str:
    if enforce_eager:
        log.info("runner: eager (--enforce_eager)")
        return "eager"
    if cache.kv.device.type == "cuda":
        if blocks.available > blocks.blocks_for(context):
            return "cuda-graphs"
        log.info("runner: eager (CUDA graphs declined: the KV cache has no block to spare "
                 "for padding rows beside a full-context sequence)")
        return "eager"
    if why := PlanRunner.declines(model, cache):
        log.info("runner: eager (the plan runner declined: %s)", why)
        return "eager"
    return "plan"
