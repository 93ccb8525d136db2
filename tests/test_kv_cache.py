"""The paged KV cache and chunked prefill, over real HTTP against the server process: a budget
too small fails at start-up, capacity is counted in tokens rather than full-context slots (an
fp16 cache holds twice as many, and a quantized model's is fp16 by default), n > 1 siblings
share their prompt, and a long prompt is read in chunks beside running streams."""

import asyncio
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import metric, post, running_server

MODEL = "aitextgen"


def test_a_budget_below_one_full_context_sequence_fails_at_start_up(long_model):
    """long_model caches 8 KiB a token: its 1,024-token context needs 8 MiB."""
    out = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "serve", "--model_dir",
                          str(long_model), "--kv_cache_memory", "4MiB", "--enable_grpc", "false",
                          "--http_port", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1
    assert "--kv_cache_memory" in errors[0] and "1024-token" in errors[0]


@pytest.fixture(scope="module")
def budget_server(long_model):
    """Eight full-context sequences' worth of cache, and room for 32 sequences a step."""
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--kv_cache_memory", "64MiB", "--max_batch_size", "32") as srv:
        yield srv


def test_a_block_taken_past_every_reservation_is_an_error_not_a_held_block():
    """A block asked for with none free was the first block, held by another sequence
    (np.argmax of all False is 0): a wrong count of reservations would have let one
    sequence write over another's keys and values, unseen."""
    from gpt2serve.engine.kv_cache import BlockManager

    blocks = BlockManager(2, 16)
    held = [blocks.grow([]), blocks.grow([])]
    assert sorted(held) == [0, 1]
    with pytest.raises(RuntimeError, match="no KV-cache block is free"):
        blocks.grow([])
    blocks.release(held[:1])
    assert blocks.grow([]) == held[0]

def test_the_default_cache_holds_max_batch_size_full_sequences(long_model):
    """By default the cache holds --max_batch_size full-context sequences, each in whole
    blocks: 100 tokens take 7 blocks of 16, so 4 take 28 blocks (it held 25, the tokens'
    total rounded, and the fourth full sequence waited)."""
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--max_model_len", "100", "--max_batch_size", "4") as srv:
        assert metric(srv, "gpt2serve_kv_cache_capacity_tokens") == 4 * 7 * 16


def test_capacity_is_counted_in_tokens_not_full_context_slots(budget_server):
    assert metric(budget_server, "gpt2serve_kv_cache_capacity_tokens") == 8192
    url = f"{budget_server.url}/v1/models/{MODEL}:predict"
    instance = {"prompt": "ROMEO:", "max_length": 260, "ignore_eos": True, "temperature": 1.0}
    peak = 0
    done = threading.Event()

    def watch():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, metric(budget_server, "gpt2serve_running_sequences"))
            time.sleep(0.02)

    async def crowd():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(client.post(url, json={"instances": [
                {**instance, "seed": i}]}) for i in range(24)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        answers = asyncio.run(crowd())
    finally:
        done.set()
        watcher.join()
    assert all(r.status_code == 200 for r in answers)
    assert peak == 24  # eight slots' worth of memory held 24 sequences at once
    assert metric(budget_server, "gpt2serve_kv_cache_usage_ratio") == 0  # all blocks back


def test_siblings_share_their_prompt_and_each_matches_a_lone_sequence(budget_server):
    """Greedy n = 3 over a prompt that ends inside a block: the siblings read the first's
    full blocks and a copy of its last one; any mix-up would change their text."""
    url = f"{budget_server.url}/v1/models/{MODEL}:predict"
    body = {"prompt": "JULIET: O Romeo, Romeo, wherefore art thou", "max_new_tokens": 40,
            "do_sample": False, "ignore_eos": True}
    alone = post(url, {"instances": [body]}).json()["predictions"][0]
    three = post(url, {"instances": [{**body, "n": 3}]}).json()["predictions"][0]
    assert three == [alone] * 3
    assert metric(budget_server, "gpt2serve_kv_cache_usage_ratio") == 0


def test_an_fp16_cache_holds_twice_the_tokens_and_is_shared_as_the_fp32_one(long_model):
    """--kv_cache_dtype float16: the same 64 MiB hold 16,384 tokens instead of 8,192, and
    siblings still read the first's blocks (their text is the lone sequence's)."""
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--kv_cache_memory", "64MiB", "--max_batch_size", "32",
                        "--kv_cache_dtype", "float16") as srv:
        assert metric(srv, "gpt2serve_kv_cache_capacity_tokens") == 16384
        url = f"{srv.url}/v1/models/{MODEL}:predict"
        body = {"prompt": "JULIET: O Romeo, Romeo, wherefore art thou", "max_new_tokens": 300,
                "do_sample": False, "ignore_eos": True}
        alone = post(url, {"instances": [body]}).json()["predictions"][0]
        three = post(url, {"instances": [{**body, "n": 3}]}).json()["predictions"][0]
        assert three == [alone] * 3 and len(alone) > len(body["prompt"])
        assert metric(srv, "gpt2serve_kv_cache_usage_ratio") == 0


def test_a_quantized_model_gets_the_fp16_cache_unless_told_otherwise(long_model):
    """--quantize int8 without --kv_cache_dtype: where our decode kernel reads fp16 in place
    (F16C), the cache is fp16 and the 64 MiB hold 16,384 tokens; --kv_cache_dtype float32
    keeps 8,192. Siblings still read the first's blocks."""
    from gpt2serve import kernels  # what the server process finds on this CPU

    for flags, tokens in (([], 16384 if kernels.ENABLED and kernels.HALF_RUNS else 8192),
                          (["--kv_cache_dtype", "float32"], 8192)):
        with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                            "--kv_cache_memory", "64MiB", "--quantize", "int8",
                            *flags) as srv:
            assert metric(srv, "gpt2serve_kv_cache_capacity_tokens") == tokens
            url = f"{srv.url}/v1/models/{MODEL}:predict"
            body = {"prompt": "JULIET: O Romeo", "max_new_tokens": 100, "do_sample": False,
                    "ignore_eos": True}
            alone = post(url, {"instances": [body]}).json()["predictions"][0]
            three = post(url, {"instances": [{**body, "n": 3}]}).json()["predictions"][0]
            assert three == [alone] * 3 and len(alone) > len(body["prompt"])


@pytest.fixture(scope="module")
def chunk_server(long_model):
    """Prompts read beside decode steps 64 tokens a step at the most."""
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--kv_cache_memory", "64MiB", "--max_prefill_tokens", "64") as srv:
        yield srv


async def _stream(client, url, started) -> int:
    """One OpenAI stream of 250 tokens (logprobs make every token a chunk); the chunks."""
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 250, "ignore_eos": True,
            "logprobs": 0, "stream": True}
    chunks = 0
    async with client.stream("POST", url, json=body) as r:
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {")
            if chunks == 20:
                started.set()
    return chunks


def test_a_long_prompt_is_read_in_chunks_beside_running_streams(chunk_server):
    """8 streams decode; a 900-token prompt arrives. Every token of it is read beside their
    decode steps, 64 a step at the most, so the streams get a token in each of those steps.
    Counted in steps, not timed: what the gaps come to in milliseconds is the bench's
    (bench/serving.py --stall)."""
    url = f"{chunk_server.url}/openai/v1/completions"
    long_prompt = [3 + i % 300 for i in range(900)]
    name = "gpt2serve_prompt_tokens_beside_decode"

    def beside() -> tuple[float, float, float]:
        return (metric(chunk_server, f"{name}_count"), metric(chunk_server, f"{name}_sum"),
                metric(chunk_server, f"{name}_bucket", le="64.0"))

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            started = [asyncio.Event() for _ in range(8)]
            streams = [asyncio.create_task(_stream(client, url, s)) for s in started]
            for s in started:
                await s.wait()  # every stream's prompt read: they decode
            before = beside()
            r = await client.post(url, json={"model": MODEL, "prompt": long_prompt,
                                             "max_tokens": 1})
            after = beside()
            return r, before, after, await asyncio.gather(*streams)

    r, before, after, streams = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 900
    steps, tokens, at_most_64 = (a - b for a, b in zip(after, before))
    assert tokens == 900  # all of it beside decode steps: the streams ran all the while
    assert steps >= 15 and at_most_64 == steps  # in chunks of 64 tokens at the most
    assert streams == [250] * 8


def test_beside_whole_completions_a_long_prompt_is_read_at_the_most_a_step(chunk_server):
    """8 V1 predictions (whole completions, nothing streamed) decode; the 900-token prompt
    arrives. Their callers wait for the last token only, so it is read 64 tokens a step, the
    most: 15 steps (beside streams the chunks start at 16 tokens and grow, the test above)."""
    name = "gpt2serve_prompt_tokens_beside_decode"
    body = {"prompt": "ROMEO:", "max_new_tokens": 250, "ignore_eos": True}

    def beside() -> tuple[float, float]:
        return metric(chunk_server, f"{name}_count"), metric(chunk_server, f"{name}_sum")

    async def scenario():
        async with httpx.AsyncClient(timeout=300) as client:
            predictions = asyncio.create_task(client.post(
                f"{chunk_server.url}/v1/models/{MODEL}:predict",
                json={"instances": [body] * 8}))
            while metric(chunk_server, "gpt2serve_running_sequences") < 8:
                await asyncio.sleep(0.005)  # every prompt read: they decode
            before = beside()
            r = await client.post(f"{chunk_server.url}/openai/v1/completions", json={
                "model": MODEL, "prompt": [5 + i * 7 % 300 for i in range(900)],  # not cached
                "max_tokens": 1})
            return r, before, beside(), await predictions

    r, before, after, predictions = asyncio.run(scenario())
    assert r.status_code == 200 and predictions.status_code == 200, (r.text, predictions.text)
    assert len(predictions.json()["predictions"]) == 8
    steps, tokens = (a - b for a, b in zip(after, before))
    assert (steps, tokens) == (15, 900)  # 14 chunks of 64 and the last 4, all beside decode
