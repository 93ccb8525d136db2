"""Serving metrics read from /metrics over HTTP, and liveness that follows the engine's step
thread."""

import asyncio
import ctypes
import json
import re
import time

import httpx
import openai
import pytest

from conftest import running_server
from gpt2serve import checkpoint
from gpt2serve.engine import Engine, EngineConfig, EngineStopped, Prompt, Request
from gpt2serve.sampling import SamplingParams

MODEL = "aitextgen"
SERVER_LEVEL = ("gpt2serve_models_loaded", "gpt2serve_memory_budget_bytes",
                "gpt2serve_http_requests")


def scrape(srv) -> dict[str, float]:
    """Every gpt2serve_ series, keyed as written but for the `model` label, which each engine
    series must carry, naming the server's one model."""
    text = httpx.get(f"{srv.url}/metrics").text
    series = {}
    for m in re.finditer(r'^(gpt2serve_[a-z0-9_]+)(?:\{((?:[^"}]|"[^"]*")*)\})? ([0-9.e+-]+)$',
                         text, re.M):  # (a label's value may hold braces: a route's template)
        name, labels = m.group(1), (m.group(2) or "").split(",")
        if not name.startswith(SERVER_LEVEL):
            assert f'model="{MODEL}"' in labels, m.group(0)
        labels = ",".join(label for label in labels if label and not label.startswith("model="))
        series[f"{name}{{{labels}}}" if labels else name] = float(m.group(3))
    return series


def delta(before, after, name) -> float:
    return after[name] - before.get(name, 0.0)


@pytest.fixture(scope="module")
def one_slot(long_model):
    """One slot, and a model whose 1,024-token context lets a long request last long enough
    (about a second) to be timed against the milliseconds its answer takes to arrive."""
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--max_batch_size", "1") as srv:
        yield srv


def test_serving_metrics(one_slot):
    srv = one_slot
    client = openai.OpenAI(base_url=f"{srv.url}/openai/v1", api_key="unused")
    before = scrape(srv)
    tokens = 40
    kwargs = dict(model=MODEL, max_tokens=tokens, extra_body={"ignore_eos": True})
    first = client.completions.create(prompt="ROMEO: O Romeo", **kwargs)
    chunks = list(client.completions.create(prompt="JULIET:", stream=True,
                                            stream_options={"include_usage": True},
                                            **kwargs))
    after = scrape(srv)
    prompt_tokens = first.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
    assert delta(before, after, "gpt2serve_prompt_tokens_total") == prompt_tokens
    assert delta(before, after, "gpt2serve_e2e_request_latency_seconds_count") == 2
    assert delta(before, after, "gpt2serve_request_queue_time_seconds_count") == 2
    # one gap between each two consecutive tokens of each sequence
    assert delta(before, after, "gpt2serve_inter_token_latency_seconds_count") == 2 * (tokens - 1)
    e2e = delta(before, after, "gpt2serve_e2e_request_latency_seconds_sum")
    itl = delta(before, after, "gpt2serve_inter_token_latency_seconds_sum")
    assert 0 < itl < e2e
    assert after['gpt2serve_inter_token_latency_seconds_bucket{le="+Inf"}'] == \
        after["gpt2serve_inter_token_latency_seconds_count"]
    # a decode batch per decode step (a step that only read a prompt observed a batch of 0)
    assert delta(before, after, "gpt2serve_batch_size_count") == \
        delta(before, after, "gpt2serve_time_per_output_token_seconds_count") > 0
    # one model, no budget: no budget's series (it read 0, a budget of nothing)
    assert not any(name.startswith("gpt2serve_memory_budget_bytes") for name in after)


def test_every_http_answer_is_counted_by_route_and_status(tiny_model):
    """A 4xx or 5xx rate could not be read: KServe's request_predict_seconds counts V1 and V2
    predictions only, its refusals among them, and nothing counted the other routes. Each
    answer is counted by its route's template and the status the client got, refusals made
    before any route (the API key's 401) and HEAD requests included."""
    with running_server("--model_dir", str(tiny_model), "--enable_grpc", "false",
                        "--api_key", "k", headers={"Authorization": "Bearer k"}) as srv:
        auth = {"Authorization": "Bearer k"}
        predict = "/v1/models/{model_name}:predict"
        before = scrape(srv)
        for _ in range(2):
            assert httpx.post(f"{srv.url}/v1/models/{MODEL}:predict", headers=auth,
                              json={"instances": ["a"]}).status_code == 200
        calls = [("post", f"/v1/models/{MODEL}:predict", {"instances": [{"n": -1}]}, 400,
                  predict),
                 ("post", "/v1/models/nope:predict", {"instances": ["a"]}, 404, predict),
                 ("post", "/openai/v1/completions", {"model": MODEL, "prompt": "a",
                                                     "max_tokens": 1}, 200,
                  "/openai/v1/completions"),
                 ("head", "/v2/health/ready", None, 200, "/v2/health/ready"),
                 ("get", "/no/such/route", None, 404, "none")]
        for method, path, body, status, _ in calls:
            r = httpx.request(method, f"{srv.url}{path}", headers=auth, json=body)
            assert r.status_code == status, (path, r.text)
        assert httpx.post(f"{srv.url}/openai/v1/completions", json={}).status_code == 401
        after = scrape(srv)

    def counted(route: str, status: int) -> float:
        return delta(before, after,
                     f'gpt2serve_http_requests_total{{route="{route}",status="{status}"}}')

    assert counted(predict, 200) == 2
    for _, _, _, status, route in calls:
        assert counted(route, status) == 1, (route, status)
    assert counted("none", 401) == 1  # refused by the key, before any route


def test_queue_time_is_the_wait_for_a_slot(one_slot):
    """One slot: a request sent while a long one streams waits for it to finish. It is sent
    once the long one's first token has come (so it is running, whatever the machine's speed),
    and the wait its client sees, from sending it to the long one's end, is the rest of a
    500-token generation (about a second), beside which what delivery adds is small on any
    machine."""
    srv = one_slot
    before = scrape(srv)
    long = {"model": MODEL, "prompt": "a", "max_tokens": 500, "stream": True,
            "ignore_eos": True}
    short = {"instances": [{"prompt": "a", "max_new_tokens": 4, "ignore_eos": True}]}

    async def two():
        async with httpx.AsyncClient(timeout=120) as client:
            async with client.stream("POST", f"{srv.url}/openai/v1/completions",
                                     json=long) as first:
                assert first.status_code == 200, await first.aread()
                lines = first.aiter_lines()
                while not (await anext(lines)).startswith("data: "):
                    pass
                sent = time.monotonic()
                second = asyncio.create_task(
                    client.post(f"{srv.url}/v1/models/{MODEL}:predict", json=short))
                events = [line async for line in lines if line.startswith("data: ")]
                freed = time.monotonic()
            assert (await second).status_code == 200
            # the long one ran to its length (a stream that failed partway ends in [DONE] too)
            assert events[-1] == "data: [DONE]", events[-2:]
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
            return freed - sent

    waited = asyncio.run(two())
    after = scrape(srv)
    queued = delta(before, after, "gpt2serve_request_queue_time_seconds_sum")
    e2e = delta(before, after, "gpt2serve_e2e_request_latency_seconds_sum")
    assert delta(before, after, "gpt2serve_request_queue_time_seconds_count") == 2
    # The server counts the short one's wait from its arrival, a little after it was sent,
    # to its admission once the long one has ended, about when the client saw that end: not
    # far from `waited`, and not near half of it. The two requests' whole times hold more.
    assert waited / 2 < queued < e2e, (queued, e2e, waited)


def test_liveness_answers_on_both_kserve_paths(one_slot):
    assert httpx.get(f"{one_slot.url}/").json() == {"status": "alive"}
    assert httpx.get(f"{one_slot.url}/v2/health/live").json() == {"live": True}


# ---- liveness when the step thread dies --------------------------------------------------

def kill_thread(thread, exc=SystemExit) -> None:
    """Raise `exc` inside `thread` at its next bytecode, as an uncaught error in the step loop
    would end it (the loop isolates Exceptions, not BaseExceptions)."""
    done = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                      ctypes.py_object(exc))
    assert done == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_liveness_fails_and_work_fails_cleanly_when_the_step_thread_dies(tiny_model):
    """No request can kill the step thread (the loop catches every Exception), so it is
    killed from outside here, on a real engine with a real model; /v2/health/live and `/`
    are health.liveness() over this same engine."""
    from gpt2serve.server.health import liveness

    model, tokenizer = checkpoint.load(str(tiny_model))
    engine = Engine(model, tokenizer, EngineConfig(max_batch_size=2))
    long = SamplingParams.from_dict({"max_new_tokens": 100, "ignore_eos": True})

    async def scenario():
        requests = engine.submit([Prompt(tokenizer.encode("ROMEO:"), long)])
        events = engine.stream(requests)
        _, first = await anext(events)  # the step loop is running
        assert first.token_id is not None
        assert engine.alive and liveness(engine, {"live": True}, {"live": False}).status_code == 200
        thread = engine.loop._thread
        kill_thread(thread)
        thread.join(timeout=10)
        with pytest.raises(EngineStopped, match="step thread has died"):
            async for _ in events:  # fails, does not wait forever
                pass
        with pytest.raises(EngineStopped, match="step thread has died"):
            engine.submit([Prompt(tokenizer.encode("JULIET:"), long)])
        # a call that passed submit's `alive` check as the thread died reaches the queue,
        # where nothing would ever step it: refused there too
        late = Request(Prompt(tokenizer.encode("JULIET:"), long), 0, 100, asyncio.Queue(),
                       asyncio.get_running_loop())
        with pytest.raises(EngineStopped, match="step thread has died"):
            engine.scheduler.add([late])

    asyncio.run(asyncio.wait_for(scenario(), timeout=30))
    assert not engine.alive
    response = liveness(engine, {"live": True}, {"live": False})
    assert response.status_code == 503
    assert b'"live":false' in response.body
    engine.stop(timeout=1)
