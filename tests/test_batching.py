"""Continuous batching over real HTTP: concurrency, seeds under batching, ordering, disconnects,
backpressure, OpenAI completions through the official client."""

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import metric, post, running_server, until_metric

MODEL = "aitextgen"


@pytest.fixture(scope="module")
def batch_server(long_model):
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--max_batch_size", "32", "--max_queue", "40") as srv:
        yield srv




async def _predict(client, url, instance):
    r = await client.post(url, json={"instances": [instance]}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_concurrent_requests_complete_and_seeds_hold_under_batching(batch_server):
    url = f"{batch_server.url}/v1/models/{MODEL}:predict"
    probe = {"prompt": "ROMEO:", "seed": 1234, "max_new_tokens": 24, "temperature": 1.0}
    alone = post(url, {"instances": [probe]}).json()["predictions"][0]

    async def crowd():
        async with httpx.AsyncClient() as client:
            others = [_predict(client, url, {"prompt": f"JULIET {i}:", "seed": i,
                                             "max_new_tokens": 24 + i})
                      for i in range(31)]
            return await asyncio.gather(_predict(client, url, probe), *others)

    before = metric(batch_server, "gpt2serve_batch_size_count")
    probe_batched, *others = asyncio.run(crowd())
    assert probe_batched == alone
    assert all(o.startswith(f"JULIET {i}:") for i, o in enumerate(others))
    steps = metric(batch_server, "gpt2serve_batch_size_count") - before
    tokens = sum(24 + i for i in range(31)) + 24
    assert steps < tokens / 4  # they really were decoded together


def test_requests_joining_a_running_batch_match_their_output_alone(batch_server):
    """Newcomers are prefilled between the layers of the decode step in flight, into the
    slots after the batch, and their siblings (n > 1) are copied there: none of it may touch
    the running sequences' cache, nor theirs."""
    url = f"{batch_server.url}/v1/models/{MODEL}:predict"
    long = {"prompt": "KING HENRY:", "seed": 7, "n": 2, "max_new_tokens": 300,
            "temperature": 1.0, "ignore_eos": True}
    joiners = [{"prompt": f"{name}:", "seed": i, "n": 3, "max_new_tokens": 20,
                "temperature": 0.8, "ignore_eos": True}
               for i, name in enumerate(["ROMEO", "JULIET", "NURSE", "TYBALT"])]
    alone = [post(url, {"instances": [body]}).json()["predictions"][0]
             for body in [long, *joiners]]

    async def staggered():
        async with httpx.AsyncClient() as client:
            first = asyncio.create_task(_predict(client, url, long))
            late = []
            for body in joiners:
                await asyncio.sleep(0.03)
                late.append(asyncio.create_task(_predict(client, url, body)))
            return await asyncio.gather(first, *late)

    assert asyncio.run(staggered()) == alone


def test_short_request_overtakes_a_long_one(batch_server):
    url = f"{batch_server.url}/v1/models/{MODEL}:predict"
    done = {}

    def run(name, n_tokens):
        post(url, {"instances": [{"prompt": "a", "max_new_tokens": n_tokens,
                                  "ignore_eos": True}]}, timeout=120)
        done[name] = time.monotonic()

    long = threading.Thread(target=run, args=("long", 1000))
    long.start()
    while not metric(batch_server, "gpt2serve_running_sequences"):  # the long one runs
        time.sleep(0.005)
    run("short", 5)
    long.join()
    assert done["short"] < done["long"]


def assert_slots_freed(server, aborted_before: float, sequences: int) -> None:
    # The engine notices a cancellation at its next step, and a request still being prefilled
    # is not yet counted as running: wait for both figures to settle.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
            metric(server, "gpt2serve_running_sequences")
            or metric(server, "gpt2serve_aborted_sequences_total") < aborted_before + sequences):
        time.sleep(0.05)
    assert metric(server, "gpt2serve_running_sequences") == 0
    assert metric(server, "gpt2serve_aborted_sequences_total") == aborted_before + sequences


def abandoned_predict(server, instance: dict, timeout: float) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/models/{MODEL}:predict", json={"instances": [instance]},
                   timeout=timeout)


def test_disconnect_frees_the_slots(batch_server):
    aborted = metric(batch_server, "gpt2serve_aborted_sequences_total")
    abandoned_predict(batch_server, {"prompt": "a", "max_new_tokens": 1000, "n": 8,
                                     "ignore_eos": True}, timeout=1.0)
    assert_slots_freed(batch_server, aborted, 8)


def test_disconnect_around_prefill_frees_the_slot(batch_server):
    """A long prompt and a client that gives up after 50 ms: gone while queued or prefilling."""
    aborted = metric(batch_server, "gpt2serve_aborted_sequences_total")
    abandoned_predict(batch_server, {"prompt": "ROMEO: " * 250, "max_new_tokens": 200,
                                     "ignore_eos": True}, timeout=0.05)
    assert_slots_freed(batch_server, aborted, 1)


def test_stream_disconnect_frees_the_slot(batch_server):
    client = openai.OpenAI(base_url=f"{batch_server.url}/openai/v1", api_key="unused")
    aborted = metric(batch_server, "gpt2serve_aborted_sequences_total")
    stream = client.completions.create(model=MODEL, prompt="a", max_tokens=1000, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    assert_slots_freed(batch_server, aborted, 1)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_frees_the_slot_of_a_request_with_another_pipelined_behind(
        batch_server, stream):
    """Two requests written at once on one connection (HTTP/1.1 pipelining), the client gone
    while the first generates: it stops, as a request alone on its connection does, and the
    second never runs. uvicorn told only the latest request read, so the first generated its
    1,000 tokens for nobody."""
    aborted = metric(batch_server, "gpt2serve_aborted_sequences_total")
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 1000, "stream": stream,
                       "ignore_eos": True}).encode()
    head = (f"POST /openai/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", batch_server.port)) as sock:
        sock.sendall((head.encode() + body) * 2)
        deadline = time.monotonic() + 30
        while not metric(batch_server, "gpt2serve_running_sequences"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert_slots_freed(batch_server, aborted, 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_requests_pipelined_on_a_connection_are_read_a_few_ahead(batch_server):
    """A client that writes request after request on one connection, faster than they are
    answered (here it reads no answer): the server reads a few ahead of the one running,
    then waits for them to run. It read on, each request's read of its own body reading
    more: 60 KB requests held 600 MB of its memory after 12 s."""
    status = Path(f"/proc/{batch_server.proc.pid}/status")

    def rss() -> int:
        return int(status.read_text().split("VmRSS:")[1].split()[0]) * 1024

    pad = b"x" * 60_000
    request = (f"POST /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
               f"{len(pad)}\r\n\r\n").encode() + pad
    data = request * 16
    before, sent = rss(), 0
    with socket.create_connection(("127.0.0.1", batch_server.port)) as sock:
        sock.setblocking(False)
        until = time.monotonic() + 6
        while time.monotonic() < until:
            try:
                sent += sock.send(data[sent % len(data):])
            except BlockingIOError:
                time.sleep(0.01)
        grown = rss() - before
    assert sent > 8 * 2**20  # the server went on answering them
    assert grown < 150 * 2**20, f"{grown / 2**20:.0f} MB more after {sent / 2**20:.0f} MB sent"
    assert post(f"{batch_server.url}/v1/models/{MODEL}:predict",
                {"instances": [{"prompt": "a", "max_new_tokens": 2}]}).status_code == 200


def test_full_queue_answers_503_with_retry_after(batch_server):
    url = f"{batch_server.url}/v1/models/{MODEL}:predict"
    # 32 slots busy with n=16 x 2, then 40 queued, then the next is refused.
    hold = {"prompt": "a", "max_new_tokens": 600, "n": 16, "ignore_eos": True}

    async def flood():
        async with httpx.AsyncClient(timeout=120) as client:
            busy = [asyncio.create_task(client.post(url, json={"instances": [hold]}))
                    for _ in range(2)]
            await until_metric(client, batch_server, "gpt2serve_running_sequences", 32)
            busy += [asyncio.create_task(client.post(url, json={"instances": ["a"]}))
                     for _ in range(40)]
            await until_metric(client, batch_server, "gpt2serve_queue_depth", 40)
            t0 = time.monotonic()
            refused = await client.post(url, json={"instances": ["a"]})
            elapsed = time.monotonic() - t0
            for task in busy:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
            return refused, elapsed

    refused, elapsed = asyncio.run(flood())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "queue is full" in refused.json()["error"]
    assert elapsed < 1.0


def assert_idle_within_a_second(server) -> None:
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and (metric(server, "gpt2serve_running_sequences")
                                          or metric(server, "gpt2serve_queue_depth")):
        time.sleep(0.05)
    assert metric(server, "gpt2serve_running_sequences") == 0
    assert metric(server, "gpt2serve_queue_depth") == 0


def test_v1_request_with_one_invalid_instance_queues_nothing(batch_server):
    """The second instance only fails against the model's context: every instance is checked
    before any is queued, so the valid one does not generate for nobody."""
    assert_idle_within_a_second(batch_server)
    r = post(f"{batch_server.url}/v1/models/{MODEL}:predict", {"instances": [
        {"prompt": "ROMEO:", "max_new_tokens": 500, "ignore_eos": True},
        {"prompt": "JULIET:", "max_new_tokens": 5000}]})
    assert r.status_code == 400
    assert "instances[1]" in r.json()["error"] and "'max_new_tokens'" in r.json()["error"]
    assert_idle_within_a_second(batch_server)


def test_v2_request_with_one_invalid_prompt_queues_nothing(batch_server):
    body = {"inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES",
                        "data": ["ROMEO:", "zq" * 1200]}],
            "parameters": {"max_new_tokens": 500, "ignore_eos": True}}
    r = post(f"{batch_server.url}/v2/models/{MODEL}/infer", body)
    assert r.status_code == 400
    assert "text_input[1]" in r.json()["error"]
    assert_idle_within_a_second(batch_server)


def test_sibling_seeds_repeat_and_differ_from_neighbouring_seeds(batch_server):
    url = f"{batch_server.url}/v1/models/{MODEL}:predict"
    sample = {"prompt": "ROMEO:", "max_new_tokens": 16, "temperature": 1.0, "top_k": 0,
              "ignore_eos": True}
    three = post(url, {"instances": [{**sample, "seed": 5, "n": 3}]}).json()["predictions"][0]
    again = post(url, {"instances": [{**sample, "seed": 5, "n": 3}]}).json()["predictions"][0]
    six = post(url, {"instances": [{**sample, "seed": 6}]}).json()["predictions"][0]
    assert three == again
    assert len(set(three)) == 3 and six not in three


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/openai/v1", api_key="unused")


def test_openai_models_and_completion(oai):
    assert [m.id for m in oai.models.list()] == [MODEL]
    r = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=8, seed=3)
    assert len(r.choices) == 1 and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=8, seed=3)
    assert again.choices[0].text == r.choices[0].text


def test_openai_n_echo_stop_and_logprobs(oai):
    r = oai.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], max_tokens=6, n=2,
                               echo=True, logprobs=2, seed=9)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text.startswith("ROMEO:") and r.choices[3].text.startswith("JULIET:")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    # with echo, the prompt's tokens come first; nothing precedes the first to score it
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    # the 2 likeliest, and the token itself when it is not one of them (OpenAI's rule)
    assert all(len(top) <= 3 and token in top
               for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:]))
    full = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, seed=4,
                                  temperature=1.0).choices[0].text
    stop = full[10:12]
    cut = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, seed=4,
                                 temperature=1.0, stop=[stop]).choices[0]
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"


def test_openai_streaming_matches_non_streaming(oai):
    kwargs = dict(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=21)
    whole = oai.completions.create(**kwargs).choices[0].text
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True},
                                         **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens > 0
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason in ("length", "stop")


def test_openai_raw_sse_ends_with_done(server):
    with httpx.stream("POST", f"{server.url}/openai/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


@pytest.mark.parametrize("body,status,param", [
    ({"model": MODEL, "prompt": "a", "max_tokens": 5000}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": 5}, 400, "prompt"),
    ({"model": MODEL, "prompt": "a", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": MODEL, "prompt": "a", "suffix": "b"}, 400, "suffix"),
    ({"model": MODEL, "prompt": "a", "bogus": 1}, 400, "bogus"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model"),
])
def test_openai_errors(server, body, status, param):
    r = post(f"{server.url}/openai/v1/completions", body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_chat_completions_say_why_not(oai):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    # a model this server lacks is named first, as on /completions (and vLLM's chat route)
    with pytest.raises(openai.NotFoundError, match="does not exist") as e:
        oai.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["param"] == "model" and e.value.body["type"] == "not_found_error"
