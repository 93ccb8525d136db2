"""A load over HTTP and gRPC against the real server with the demo model: every sampling
parameter on every front end (V1, V2 generate, OpenAI completions streamed and not, gRPC
ModelInfer) at once, with 0 x 5xx; penalised completions arriving while V1 clients decode (a
mix that once failed half of them, whichever torch mode their first token was sampled in);
and greedy requests that give amid the load the text they give alone.

GPT2SERVE_LOAD_RUNS repeats the penalised repro (10 for the issue's check; 1 in `make test`).
"""

from __future__ import annotations

import asyncio
import os
import random

import grpc
import httpx
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from conftest import free_port, running_server
from test_grpc import double_param

MODEL = "aitextgen"
RUNS = int(os.environ.get("GPT2SERVE_LOAD_RUNS", 1))
PROMPTS = ["ROMEO:", "JULIET: O Romeo", "KING RICHARD III:\nNow is the winter", "First Citizen:",
           "", "héllo wörld ✓"]


@pytest.fixture(scope="module")
def srv():
    port = free_port()
    with running_server("--enable_grpc", "true", "--grpc_port", str(port),
                        "--max_batch_size", "16") as server:
        server.grpc_port = port
        yield server


def sampling(rng: random.Random) -> dict:
    """Parameters every front end takes by these names (SamplingParams')."""
    p: dict = {"seed": rng.randrange(2**31), "max_new_tokens": rng.randint(1, 24)}
    if rng.random() < 0.3:
        p["temperature"] = 0
    else:
        p.update(temperature=rng.choice([0.5, 1.0, 1.5]), top_k=rng.choice([0, 5, 50]),
                 top_p=rng.choice([1.0, 0.9, 0.5]))
    extras = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": -0.4,
              "min_tokens": 3, "ignore_eos": True, "stop": ["e"], "stop_token_ids": [13],
              "logit_bias": {"11": 5.0}}
    for name, value in extras.items():
        if rng.random() < 0.25:
            p[name] = value
    if "min_tokens" in p:  # at most max_new_tokens, as vLLM requires
        p["min_tokens"] = min(p["min_tokens"], p["max_new_tokens"])
    if rng.random() < 0.2 and p["temperature"]:
        p["n"] = 2
    return p


def openai_body(p: dict, prompt: str, rng: random.Random) -> dict:
    body = {"model": MODEL, "prompt": prompt, **{k: v for k, v in p.items()
                                                   if k != "max_new_tokens"},
            "max_tokens": p["max_new_tokens"], "stream": rng.random() < 0.5}
    if rng.random() < 0.3:
        body["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.15:
        body["echo"] = True
    return body


async def rest(client: httpx.AsyncClient, url: str, body: dict) -> int:
    if body.get("stream"):
        async with client.stream("POST", url, json=body) as r:
            text = "".join([line async for line in r.aiter_lines()])
            assert "internal" not in text.lower(), text
            return r.status_code
    r = await client.post(url, json=body)
    assert r.status_code < 500, (url, body, r.text)
    return r.status_code


def grpc_call(stub, p: dict, prompt: str) -> grpc.StatusCode:
    """ModelInfer with the parameters that gRPC holds (scalars; one stop string)."""
    tensor = pb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[prompt.encode()]))
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor])
    for name, value in p.items():
        param = request.parameters[name]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.MergeFromString(double_param(value))
        elif name == "stop":  # (one stop string; gRPC parameters hold scalars)
            param.string_param = value[0]
    try:
        stub.ModelInfer(request, timeout=120)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_penalised_completions_beside_v1_clients_all_succeed(srv):
    """Four V1 clients decode 120 tokens each, again and again, while 24 OpenAI completions
    with repetition_penalty 1.3 arrive 40 ms apart: every one answers 200."""
    async def v1_client(client, done: asyncio.Event) -> list[int]:
        codes = []
        while not done.is_set():
            r = await client.post(f"{srv.url}/v1/models/{MODEL}:predict",
                                  json={"instances": [{"prompt": "ROMEO:",
                                                       "max_new_tokens": 120}]})
            codes.append(r.status_code)
        return codes

    async def penalised(client, i: int) -> int:
        await asyncio.sleep(0.04 * i)
        r = await client.post(f"{srv.url}/openai/v1/completions", json={
            "model": MODEL, "prompt": "JULIET:", "max_tokens": 40, "repetition_penalty": 1.3,
            "temperature": 0.8, "seed": i})
        assert r.status_code == 200, r.text
        return r.status_code

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            done = asyncio.Event()
            v1 = [asyncio.create_task(v1_client(client, done)) for _ in range(4)]
            await asyncio.sleep(0.2)
            codes = await asyncio.gather(*(penalised(client, i) for i in range(24)))
            done.set()
            return codes, await asyncio.gather(*v1)

    for _ in range(RUNS):
        codes, v1 = asyncio.run(scenario())
        assert codes == [200] * 24
        assert all(c == 200 for client in v1 for c in client) and all(v1)


def test_every_parameter_on_every_front_end_at_once_gives_no_5xx(srv):
    rng = random.Random(5)
    plans = []
    for i in range(48):
        p, prompt = sampling(rng), rng.choice(PROMPTS)
        front = ["v1", "v2", "openai", "grpc"][i % 4]
        if front == "v1":
            plans.append((front, f"{srv.url}/v1/models/{MODEL}:predict",
                          {"instances": [{"prompt": prompt, **p}]}))
        elif front == "v2":  # (one text_output: n is 1 here)
            plans.append((front, f"{srv.url}/v2/models/{MODEL}/generate",
                          {"text_input": prompt, "parameters": {**p, "n": 1}}))
        elif front == "openai":
            plans.append((front, f"{srv.url}/openai/v1/completions", openai_body(p, prompt, rng)))
        else:
            plans.append((front, prompt, p))

    async def scenario(stub):
        async with httpx.AsyncClient(timeout=120) as client:
            calls = [rest(client, target, body) if front != "grpc"
                     else asyncio.to_thread(grpc_call, stub, body, target)
                     for front, target, body in plans]
            return await asyncio.gather(*calls)

    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        results = asyncio.run(scenario(stub))
    assert all(r in (200, grpc.StatusCode.OK) for r in results), list(zip(plans, results))


def test_greedy_requests_give_amid_load_the_text_they_give_alone(srv):
    """Greedy completions with penalties, bias, min_tokens and stops: the same text alone and
    amid sampled neighbours (float32: a neighbour changes no logit's value)."""
    rng = random.Random(11)
    greedy = []
    for i in range(10):
        p = {**sampling(rng), "temperature": 0, "n": 1}
        greedy.append(openai_body(p, PROMPTS[i % len(PROMPTS)], rng) | {"stream": False})
    noise = [openai_body({**sampling(rng), "temperature": 1.0}, "ROMEO:", rng)
             | {"stream": False} for _ in range(10)]
    url = f"{srv.url}/openai/v1/completions"

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            alone = [(await client.post(url, json=b)).json() for b in greedy]
            amid = await asyncio.gather(*(client.post(url, json=b) for b in greedy + noise))
            return alone, [r.json() for r in amid[:len(greedy)]]

    alone, amid = asyncio.run(scenario())
    assert [[c["text"] for c in r["choices"]] for r in amid] == [
        [c["text"] for c in r["choices"]] for r in alone]
