"""Prefix caching over HTTP against the real server with the demo model: a repeated prompt
reports its cached tokens and the metrics count them; greedy text is the same cold and warm
(prefixes that end on a block boundary and that do not, a long prompt read in chunks, n > 1
siblings); a cache_salt keeps prompts apart; and a budget so small that every request evicts
gives the same texts as a server without caching, with no error."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import metric, post, running_server

MODEL = "aitextgen"
BLOCK = 16
TEXT = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet "
        "is the sun. Arise, fair sun, and kill the envious moon, who is already sick and pale "
        "with grief, that thou her maid art far more fair than she. ") * 8


@pytest.fixture(scope="module")
def srv():
    with running_server("--enable_grpc", "false", "--max_prefill_tokens", "64") as server:
        yield server


@pytest.fixture(scope="module")
def cold():
    with running_server("--enable_grpc", "false", "--enable_prefix_caching", "false") as server:
        yield server


def tokens(server, text: str) -> list[int]:
    r = post(f"{server.url}/tokenize", {"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def complete(server, prompt, **fields) -> dict:
    r = post(f"{server.url}/openai/v1/completions",
             {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def cached(response: dict) -> int:
    return response["usage"]["prompt_tokens_details"]["cached_tokens"]


def hits(server) -> float:
    return metric(server, "gpt2serve_prefix_cache_hits_total", model="aitextgen")


def queries(server) -> float:
    return metric(server, "gpt2serve_prefix_cache_queries_total", model="aitextgen")


@pytest.mark.parametrize("start, length", [(0, 5 * BLOCK), (100, 5 * BLOCK + 7), (200, 150)])
def test_a_repeated_prompt_is_read_from_the_cache_with_the_same_text(srv, cold, start, length):
    """A prompt ending on a block boundary, inside a block, and a long one read in chunks of
    64 tokens (--max_prefill_tokens): the first read is cold, the second takes every block
    but the one holding its last token, and both give the cold server's greedy text."""
    prompt = tokens(srv, TEXT)[start:start + length]  # (no other test's prompt starts here)
    before, asked = hits(srv), queries(srv)
    first, again = complete(srv, prompt), complete(srv, prompt)
    assert cached(first) == 0
    assert cached(again) == (length - 1) // BLOCK * BLOCK
    assert hits(srv) - before == cached(again)
    assert queries(srv) - asked == 2 * length
    reference = complete(cold, prompt)
    assert cached(reference) == 0
    assert queries(cold) == hits(cold) == 0  # caching off: nothing looked up (it counted)
    assert first["choices"][0]["text"] == again["choices"][0]["text"] == \
        reference["choices"][0]["text"]


def test_a_prompt_sharing_a_prefix_reuses_it_and_siblings_continue_it(srv, cold):
    ids = tokens(srv, TEXT)
    complete(srv, ids[250:350])
    longer = ids[250:350] + ids[420:450]
    got = complete(srv, longer, n=2, temperature=1.0, seed=3)
    assert cached(got) == 96
    want = complete(cold, longer, n=2, temperature=1.0, seed=3)
    assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]


def test_a_cache_salt_keeps_prompts_apart(srv):
    prompt = tokens(srv, TEXT)[360:440]
    assert cached(complete(srv, prompt, cache_salt="tenant-a")) == 0
    assert cached(complete(srv, prompt, cache_salt="tenant-b")) == 0
    assert cached(complete(srv, prompt)) == 0
    assert cached(complete(srv, prompt, cache_salt="tenant-a")) == 64
    r = post(f"{srv.url}/openai/v1/completions", {"model": MODEL, "prompt": "x",
                                                   "cache_salt": ""})
    assert r.status_code == 400 and "cache_salt" in r.text


def test_no_salt_stands_for_a_blocks_key():
    """A first block's key was chained from the salt's bytes, a later block's from its
    predecessor's key, with nothing between the two: a 32-byte salt equal to a block's key
    found that tenant's next blocks."""
    from gpt2serve.engine.kv_cache import block_key

    tokens = list(range(16))
    spelled = "k" * 32  # as if some block's key were these bytes
    assert block_key([], tokens, salt=spelled) != block_key([spelled.encode()], tokens)
    assert block_key([], tokens, salt="a") != block_key([], tokens, salt="b")
    assert block_key([], tokens) == block_key([], tokens, salt="")


def test_eviction_under_a_tiny_budget_hands_out_no_block_in_use(cold):
    """A cache of 20 blocks (320 tokens, two requests' worth) and 12 concurrent requests of
    130-token prompts in three families sharing 120-token prefixes: cached blocks are idle
    only until the next admission evicts them, none is handed out while in use (every text
    is the cold server's), and none fails. Then the same requests one at a time, a family
    after another, hit the blocks their sibling left."""
    ids = tokens(cold, TEXT)
    prompts = [ids[(i % 3) * 10:(i % 3) * 10 + 120] + ids[150 + i:160 + i] for i in range(12)]
    budget = 20 * BLOCK * 4 * 2 * 256 * 4  # demo model: 4 layers, 256 dims, fp32
    by_family = sorted(range(12), key=lambda i: i % 3)

    async def run(url: str, order: list[int], together: bool) -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            async def one(i):
                r = await client.post(f"{url}/openai/v1/completions", json={
                    "model": MODEL, "prompt": prompts[i], "max_tokens": 20, "temperature": 0})
                assert r.status_code == 200, r.text
                return i, r.json()["choices"][0]["text"]
            if together:
                done = await asyncio.gather(*(one(i) for i in order))
            else:
                done = [await one(i) for i in order]
            return [text for _, text in sorted(done)]

    with running_server("--enable_grpc", "false", "--kv_cache_memory", str(budget),
                        "--max_batch_size", "4") as tiny:
        together = asyncio.run(run(tiny.url, list(range(12)), True))
        before = hits(tiny)
        in_turn = asyncio.run(run(tiny.url, by_family, False))
        assert hits(tiny) - before >= 9 * 112  # each family's 2nd to 4th: 7 blocks each
    want = asyncio.run(run(cold.url, list(range(12)), True))
    assert together == in_turn == want


def test_a_chats_next_turn_finds_the_blocks_the_answer_filled_and_gives_the_same_text():
    """The next turn's prompt is the last prompt, its answer and a new message (as token
    ids, as the engine made them): the blocks the answer's decode steps filled are found, so
    only the new message is read, and the greedy text is that of an engine without caching."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine, EngineConfig, Prompt
    from gpt2serve.engine.kv_cache import prefix_keys
    from gpt2serve.sampling import SamplingParams

    model, tokenizer = checkpoint.load(None)  # the demo model
    greedy = SamplingParams.from_dict({"max_new_tokens": 40, "do_sample": False,
                                       "ignore_eos": True})
    warm = Engine(model, tokenizer, EngineConfig(max_batch_size=2), threaded=False)
    cold = Engine(model, tokenizer, EngineConfig(max_batch_size=2, enable_prefix_caching=False),
                  threaded=False)

    def complete(engine, ids: list[int]) -> list[int]:
        async def run():
            requests = engine.submit([Prompt(ids, greedy)], streamed=False)
            while engine.scheduler.busy:
                engine.step()
                await asyncio.sleep(0)
            return [ev.token_id async for _, ev in engine.stream(requests)
                    if ev.token_id is not None]
        return asyncio.run(run())

    prompt = tokenizer.encode(TEXT[:120])
    answer = complete(warm, prompt)
    turn = prompt + answer + tokenizer.encode("\nJULIET: Ay me!")
    written = len(prompt) + len(answer) - 1  # the answer's last token was never fed
    found = warm.scheduler.blocks.cached(prefix_keys(turn, BLOCK))
    assert len(found) == written // BLOCK > len(prompt) // BLOCK
    assert complete(warm, turn) == complete(cold, turn)
