"""The scheduler without a model: admission (FIFO, batch slots, KV blocks), chunked prefill
under a token budget, newcomers read whole, the state changes of a step's outcome, expiry and
cancellation, and the chunk budget's controller; the steps' outputs are made by hand."""

from __future__ import annotations

import asyncio

import pytest
import torch

from conftest import write_tokenizer
from gpt2serve.engine.kv_cache import BlockManager
from gpt2serve.engine.scheduler import (MIN_CHUNK, ChunkBudget, EngineStopped, QueueFull,
                                        ScheduledStep, Scheduler)
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


def request(prompt_len: int, max_new: int = 4, n: int = 1) -> Request:
    params = SamplingParams.from_dict({"max_new_tokens": max_new, "n": n, "seed": 1})
    return Request(Prompt(list(range(1, prompt_len + 1)), params), 0, max_new,
                   asyncio.Queue(), None)


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


def test_a_request_past_its_timeout_expires_before_admission(tokenizer):
    sched = scheduler(tokenizer, max_batch_size=1, timeout=5.0)
    running, late = request(3), request(3)
    sched.add([running, late])
    finish(sched, sched.schedule())
    late.arrival -= 10
    step = sched.schedule()
    assert step.expired == [late] and not sched.waiting


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
    sched.closed = True
    with pytest.raises(EngineStopped):
        sched.add([request(2)])


def test_the_chunk_budget_grows_while_steps_stay_short_and_shrinks_when_not():
    budget = ChunkBudget(512, adaptive=True)
    decode, mixed = ScheduledStep(["row"], []), ScheduledStep(["row"], ["chunk"])
    assert budget.tokens(decoding=True) == MIN_CHUNK and budget.tokens(decoding=False) == 512
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
