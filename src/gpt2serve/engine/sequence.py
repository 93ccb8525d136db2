"""Requests and their sequences: tokens in, text out.

A `Request` is one prompt of a client's call; the prompts of one call share an event queue, so
they are queued, streamed and cancelled together. Each request runs `n` `Sequence`s. A sequence
takes the sampler's tokens one at a time and says what text to emit: it detokenizes
incrementally, ends at EOS, at its length or at a stop string, and holds back the text that
could still turn out to begin a stop string.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from torch import Tensor

from ..sampling import RandomStream, SamplingParams
from ..tokenizer import IncrementalDetokenizer, Tokenizer
from .sampler import Sampled


@dataclass
class Prompt:
    """What a front end hands the engine: token ids, validated parameters, and how errors
    should name this prompt (e.g. "instances[2]"; empty for a call with one prompt)."""

    ids: list[int]
    params: SamplingParams
    name: str = ""
    prompt_logprobs: int | None = None  # also score the prompt's own tokens, with top-k


@dataclass
class TokenEvent:
    """One step of one sequence: a new token and the text it completed (may be empty)."""

    index: int  # which of the request's n sequences
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"


@dataclass
class Completion:
    """One finished sequence, accumulated from its TokenEvents."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, ev: TokenEvent) -> None:
        self.text += ev.text
        if ev.token_id is not None:
            self.token_ids.append(ev.token_id)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
                self.top_logprobs.append(ev.top_logprobs or [])
        if ev.finish_reason:
            self.finish_reason = ev.finish_reason


class Request:
    """One prompt of a call. `index` is its place in the call; `events` is the call's queue,
    which receives (index, TokenEvent) pairs, or an exception that ends the whole call. A
    call that is not `streamed` wants whole completions: its events are held on the step
    thread (`held`) and handed over when a sequence ends (engine.loop.Outbox)."""

    def __init__(self, prompt: Prompt, index: int, max_new: int, events: asyncio.Queue,
                 loop: asyncio.AbstractEventLoop, streamed: bool = True):
        self.prompt_ids, self.params, self.max_new = prompt.ids, prompt.params, max_new
        self.index, self.events, self.loop = index, events, loop
        self.streamed = streamed
        self.held: list[TokenEvent] = []
        self.arrival = time.monotonic()
        self.cancelled = False
        self.failed_beside = False  # cancelled as its call failed, its client still there
        self.seqs: list[Sequence] = []
        self.blocks: list[int] = []  # the prompt's KV-cache blocks, once admitted
        self.prefilled = 0  # prompt tokens read so far
        self.cached_tokens = 0  # of which taken from the prefix cache
        self.prefix_keys: list[bytes] = []  # its full prompt blocks' (kv_cache.prefix_keys)
        self.wants_prompt_logprobs = prompt.prompt_logprobs
        # (logprob, top) of each prompt token after the first, filled as chunks are read
        self.prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] = []

    def start(self, tokenizer: Tokenizer, eos_id: int | None) -> list[Sequence]:
        """Its n sequences, each with its own random stream. Their detokenizers start from
        the prompt's last tokens (a token-id prompt may end inside a UTF-8 character)."""
        self.seqs = [Sequence(self, i, random,
                              IncrementalDetokenizer(tokenizer, self.prompt_ids), eos_id)
                     for i, random in enumerate(self.params.streams())]
        return self.seqs

    def fail(self) -> None:
        for seq in self.seqs:
            seq.finish_reason = seq.finish_reason or "error"


class Sequence:
    def __init__(self, request: Request, index: int, random: RandomStream,
                 detokenizer: IncrementalDetokenizer, eos_id: int | None):
        self.request, self.index, self.random = request, index, random
        self.params: SamplingParams = request.params
        self.detokenizer, self.eos_id = detokenizer, eos_id
        self.tokens: list[int] = []  # generated so far
        self.text = ""  # detokenized generated text
        self.emitted = 0  # characters of self.text already sent
        self.blocks: list[int] = []  # block table: the KV-cache blocks of its positions
        self.promised = 0  # blocks reserved for its growth, not yet in `blocks`
        # the prefix keys of its full blocks, which join the prefix cache (None: they do not)
        self.keys: list[bytes] | None = None
        self.finish_reason: str | None = None
        self.sampled = 0  # tokens sampled, a stop token or EOS that ended it included
        self.seen: Tensor | None = None  # the sampler's repetition-penalty state
        self.counts: Tensor | None = None  # and its presence/frequency-penalty state
        self.last_token_at: float | None = None  # monotonic; for the inter-token latency

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.tokens)

    def history(self) -> list[int]:
        return self.request.prompt_ids + self.tokens

    def append(self, sampled: Sampled) -> TokenEvent:
        """Take the next token; returns what to emit, with finish_reason set if it ended."""
        if self.request.max_new == 0:  # the prompt was only to be read: the token drawn
            self.finish_reason = "length"  # after it is not taken
            return TokenEvent(self.index, None, "", finish_reason="length")
        token: int | None = sampled.token
        self.sampled += 1
        before = len(self.text)  # a stop string found now ends in the text added after this
        if token in self.params.stop_token_ids:  # a stop token ends it like EOS; its text
            self.finish_reason = "stop"          # is kept only if asked for
            if self.params.include_stop_str_in_output:
                self.tokens.append(token)
                self.text += self.detokenizer.push(token)
            self.text += self.detokenizer.flush()
        elif token == self.eos_id and not self.params.ignore_eos:
            token = None  # EOS ends the sequence; it is not part of the text
            self.finish_reason = "stop"
            self.text += self.detokenizer.flush()
        else:
            self.tokens.append(token)
            self.text += self.detokenizer.push(token)
            if len(self.tokens) >= self.request.max_new:
                self.finish_reason = "length"
                self.text += self.detokenizer.flush()
        # As vLLM's: stop strings, like EOS and stop tokens, wait for min_tokens tokens.
        if self.params.stop and self.sampled > self.params.min_tokens:
            self._check_stop_strings(before)
        # Text that may be the start of a stop string waits until it cannot be.
        hold = 0 if self.finish_reason else max(map(len, self.params.stop), default=1) - 1
        end = max(self.emitted, len(self.text) - hold)
        delta, self.emitted = self.text[self.emitted:end], end
        return TokenEvent(self.index, token, delta, sampled.logprob, sampled.top_logprobs,
                          self.finish_reason)

    def _check_stop_strings(self, before: int) -> None:
        """The first stop string that ends after the first `before` characters of the text
        (earlier ones were found before, or came within min_tokens and do not count)."""
        found = ((self.text.find(s, max(0, before - len(s) + 1)), s) for s in self.params.stop)
        hits = [(i, len(s)) for i, s in found if i >= 0]
        if hits:
            at, length = min(hits)
            end = at + length if self.params.include_stop_str_in_output else at
            self.text = self.text[:end]
            self.emitted = min(self.emitted, len(self.text))
            self.finish_reason = "stop"
