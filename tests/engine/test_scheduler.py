"""The scheduler without a model: admission (FIFO, batch slots, KV blocks), chunked prefill
under a token budget, newcomers read whole, the state changes of a step's outcome, expiry and
cancellation, and the chunk budget's controller; the steps' outputs are made by hand."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import torch

from conftest import write_tokenizer
from gpt2serve.engine.kv_cache import BlockManager, prefix_keys
from gpt2serve.engine.scheduler import (MIN_CHUNK, Chunk, ChunkBudget, EngineError,
                                        EngineStopped, QueueFull, RequestTimeout, ScheduledStep,
                                        Scheduler)
from gpt2serve.engine.sequence import Prompt, Request
from gpt2serve.model import GPTConfig, KVCache
from gpt2serve.sampling import SamplingParams
from gpt2serve.tokenizer import Tokenizer

BLOCK = 8


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp("tok")
    write_tokenizer(folder)
    return Tokenizer.from_dir(folder)


def scheduler(tokenizer, blocks: int = 64, max_batch_size: int = 8, max_queue: int = 4,
              budget: int = 16, timeout: float = 60.0) -> Scheduler:
    config = GPTConfig(vocab_size=400, n_positions=128, n_embd=8, n_layer=1, n_head=2)
    cache = KVCache(config, blocks, BLOCK, torch.float32, "cpu")
    return Scheduler(cache, BlockManager(blocks, BLOCK), tokenizer, 0, max_batch_size,
                     max_queue, timeout, ChunkBudget(budget, adaptive=True))


PROMPTS = itertools.count(1)


def request(prompt_len: int, max_new: int = 4, n: int = 1, ids: list[int] | None = None,
            streamed: bool = True, **params) -> Request:
    """A call of one prompt: `ids`, or prompt_len ids no other prompt starts with."""
    params = SamplingParams.from_dict({"max_new_tokens": max_new, "n": n, "seed": 1, **params})
    first = next(PROMPTS) * 1000
    ids = ids if ids is not None else list(range(first, first + prompt_len))
    return Request(Prompt(ids, params), 0, max_new, asyncio.Queue(), None, streamed)


def finish(sched: Scheduler, step: ScheduledStep, token: int = 7) -> None:
    """What the engine does with a step's outcome, the token sampled by hand."""
    sched.update(step)
    for seq in step.rows:
        seq.tokens.append(token)


def test_admission_is_fifo_within_batch_slots(tokenizer):
    sched = scheduler(tokenizer, max_batch_size=4)
    a, b, c = request(3, n=2), request(3, n=2), request(2)
    sched.add([a]), sched.add([b]), sched.add([c])
    step = sched.schedule()
    assert [ch.request for ch in step.chunks] == [a, b]  # c waits: 4 slots are taken
    assert list(sched.waiting) == [c] and sched.sequences == 4
    finish(sched, step)
    assert [s.request for s in step.started] == [a, a, b, b] and len(sched.running) == 4
    for seq in a.seqs:
        seq.finish_reason = "length"
    sched.retire()
    step = sched.schedule()
    assert step.decode == b.seqs and [ch.request for ch in step.chunks] == [c]


def test_the_head_of_the_queue_waits_for_blocks_and_nothing_jumps_it(tokenizer):
    sched = scheduler(tokenizer, blocks=6)
    big, big2, small = request(30, max_new=2), request(30, max_new=2), request(2)
    sched.add([big, big2, small])
    step = sched.schedule()
    assert [ch.request for ch in step.chunks] == [big]  # 4 blocks of 6: big2 does not fit
    assert list(sched.waiting) == [big2, small]  # and small waits behind it
    while sched.prefilling:
        finish(sched, step)
        step = sched.schedule()
    big.seqs[0].finish_reason = "stop"
    sched.retire()
    assert sched.blocks.available == 6  # its blocks and unused promise came back
    step = sched.schedule()
    assert [ch.request for ch in step.chunks] == [big2]


def test_prompts_are_read_in_chunks_under_the_budget_padding_counted(tokenizer):
    sched = scheduler(tokenizer, budget=16)
    long, short = request(40), request(3)
    sched.add([long, short])
    lengths = []
    while sched.prefilling or sched.waiting:
        step = sched.schedule()
        width = max(c.length for c in step.chunks)
        assert len(step.chunks) * width <= 16
        lengths.append([(c.request is long, c.start, c.length) for c in step.chunks])
        assert all(s.request.prefilled + c.length == len(s.request.prompt_ids)
                   for c in step.chunks if c.last for s in c.request.seqs)
        finish(sched, step)
    assert lengths == [[(True, 0, 16)], [(True, 16, 16)], [(True, 32, 8), (False, 0, 3)]]
    assert [s.request for s in sched.running] == [long, short]


def test_decode_rows_come_before_started_sequences(tokenizer):
    sched = scheduler(tokenizer)
    first, second = request(4), request(5, n=2)
    sched.add([first])
    finish(sched, sched.schedule())
    sched.add([second])
    step = sched.schedule()
    assert step.decode == first.seqs and step.started == second.seqs
    assert step.rows == first.seqs + second.seqs


def test_newcomers_are_read_whole_or_left_for_the_next_step(tokenizer):
    sched = scheduler(tokenizer)
    sched.add([request(4)])
    finish(sched, sched.schedule())
    fits, too_long = request(6), request(20)
    sched.add([fits, too_long])
    step = sched.schedule_newcomers(16)
    assert [c.request for c in step.chunks] == [fits] and step.chunks[0].last
    assert step.decode == [] and too_long in sched.prefilling  # admitted, read next step


def test_siblings_share_full_blocks_and_copy_the_partial_one(tokenizer):
    sched = scheduler(tokenizer)
    r = request(20, max_new=6, n=3)  # 2 full blocks and a partial one
    sched.add([r])
    before = sched.blocks.available
    while not sched.running:
        finish(sched, sched.schedule())
    first, *siblings = r.seqs
    for s in siblings:
        assert s.blocks[:2] == first.blocks[:2] and s.blocks[2] != first.blocks[2]
    for s in r.seqs:  # (each holds its growth: 20 + 6 - 1 positions fit 4 blocks)
        s.finish_reason = "length"
    sched.retire()
    assert sched.blocks.available == before and sched.blocks.promised == 0


def test_siblings_that_only_read_the_prompt_share_all_its_blocks(tokenizer):
    """max_new 0 (OpenAI's echo with max_tokens 0): nothing is written after the prompt, so
    a partial last block is shared, not copied, and a prompt that fills the cache fits."""
    sched = scheduler(tokenizer, blocks=3)
    sched.check_capacity(20, 0, 3)
    r = request(20, max_new=0, n=3)
    sched.add([r])
    while not sched.running:
        finish(sched, sched.schedule())
    assert all(s.blocks == r.seqs[0].blocks for s in r.seqs) and sched.blocks.available == 0
    for s in r.seqs:
        s.finish_reason = "length"
    sched.retire()
    assert sched.blocks.available == 3 and sched.blocks.promised == 0


def test_a_request_past_its_timeout_expires_before_admission(tokenizer):
    sched = scheduler(tokenizer, max_batch_size=1, timeout=5.0)
    running, late = request(3), request(3)
    sched.add([running, late])
    finish(sched, sched.schedule())
    late.arrival -= 10
    sched.schedule()
    ((expired, error),) = sched.take_refused()
    assert expired is late and isinstance(error, RequestTimeout) and not sched.waiting
    assert "waited more than 5s" in str(error) and sched.take_refused() == []


def test_cancelled_requests_leave_and_give_their_blocks_back(tokenizer):
    sched = scheduler(tokenizer, max_batch_size=2)
    running, prefilling, waiting = request(3), request(40), request(3)
    sched.add([running, prefilling, waiting])
    total = sched.blocks.available
    finish(sched, sched.schedule())
    sched.schedule()  # prefilling's first chunk
    for r in (running, prefilling, waiting):
        r.cancelled = True
    sched.drop_cancelled()
    assert running.seqs[0].finish_reason == "abort"
    assert not sched.prefilling and not sched.waiting
    sched.retire()
    assert sched.blocks.available == total and not sched.busy


def test_a_full_queue_and_a_closed_scheduler_refuse_calls_whole(tokenizer):
    sched = scheduler(tokenizer, max_batch_size=1, max_queue=2)
    sched.add([request(2), request(2)])  # one free slot beside the queue
    with pytest.raises(QueueFull):
        sched.add([request(2), request(2)])
    assert len(sched.waiting) == 2
    sched.closed = "server is shutting down"
    with pytest.raises(EngineStopped, match="shutting down"):
        sched.add([request(2)])


def steps(tokenizer, streamed: bool = True) -> tuple[ScheduledStep, ScheduledStep]:
    """A decode step of one running sequence (a stream's, or a whole completion's), and one
    that also reads a prompt chunk."""
    row = request(3, streamed=streamed).start(tokenizer, 0)
    return ScheduledStep(row, []), ScheduledStep(row, [Chunk(request(40), 0, 16)])


def test_the_chunk_budget_grows_while_steps_stay_short_and_shrinks_when_not(tokenizer):
    budget = ChunkBudget(512, adaptive=True)
    decode, mixed = steps(tokenizer)
    assert budget.tokens(streams=True) == MIN_CHUNK and budget.tokens(streams=False) == 512
    budget.observe(decode, 0.010)
    budget.observe(mixed, 0.012)  # within 1.5 decode steps: a quarter more
    assert budget.tokens(True) == 20
    budget.observe(mixed, 0.060)  # four times the target: half, and no less than the least
    assert budget.tokens(True) == MIN_CHUNK
    for _ in range(40):
        budget.observe(mixed, 0.001)
    assert budget.tokens(True) == 512
    fixed = ChunkBudget(512, adaptive=False)
    fixed.observe(decode, 0.01), fixed.observe(mixed, 1.0)
    assert fixed.tokens(True) == 512


def test_a_wider_stretch_lets_longer_steps_grow_the_chunk(tokenizer):
    """--prefill_step_stretch 3: a step with a chunk may take three decode steps' time."""
    decode, mixed = steps(tokenizer)
    for stretch, grown in ((1.5, False), (3.0, True)):
        budget = ChunkBudget(512, adaptive=True, stretch=stretch)
        budget.observe(decode, 0.010)
        budget.observe(mixed, 0.025)
        assert (budget.tokens(True) > MIN_CHUNK) == grown


def test_beside_whole_completions_a_prompt_is_read_at_the_most(tokenizer):
    """A running stream holds the chunk beside it to the stretch's budget; rows of whole
    completions (V1 and V2 predictions, OpenAI without stream) have no token gaps to keep
    even: a long prompt beside them takes the most each step, and a slow step beside them
    does not shrink the streams' budget."""
    for streamed, chunk in ((True, MIN_CHUNK), (False, 64)):
        sched = scheduler(tokenizer, budget=64)
        running = request(3, max_new=8, streamed=streamed)
        sched.add([running])
        finish(sched, sched.schedule())
        sched.add([request(100)])
        step = sched.schedule()
        assert step.decode == running.seqs and step.streams == streamed
        assert [(c.start, c.length) for c in step.chunks] == [(0, chunk)]
    budget = ChunkBudget(512, adaptive=True)
    for streamed in (True, False):
        decode, mixed = steps(tokenizer, streamed)
        budget.observe(decode, 0.010)
        budget.observe(mixed, 0.012 if streamed else 1.0)
    assert budget.tokens(streams=True) == 20


def read_whole(sched: Scheduler, r: Request) -> list[tuple[int, int]]:
    """Steps until r's prompt is read; the (start, length) of its chunks."""
    chunks = []
    while r in sched.prefilling or r in sched.waiting:
        step = sched.schedule()
        chunks += [(c.start, c.length) for c in step.chunks if c.request is r]
        finish(sched, step)
    return chunks


@pytest.mark.parametrize("length, cached", [(40, 32), (32, 24), (7, 0)])
def test_a_repeated_prompt_reads_only_what_the_cache_lacks_and_always_its_last_token(
        tokenizer, length, cached):
    sched = scheduler(tokenizer, budget=64)
    ids = list(range(100, 100 + length))
    first = request(length, ids=ids)
    sched.add([first])
    assert read_whole(sched, first) == [(0, length)] and first.cached_tokens == 0
    again = request(length, ids=ids + [])
    sched.add([again])
    assert read_whole(sched, again) == [(cached, length - cached)]
    assert again.cached_tokens == cached
    assert again.blocks[:cached // BLOCK] == first.blocks[:cached // BLOCK]


def test_salts_echo_and_the_switch_keep_prompts_from_the_cache(tokenizer):
    ids = list(range(100, 140))
    sched = scheduler(tokenizer, budget=64)
    first = request(40, ids=ids, cache_salt="tenant-a")
    sched.add([first])
    read_whole(sched, first)
    other = request(40, ids=ids, cache_salt="tenant-b")
    unsalted = request(40, ids=ids)
    same = request(40, ids=ids, cache_salt="tenant-a")
    scored = request(40, ids=ids, cache_salt="tenant-a")
    scored.wants_prompt_logprobs = 1  # echo with logprobs scores every prompt token
    for r in (other, unsalted, same, scored):
        sched.add([r])
        read_whole(sched, r)
    assert [r.cached_tokens for r in (other, unsalted, same, scored)] == [0, 0, 32, 0]
    off = scheduler(tokenizer, budget=64)
    off.prefix_caching = False
    for _ in range(2):
        r = request(40, ids=ids)
        off.add([r])
        read_whole(off, r)
        assert r.cached_tokens == 0


def test_blocks_that_decode_steps_fill_join_the_cache_under_the_salt(tokenizer):
    """A prompt of 20 tokens (2.5 blocks) and 25 decode steps: the blocks whose every
    position was written, the prompt's and those the steps filled, are found by a prompt
    that goes on from the sequence's text, under its salt only; not with caching off."""
    for caching in (True, False):
        sched = scheduler(tokenizer, budget=64)
        sched.prefix_caching = caching
        r = request(20, max_new=40, ids=list(range(500, 520)), cache_salt="t")
        sched.add([r])
        read_whole(sched, r)
        (seq,) = r.seqs
        for _ in range(25):
            finish(sched, sched.schedule())
        history = seq.history()  # the last token is not fed yet: 45 positions written
        assert len(history) == 46 and seq.length - 1 == 45
        found = sched.blocks.cached(prefix_keys(history, BLOCK, "t"))
        assert found == (seq.blocks[:45 // BLOCK] if caching else [])
        assert sched.blocks.cached(prefix_keys(history, BLOCK)) == []


def test_eviction_takes_idle_cached_blocks_least_recent_first_never_held_ones(tokenizer):
    sched = scheduler(tokenizer, blocks=12, budget=64)
    a, b = list(range(100, 125)), list(range(200, 225))  # 4 blocks each, 3 of them full
    ra = request(25, max_new=1, ids=a)
    sched.add([ra])
    read_whole(sched, ra)
    held = request(25, max_new=1, ids=b)  # stays running: its blocks are held
    sched.add([held])
    read_whole(sched, held)
    ra.seqs[0].finish_reason = "stop"
    sched.retire()  # a's 3 full blocks are idle and cached, its last one free
    assert sched.blocks.available == 12 - 4
    big = request(50, max_new=1)  # 7 blocks: the free 5, then the 2 idle ones released first
    sched.add([big])
    read_whole(sched, big)
    assert not set(big.blocks) & set(held.blocks)
    again_a, again_b = request(25, max_new=1, ids=a), request(25, max_new=1, ids=b)
    sched.add([again_b])
    read_whole(sched, again_b)
    assert again_b.cached_tokens == 24  # the held prompt's blocks were never evicted
    big.seqs[0].finish_reason = "stop"
    sched.retire()
    sched.add([again_a])
    read_whole(sched, again_a)
    assert again_a.cached_tokens == 0  # a's first blocks were evicted, so the chain is gone


def test_the_load_gauges_count_a_prompt_being_read_and_a_wait_past_the_deadline(tokenizer):
    """A request taken off the queue is counted among the running sequences while its prompt
    is read (chunked prefill, steps long): it was in neither gauge, and the autoscaler's
    running + waiting missed it. A request that waits past --request_timeout is refused
    (503), and counted so: it was counted nowhere."""
    sched = scheduler(tokenizer, max_batch_size=2, max_queue=2, budget=MIN_CHUNK, timeout=0.05)
    gauge = sched.metrics.running
    long = request(MIN_CHUNK * 3, n=2)
    sched.add([long])
    step = sched.schedule()
    assert [ch.request for ch in step.chunks] == [long] and not step.chunks[0].last
    finish(sched, step)
    assert sched.prefilling == [long] and not sched.running
    assert gauge._value.get() == 2 == sched.sequences  # its n sequences, about to run
    while not step.chunks[-1].last:
        step = sched.schedule()
        finish(sched, step)
        assert gauge._value.get() == 2 == sched.sequences  # (never counted twice)
    assert len(sched.running) == 2 and not sched.prefilling
    for seq in sched.running:
        seq.finish_reason = "length"
    sched.retire()
    assert gauge._value.get() == 0
    long = request(MIN_CHUNK * 3, n=2)
    sched.add([long])
    finish(sched, sched.schedule())
    sched.drop_prefilling(long)
    assert gauge._value.get() == 0
    rejected = sched.metrics.rejected._value.get()
    sched.add([request(3), request(3)])
    with pytest.raises(QueueFull):
        sched.add([request(3)] * 5)  # (a call of 5 prompts: 5 refused)
    assert sched.metrics.rejected._value.get() == rejected + 5
    time.sleep(0.06)
    sched.schedule()
    assert len(sched.take_refused()) == 2 and not sched.waiting
    assert sched.metrics.rejected._value.get() == rejected + 7


# ---- a failure partway (a bug's or a device error's stand-in) leaves the books right -------

def test_a_sibling_that_fails_to_start_gives_its_blocks_back_once(tokenizer):
    """The second sibling's partial block failed to copy after the first sequence had joined
    the batch: the step's failure released its table as a running sequence's and again as
    its prompting request's (a block at -1 references, given to two tables), and leaked the
    sibling built before."""
    sched = scheduler(tokenizer)
    r = request(20, max_new=6, n=3)
    sched.add([r])
    before = sched.blocks.available
    copy, copies = sched.cache.copy_block, []

    def copy_fails_second(src: int, dst: int) -> None:
        copies.append(dst)
        if len(copies) == 2:
            raise RuntimeError("device error")
        copy(src, dst)

    sched.cache.copy_block = copy_fails_second
    with pytest.raises(RuntimeError, match="device error"):
        while not sched.running:
            finish(sched, sched.schedule())
    assert not sched.running and sched.abort() == [r]  # what the engine does with a failure
    assert sched.blocks.available == before and sched.blocks.promised == 0
    sched.cache.copy_block = copy
    again = request(20, max_new=6, n=3)
    sched.add([again])
    while not sched.running:
        finish(sched, sched.schedule())
    tables = [s.blocks for s in again.seqs]
    assert all(t[:2] == tables[0][:2] for t in tables)  # the full blocks shared, and the
    assert len({t[2] for t in tables}) == 3  # partial one each sequence's own


def test_a_request_whose_admission_fails_is_refused_alone(tokenizer):
    """A prompt whose admission raised (a bug's stand-in) stayed at the head of the queue:
    every step raised, failing the running batch each time, and nothing behind it started."""
    sched = scheduler(tokenizer)
    running, bad, behind = request(3), request(9), request(3)
    sched.add([running])
    finish(sched, sched.schedule())
    sched.add([bad, behind])
    cached = sched.blocks.cached

    def lookup_fails_for_bad(keys):
        if keys == bad.prefix_keys[:1]:
            raise RuntimeError("bug")
        return cached(keys)

    sched.blocks.cached = lookup_fails_for_bad
    step = sched.schedule()
    assert step.decode == running.seqs and [c.request for c in step.chunks] == [behind]
    ((refused, error),) = sched.take_refused()
    assert refused is bad and isinstance(error, EngineError) and not sched.waiting


def test_a_request_that_expires_in_a_step_that_fails_still_hears_of_it(tokenizer):
    """The step's expired requests left the queue, then its prompt's start raised: the step
    was lost, with them, and their callers waited forever."""
    sched = scheduler(tokenizer, max_batch_size=1, timeout=5.0)
    starting, late = request(3), request(3)
    sched.add([starting, late])
    late.arrival -= 10

    def start_fails(tokenizer, eos_id):
        raise RuntimeError("bug")

    starting.start = start_fails
    with pytest.raises(RuntimeError, match="bug"):
        sched.schedule()
    assert [r for r, _ in sched.take_refused()] == [late] and not sched.waiting
