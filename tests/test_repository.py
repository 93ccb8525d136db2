"""Many models in one server, over HTTP and gRPC against a real server process: a repository
folder of real model folders (distinct random weights), the V2 repository extension (index,
load, unload), the memory budget's least-recently-used unloading, routing by name on every
protocol, the `model` label on the metrics, and an unload under load losing no accepted
request."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time

import grpc
import httpx
import kserve.metrics
import prometheus_client
import pytest
import torch
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from conftest import ServerProcess, make_hf_model, metric, post

NAMES = ("alpha", "beta", "gamma")
KV = 256 * 1024
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for seed, name in enumerate(NAMES):
        make_hf_model(root / name, seed=seed + 1)
    (root / "notes").mkdir()  # not a model folder: skipped (with a warning)
    return root


@pytest.fixture(scope="module")
def model_bytes(repo):
    """What one loaded model holds (weights and its KV cache), measured on a real engine."""
    from gpt2serve import checkpoint
    from gpt2serve.engine import Engine, EngineConfig

    model, tokenizer = checkpoint.load(repo / "alpha")
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_memory=KV), threaded=False)
    return engine.memory_bytes


@pytest.fixture(scope="module")
def references(repo):
    """Each model's greedy text, served alone by a single-model server."""
    texts = {}
    for name in NAMES:
        srv = ServerProcess("--model_dir", str(repo / name), "--enable_grpc", "false")
        try:
            srv.wait_ready()
            texts[name] = v1(srv, "aitextgen", "ROMEO:").json()["predictions"][0]
        finally:
            srv.stop()
    return texts


@pytest.fixture(scope="module")
def two_fit(repo, model_bytes):
    """A server whose budget holds two of the three models; alpha loads at start."""
    srv = ServerProcess("--model_dir", str(repo), "--load_models", "alpha",
                        "--memory_budget", str(int(model_bytes * 2.5)),
                        "--kv_cache_memory", str(KV), "--max_batch_size", "8")
    try:
        srv.wait_ready("alpha")
        srv.grpc_port = int(srv.proc.args[srv.proc.args.index("--grpc_port") + 1])
        yield srv
    finally:
        srv.stop()


def v1(srv, name: str, prompt: str, **params) -> httpx.Response:
    return post(f"{srv.url}/v1/models/{name}:predict",
                {"instances": [{"prompt": prompt, **GREEDY, **params}]})


async def busy(client: httpx.AsyncClient, url: str, model: str) -> list[asyncio.Task]:
    """32 streams of 120 tokens on `model`, once 8 have their first token (with
    --max_batch_size 8, the rest queue): its drain then takes 480 steps, an unload's too."""
    body = {"model": model, "prompt": "a", "max_tokens": 120, "ignore_eos": True,
            "temperature": 0, "stream": True}

    async def stream(started: asyncio.Event) -> None:
        async with client.stream("POST", f"{url}/openai/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    started.set()

    started = [asyncio.Event() for _ in range(32)]
    running = [asyncio.create_task(stream(e)) for e in started]
    for e in started[:8]:
        await e.wait()
    return running


def index(srv) -> dict[str, str]:
    r = httpx.post(f"{srv.url}/v2/repository/index", timeout=30)
    assert r.status_code == 200, r.text
    return {m["name"]: m["state"] for m in r.json()}


def test_index_load_at_start_and_on_first_request(two_fit, references):
    assert index(two_fit) == {"alpha": "READY", "beta": "UNAVAILABLE", "gamma": "UNAVAILABLE"}
    r = httpx.post(f"{two_fit.url}/v2/repository/index", json={"ready": True})
    assert [m["name"] for m in r.json()] == ["alpha"]
    # beta loads on its first request, and answers with its own weights' text
    r = v1(two_fit, "beta", "ROMEO:")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0] == references["beta"]
    assert index(two_fit)["beta"] == "READY"
    assert v1(two_fit, "alpha", "ROMEO:").json()["predictions"][0] == references["alpha"]
    assert len(set(references.values())) == len(NAMES)  # the models do differ
    assert v1(two_fit, "delta", "ROMEO:").status_code == 404
    assert httpx.post(f"{two_fit.url}/v2/repository/models/delta/load").status_code == 404


def test_a_load_past_the_budget_unloads_the_least_recently_used_idle_model(two_fit,
                                                                            references):
    for name in ("alpha", "beta"):  # both loaded; beta used last
        assert v1(two_fit, name, "ROMEO:").status_code == 200
    unloads = metric(two_fit, "gpt2serve_model_unloads_total", model="alpha", reason="memory")
    assert v1(two_fit, "gamma", "ROMEO:").json()["predictions"][0] == references["gamma"]
    assert index(two_fit) == {"alpha": "UNAVAILABLE", "beta": "READY", "gamma": "READY"}
    assert metric(two_fit, "gpt2serve_model_unloads_total", model="alpha",
                  reason="memory") == unloads + 1
    assert metric(two_fit, "gpt2serve_models_loaded") == 2
    assert (metric(two_fit, "gpt2serve_model_memory_bytes", model="beta")
            + metric(two_fit, "gpt2serve_model_memory_bytes", model="gamma")
            <= metric(two_fit, "gpt2serve_memory_budget_bytes"))
    # and alpha comes back the same, unloading beta (now the least recently used)
    assert v1(two_fit, "alpha", "ROMEO:").json()["predictions"][0] == references["alpha"]
    assert index(two_fit) == {"alpha": "READY", "beta": "UNAVAILABLE", "gamma": "READY"}


def test_every_protocol_routes_by_name(two_fit, references):
    name, prompt = "gamma", "ROMEO:"
    expected = references[name]
    r = post(f"{two_fit.url}/v2/models/{name}/infer", {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": [prompt]}],
        "parameters": GREEDY})
    assert r.json()["outputs"][0]["data"] == [expected]
    r = post(f"{two_fit.url}/v2/models/{name}/generate",
             {"text_input": prompt, "parameters": GREEDY})
    assert r.json() == {"model_name": name, "text_output": expected}
    r = post(f"{two_fit.url}/openai/v1/completions",
             {"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
              "ignore_eos": True})
    assert r.json()["model"] == name and prompt + r.json()["choices"][0]["text"] == expected
    r = post(f"{two_fit.url}/openai/v1/completions", {"prompt": prompt})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"  # several: say which
    r = post(f"{two_fit.url}/openai/v1/completions", {"model": "delta", "prompt": prompt})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    listed = httpx.get(f"{two_fit.url}/openai/v1/models").json()["data"]
    assert [m["id"] for m in listed] == list(NAMES)
    assert all(m["max_model_len"] == 128 for m in listed)
    r = post(f"{two_fit.url}/tokenize", {"model": name, "prompt": prompt})
    assert r.status_code == 200 and r.json()["count"] >= 1
    r = post(f"{two_fit.url}/v1/models/{name}:predict", {"instances": [prompt]})
    assert r.status_code == 200
    with grpc.insecure_channel(f"127.0.0.1:{two_fit.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name=name, inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="text_input", datatype="BYTES", shape=[1],
                contents=pb.InferTensorContents(bytes_contents=[prompt.encode()]))])
        for key, value in GREEDY.items():
            field = "bool_param" if isinstance(value, bool) else "int64_param"
            request.parameters[key].CopyFrom(pb.InferParameter(**{field: value}))
        reply = stub.ModelInfer(request, timeout=60)
        assert reply.outputs[0].contents.bytes_contents == [expected.encode()]
    # every series carries its model
    assert metric(two_fit, "gpt2serve_generated_tokens_total", model=name) > 0
    assert metric(two_fit, "gpt2serve_time_to_first_token_seconds_count", model=name) > 0


def test_unloading_under_load_loses_no_accepted_request(two_fit):
    """Three streams on alpha each have their first token (accepted, running) when the unload
    is asked for: the unload returns once they have finished, whole; then alpha is 404."""
    url = f"{two_fit.url}/openai/v1/completions"
    body = {"model": "alpha", "prompt": "a", "max_tokens": 120, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}

    async def scenario():
        async with httpx.AsyncClient(timeout=120) as client:
            async def stream(started: asyncio.Event) -> tuple[int, str | None]:
                tokens, finish = 0, None
                async with client.stream("POST", url, json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            for choice in chunk["choices"]:
                                finish = choice["finish_reason"] or finish
                            if chunk.get("usage"):
                                tokens = chunk["usage"]["completion_tokens"]
                            started.set()
                return tokens, finish

            started = [asyncio.Event() for _ in range(3)]
            running = [asyncio.create_task(stream(e)) for e in started]
            for e in started:
                await e.wait()
            unload = await client.post(f"{two_fit.url}/v2/repository/models/alpha/unload")
            assert unload.status_code == 200 and unload.json() == {"name": "alpha",
                                                                 "unload": True}
            assert all(t.done() for t in running)  # the unload waited for them
            for tokens, finish in await asyncio.gather(*running):
                assert (tokens, finish) == (120, "length")
            after = await client.post(f"{two_fit.url}/v1/models/alpha:predict",
                                      json={"instances": ["a"]})
            # (V1 said it did not exist)
            assert after.status_code == 404 and "unloaded" in after.json()["error"]
            r = await client.post(url, json={"model": "alpha", "prompt": "a"})
            assert r.status_code == 404 and "unloaded" in r.json()["error"]["message"]

    assert v1(two_fit, "alpha", "ROMEO:").status_code == 200
    asyncio.run(scenario())
    assert index(two_fit)["alpha"] == "UNAVAILABLE"
    assert "alpha" not in [m["id"] for m in httpx.get(
        f"{two_fit.url}/openai/v1/models").json()["data"]]
    r = httpx.post(f"{two_fit.url}/v2/repository/models/alpha/load", timeout=60)
    assert r.status_code == 200 and r.json() == {"name": "alpha", "load": True}
    assert index(two_fit)["alpha"] == "READY"
    assert v1(two_fit, "alpha", "ROMEO:").status_code == 200


def test_a_folder_added_while_serving_is_found(two_fit, repo):
    shutil.copytree(repo / "beta", repo / "delta")
    try:
        assert v1(two_fit, "delta", "ROMEO:").status_code == 200
        assert index(two_fit)["delta"] == "READY"
        # removed, then unloaded (as KServe's agent does): gone from the index
        shutil.rmtree(repo / "delta")
        r = httpx.post(f"{two_fit.url}/v2/repository/models/delta/unload", timeout=60)
        assert r.status_code == 200
        assert "delta" not in index(two_fit)
    finally:
        shutil.rmtree(repo / "delta", ignore_errors=True)


def test_the_repository_api_stays_behind_the_key_but_for_the_local_agent(repo):
    srv = ServerProcess("--model_dir", str(repo), "--load_models", "none",
                        "--api_key", "sekrit", "--enable_grpc", "false")
    key = {"Authorization": "Bearer sekrit"}
    try:
        srv.wait_ready("alpha", headers=key)
        assert httpx.post(f"{srv.url}/v2/repository/index").status_code == 401
        forwarded = {"X-Forwarded-For": "203.0.113.9"}  # outside traffic through a proxy
        r = httpx.post(f"{srv.url}/v2/repository/models/beta/load", headers=forwarded)
        assert r.status_code == 401
        # a browser on this machine (a page of any site posting a form to localhost, or to
        # its own name rebound to 127.0.0.1): it sends Origin or Sec-Fetch-Site
        for browser in ({"Origin": srv.url}, {"Sec-Fetch-Site": "cross-site"}):
            r = httpx.post(f"{srv.url}/v2/repository/models/beta/unload", headers=browser)
            assert r.status_code == 401, browser
        # KServe's model agent: same pod, loopback, no key, no forwarding header
        r = httpx.post(f"{srv.url}/v2/repository/models/beta/load", timeout=60)
        assert r.status_code == 200
        r = httpx.post(f"{srv.url}/v2/repository/index", headers=key)
        assert {m["name"]: m["state"] for m in r.json()}["beta"] == "READY"
        assert httpx.get(f"{srv.url}/v2/health/ready").status_code == 200
    finally:
        srv.stop()


def test_grpc_tells_an_unloaded_model_as_rest_does(two_fit):
    """gRPC said 'does not exist' of a model unloaded through the API, which the index lists
    and REST calls unloaded."""
    url = f"{two_fit.url}/v2/repository/models/beta"
    assert httpx.post(f"{url}/unload", timeout=60).status_code == 200
    try:
        with grpc.insecure_channel(f"127.0.0.1:{two_fit.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as e:
                stub.ModelInfer(pb.ModelInferRequest(model_name="beta", inputs=[
                    pb.ModelInferRequest.InferInputTensor(
                        name="text_input", datatype="BYTES", shape=[1],
                        contents=pb.InferTensorContents(bytes_contents=[b"a"]))]), timeout=60)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert "'beta' is unloaded" in e.value.details(), e.value.details()
            assert "(gRPC RepositoryModelLoad) brings it back" in e.value.details()  # its way
            # readiness and metadata said "does not exist" (KServe's lookups), REST's too
            for method, request in [(stub.ModelReady, pb.ModelReadyRequest(name="beta")),
                                    (stub.ModelMetadata, pb.ModelMetadataRequest(name="beta"))]:
                with pytest.raises(grpc.RpcError) as e:
                    method(request, timeout=60)
                assert e.value.code() == grpc.StatusCode.NOT_FOUND
                assert "'beta' is unloaded" in e.value.details(), e.value.details()
        for path in ("/v2/models/beta", "/v2/models/beta/ready", "/v1/models/beta"):
            r = httpx.get(two_fit.url + path, timeout=30)
            assert r.status_code == 404 and "'beta' is unloaded" in r.json()["error"], r.text
        # a wrong name's 404 names the models a request may use, on each protocol; a load's
        # every model there is, the unloaded one too, which it may load
        r = httpx.get(f"{two_fit.url}/v2/models/nope/ready", timeout=30)
        assert r.json()["error"].endswith("this server has 'alpha', 'gamma'"), r.text
        r = post(f"{two_fit.url}/openai/v1/completions", {"model": "nope", "prompt": "a"})
        assert r.json()["error"]["message"].endswith("this server has 'alpha', 'gamma'"), r.text
        r = httpx.post(f"{two_fit.url}/v2/repository/models/nope/load", timeout=30)
        assert r.json()["error"].endswith("this server has 'alpha', 'beta', 'gamma'"), r.text
        r = post(f"{two_fit.url}/openai/v1/completions", {"prompt": "a"})  # (which may load)
        assert r.json()["error"]["message"].endswith("has 'alpha', 'beta', 'gamma'"), r.text
    finally:
        assert httpx.post(f"{url}/load", timeout=60).status_code == 200
    for path in ("/v2/models/beta/ready", "/v1/models/beta"):  # and ready again
        r = httpx.get(two_fit.url + path, timeout=30)
        assert r.status_code == 200 and r.json() == {"name": "beta", "ready": True}, r.text
    metadata = httpx.get(f"{two_fit.url}/v2/models/beta", timeout=30).json()
    assert [i["name"] for i in metadata["inputs"]] == ["text_input"], metadata


def test_no_such_model_s_404_cuts_the_name_on_every_protocol(two_fit):
    """KServe's 'Model with name ... does not exist.' echoed a name of any length: a 5,000
    character name came back whole from every route that names a model (gRPC to its 1 KiB
    cap). It is quoted (a name of spaces read as a hole in the sentence), cut past 128
    characters, the longest name a model may have, and the 404 names the models there are,
    as the OpenAI route's does."""
    names = "does not exist; this server has 'alpha', 'beta', 'gamma'"
    said = {"x" * 5000: f"Model with name '{'x' * 128}'... {names}",
            "x" * 129: f"Model with name '{'x' * 128}'... {names}",
            "y" * 128: f"Model with name '{'y' * 128}' {names}",
            " ": f"Model with name ' ' {names}"}
    routes = [("GET", "/v1/models/{}"), ("POST", "/v1/models/{}:predict"),
              ("POST", "/v1/models/{}:explain"),
              ("GET", "/v2/models/{}"), ("GET", "/v2/models/{}/ready"),
              ("POST", "/v2/models/{}/infer"), ("POST", "/v2/models/{}/generate"),
              ("POST", "/v2/models/{}/generate_stream"),
              ("POST", "/v2/repository/models/{}/load"),
              ("POST", "/v2/repository/models/{}/unload")]
    for method, route in routes:
        for name, message in said.items():
            r = httpx.request(method, two_fit.url + route.format(name), timeout=30)
            assert r.status_code == 404, (route, r.text[:200])
            assert r.json() == {"error": message}, route
    with grpc.insecure_channel(f"127.0.0.1:{two_fit.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        long, cut = "x" * 5000, said["x" * 5000]
        for method, request, message in [
                (stub.ModelReady, pb.ModelReadyRequest(name=long), cut),
                (stub.ModelMetadata, pb.ModelMetadataRequest(name=long), cut),
                (stub.ModelInfer, pb.ModelInferRequest(model_name=long), cut),
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=long), cut),
                (stub.ModelReady, pb.ModelReadyRequest(name=""),
                 f"Model with name '' {names}")]:
            with pytest.raises(grpc.RpcError) as e:
                method(request, timeout=60)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert e.value.details() == message


def test_an_unload_waiting_for_another_is_unloading_in_the_index_at_once(two_fit):
    """One load or unload at a time: alpha's unload waits while beta's drains. alpha already
    refused requests as unloaded, and the index still said READY (and `{"ready": true}`
    listed it) for as long as beta's drain took."""
    repo_url = f"{two_fit.url}/v2/repository"
    for name in ("alpha", "beta"):
        assert httpx.post(f"{repo_url}/models/{name}/load", timeout=60).status_code == 200

    async def scenario() -> dict[str, str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def states() -> dict[str, str]:
                r = await client.post(f"{repo_url}/index")
                return {m["name"]: m["state"] for m in r.json()}

            running = await busy(client, two_fit.url, "beta")
            unloads = [asyncio.create_task(client.post(f"{repo_url}/models/beta/unload"))]
            while (await states())["beta"] != "UNLOADING":
                await asyncio.sleep(0.005)
            unloads.append(asyncio.create_task(client.post(f"{repo_url}/models/alpha/unload")))
            while (seen := await states())["alpha"] == "READY":
                await asyncio.sleep(0.005)
            await asyncio.gather(*unloads, *running)
            return seen

    try:
        seen = asyncio.run(scenario())
        assert seen["alpha"] == "UNLOADING" and seen["beta"] == "UNLOADING", seen
    finally:
        for name in ("alpha", "beta"):
            assert httpx.post(f"{repo_url}/models/{name}/load", timeout=60).status_code == 200


def test_an_empty_repository_is_ready(tmp_path):
    srv = ServerProcess("--model_dir", str(tmp_path), "--enable_grpc", "false")
    try:
        srv.wait_ready(path="/v2/health/ready")
        assert httpx.post(f"{srv.url}/v2/repository/index").json() == []
        make_hf_model(tmp_path / "late")
        assert index(srv) == {"late": "UNAVAILABLE"}  # listed before any request names it
        assert v1(srv, "late", "ROMEO:").status_code == 200
    finally:
        srv.stop()


def test_a_single_model_keeps_the_repository_api_off(server):
    assert httpx.post(f"{server.url}/v2/repository/index").status_code == 404
    r = httpx.post(f"{server.url}/v2/repository/models/x/load", json={"bogus": 1})
    assert r.status_code == 404, r.text  # off, whatever the body


def test_the_repository_calls_refuse_a_body_they_cannot_honour(two_fit):
    """Triton's load takes `parameters` that override a model's configuration or files:
    ignored, a client would believe them applied."""
    before = index(two_fit)
    url = f"{two_fit.url}/v2/repository"
    for path, body, message in (
            ("models/gamma/load", {"parameters": {"config": "{}"}},
             "unknown field 'parameters.config'"),
            ("models/gamma/load", {"max_batch_size": 16}, "unknown field 'max_batch_size'"),
            ("models/gamma/load", [], "must be a JSON object"),
            ("models/alpha/unload", {"parameters": {"unload_dependents": "yes"}},
             "'parameters.unload_dependents' must be true or false"),
            ("index", {"ready": 1}, "'ready' must be true or false"),
            ("index", {"readyy": True}, "unknown field 'readyy'")):
        r = httpx.post(f"{url}/{path}", json=body, timeout=30)
        assert r.status_code == 400 and message in r.json()["error"], (path, r.text)
    assert index(two_fit) == before  # refused before anything was done
    for body in (None, {}, {"parameters": {}}):  # what KServe's agent and Triton's send
        r = httpx.post(f"{url}/models/alpha/load", json=body, timeout=60)
        assert r.status_code == 200, r.text


# Triton's repository messages, written by hand from its grpc_service.proto (kserve's stubs
# lack them): RepositoryModelLoadRequest and ...UnloadRequest are {repository_name = 1,
# model_name = 2, map<string, ModelRepositoryParameter> parameters = 3}, whose parameter is
# a oneof {bool_param = 1, int64_param = 2, string_param = 3, bytes_param = 4};
# RepositoryIndexRequest is {repository_name = 1, bool ready = 2}, its response
# {repeated ModelIndex models = 1}, each {name = 1, version = 2, state = 3, reason = 4}.
def field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field (number < 16, value < 128 bytes)."""
    assert number < 16 and len(value) < 128
    return bytes([number << 3 | 2, len(value)]) + value


def triton_parameter(key: str, parameter: bytes) -> bytes:
    return field(3, field(1, key.encode()) + field(2, parameter))


def fields_of(message: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a message written as `field` writes them."""
    out, i = [], 0
    while i < len(message):
        key, length = message[i], message[i + 1]
        assert key & 7 == 2 and length < 128
        out.append((key >> 3, message[i + 2:i + 2 + length]))
        i += 2 + length
    return out


def test_triton_s_client_loads_unloads_and_lists_over_grpc(two_fit):
    """Triton's client sends a load's or unload's model_name as field 2 (KServe's proto has it
    as field 1, where Triton has repository_name): the server read the name as '' and said no
    model '' exists. And Triton's index, which KServe's proto lacks, was UNIMPLEMENTED."""
    service = "/inference.GRPCInferenceService/"
    with grpc.insecure_channel(f"127.0.0.1:{two_fit.grpc_port}") as channel:
        def call(method: str, request: bytes) -> bytes:
            return channel.unary_unary(service + method)(request, timeout=60)

        def triton_index(ready: bool = False) -> dict[str, str]:
            reply = call("RepositoryIndex", b"\x10\x01" if ready else b"")
            models = [dict(fields_of(entry)) for number, entry in fields_of(reply)]
            assert all(number == 1 for number, _ in fields_of(reply))
            return {m[1].decode(): m.get(3, b"").decode() for m in models}

        assert triton_index() == index(two_fit)
        call("RepositoryModelLoad", field(2, b"gamma"))
        assert index(two_fit)["gamma"] == "READY"
        assert "gamma" in triton_index(ready=True)
        assert set(triton_index(ready=True)) == {name for name, state in index(two_fit).items()
                                                 if state == "READY"}
        # its unload sends unload_dependents (nothing depends on a model here)
        call("RepositoryModelUnload",
             field(2, b"gamma") + triton_parameter("unload_dependents", b"\x08\x00"))
        assert index(two_fit)["gamma"] == "UNAVAILABLE"
        assert "gamma" not in triton_index(ready=True)
        for method, request, message in (
                ("RepositoryModelLoad", field(2, b"gamma") + triton_parameter(
                    "config", field(3, b"{}")), "unknown field 'parameters.config'"),
                ("RepositoryModelLoad", field(1, b"other") + field(2, b"gamma"),
                 "repository_name 'other': this server has one repository"),
                ("RepositoryIndex", field(1, b"other"), "repository_name 'other'"),
                ("RepositoryModelUnload", field(2, b"gamma") + triton_parameter(
                    "unload_dependents", field(3, b"yes")),
                 "'parameters.unload_dependents' must be true or false"),
                ("RepositoryModelUnload", field(2, b"gamma") + triton_parameter(
                    "unload_dependents", b""),  # (no value at all)
                 "'parameters.unload_dependents' must be true or false"),
                # Triton's fields that KServe's message lacks, garbled or not UTF-8: were INTERNAL
                ("RepositoryModelLoad", field(2, b"\xff\xfe"), "malformed RepositoryModelLoad"),
                ("RepositoryModelUnload", field(2, b"gamma") + triton_parameter(
                    "unload_dependents", field(3, b"\xff")), "malformed RepositoryModelUnload"),
                ("RepositoryModelLoad", field(1, b"gamma") + field(3, b"\xff"),  # KServe's
                 "malformed RepositoryModelLoad")):
            with pytest.raises(grpc.RpcError) as e:
                call(method, request)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert message in e.value.details(), e.value.details()
        assert index(two_fit)["gamma"] == "UNAVAILABLE"  # refused before anything was done
        # KServe's own message still names the model as field 1
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="gamma"), timeout=60)
        assert index(two_fit)["gamma"] == "READY"


def test_a_folder_the_repository_skips_says_why_when_asked_for(repo, tmp_path):
    """KServe's agent downloads a TrainedModel's folder, then calls load: a folder laid out one
    level too deep (its config.json in a subfolder) was told it did not exist, the reason in
    the server's log only."""
    shutil.copytree(repo / "alpha", tmp_path / "alpha")
    shutil.copytree(repo / "beta", tmp_path / "nested" / "model")
    srv = ServerProcess("--model_dir", str(tmp_path), "--load_models", "none",
                        "--enable_grpc", "false")
    try:
        srv.wait_ready(path="/v2/health/ready")
        for r in (httpx.post(f"{srv.url}/v2/repository/models/nested/load", timeout=60),
                  v1(srv, "nested", "a")):
            assert r.status_code == 404, r.text
            assert ("does not exist: a folder of that name is skipped, no config.json file in "
                    "it") in r.json()["error"], r.text
        r = httpx.post(f"{srv.url}/v2/repository/models/other/load", timeout=60)
        assert r.status_code == 404 and "skipped" not in r.json()["error"]
    finally:
        srv.stop()


def test_a_tokenizer_that_could_stall_or_crash_the_server_is_refused_at_load(repo, tmp_path):
    """A tokenizer.json runs what its normalizer, pre-tokenizer and decoder say, patterns and
    replacements included: a decoder's backtracking regex made the library panic on the step
    thread, which every model died with; a 4 MiB replacement made gigabytes of one request.
    Each is refused at load, naming the part, as is a token of 5,000 characters; and a
    vocab.json and merges.txt that made the library panic while read fail their load with
    why (it answered 500 and retried for the rest of the request's 30 s, logging backtraces),
    while the other models serve on."""
    shutil.copytree(repo / "alpha", tmp_path / "alpha")
    spec = json.loads((repo / "gamma" / "tokenizer.json").read_text())
    regex = {"type": "Replace", "pattern": {"Regex": "(.|.|.|.|.|.|.|.)*(?!)"}, "content": "x"}
    hostile = {
        "regex_decoder": ({"decoder": {"type": "Sequence", "decoders": [spec["decoder"], regex]}},
                          "its decoder is Replace"),
        "split": ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(a|a)*$"}, "behavior": "Isolated",
             "invert": False}, spec["pre_tokenizer"]]}}, "its pre_tokenizer is Split"),
        "replace": ({"normalizer": {"type": "Replace", "pattern": {"String": "a"},
                                    "content": "b" * 4096}}, "its normalizer is Replace"),
        "precompiled": ({"normalizer": {"type": "Precompiled",
                                        "precompiled_charsmap": "/////w=="}},
                        "Cannot parse precompiled_charsmap"),  # (a panic, said)
        "long_token": ({"added_tokens": spec["added_tokens"] + [{
            "id": 399, "content": "x" * 5000, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": False}]},
            "a token of 5000 characters"),
    }
    for name, (parts, _) in hostile.items():
        shutil.copytree(repo / "gamma", tmp_path / name)
        (tmp_path / name / "tokenizer.json").write_text(json.dumps({**spec, **parts}))
    panics = tmp_path / "merge_panic"
    shutil.copytree(repo / "gamma", panics)
    (panics / "tokenizer.json").unlink()
    (panics / "vocab.json").write_text('{"a": 0, "b": 1}')
    (panics / "merges.txt").write_text("#version: 0.2\na b\n")
    hostile["merge_panic"] = ({}, "the tokenizers library failed")
    log = tmp_path.parent / f"{tmp_path.name}.log"
    srv = ServerProcess("--model_dir", str(tmp_path), "--load_models", "alpha",
                        "--enable_grpc", "false", log=log)
    try:
        srv.wait_ready("alpha")
        before = v1(srv, "alpha", "ROMEO:").json()["predictions"]
        for name, (_, message) in hostile.items():
            r = httpx.post(f"{srv.url}/v2/repository/models/{name}/load", timeout=60)
            assert r.status_code == 503 and message in r.json()["error"], (name, r.text)
            t0 = time.monotonic()
            r = v1(srv, name, "a")  # its failure said at once, not retried until a deadline
            assert r.status_code == 503 and message in r.json()["error"], (name, r.text)
            assert time.monotonic() - t0 < 5, name
        assert v1(srv, "alpha", "ROMEO:").json()["predictions"] == before
        assert httpx.get(f"{srv.url}/v2/health/live").status_code == 200
        assert log.read_text().count("panicked") <= 2  # (the library prints its own once)
    finally:
        srv.stop()


def test_models_that_do_not_fit_together_take_turns_and_a_broken_one_fails_alone(
        repo, model_bytes, tmp_path):
    """Budget for one model: requests for two at once are all served (each model in turn,
    the other drained, never unloaded before its waiting requests queue); a folder whose
    config.json is not GPT-2's fails its requests and its load with 503, and nothing else,
    and reads not ready until a load through the API succeeds, or a request past
    RETRY_AFTER_FAILURE."""
    from gpt2serve.server.repository import RETRY_AFTER_FAILURE

    for name in ("alpha", "beta"):
        shutil.copytree(repo / name, tmp_path / name)
    for name in ("broken", "mended"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    log = tmp_path.parent / f"{tmp_path.name}.log"
    srv = ServerProcess("--model_dir", str(tmp_path), "--load_models", "none",
                        "--memory_budget", str(int(model_bytes * 1.5)),
                        "--kv_cache_memory", str(KV), "--enable_grpc", "false", log=log)
    try:
        srv.wait_ready(path="/v2/health/ready")

        async def both() -> list[int]:
            async with httpx.AsyncClient(timeout=120) as client:
                calls = [client.post(f"{srv.url}/v1/models/{name}:predict", json={
                    "instances": [{"prompt": "ROMEO:", **GREEDY}]})
                    for name in ("alpha", "beta") * 3]
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(both()) == [200] * 6
        assert metric(srv, "gpt2serve_models_loaded") == 1
        failed = time.monotonic()
        for name in ("broken", "mended"):
            r = v1(srv, name, "ROMEO:")
            assert r.status_code == 503 and "model_type" in r.json()["error"]
        assert index(srv)["broken"] == "UNAVAILABLE"
        r = httpx.post(f"{srv.url}/v2/repository/models/broken/load", timeout=60)
        assert r.status_code == 503 and "model_type" in r.json()["error"]
        # not ready on the readiness routes either, as the index says (they said ready)
        for path in ("/v1/models/broken", "/v2/models/broken/ready"):
            assert httpx.get(f"{srv.url}{path}").status_code == 503, path
        r = v1(srv, "broken", "ROMEO:")  # why, where KServe's route said only "not ready"
        assert r.status_code == 503 and "model_type" in r.json()["error"], r.text
        # and when a request may try it again (it said 1 s, for a retry 10 s after the failure)
        assert 1 < int(r.headers["retry-after"]) <= RETRY_AFTER_FAILURE
        r = post(f"{srv.url}/openai/v1/completions", {"model": "broken", "prompt": "a"})
        assert r.status_code == 503 and 1 < int(r.headers["retry-after"]) <= RETRY_AFTER_FAILURE
        assert v1(srv, "beta", "ROMEO:").status_code == 200
        # the failure is logged once, with why; each refusal since, without a traceback
        assert "Traceback" not in log.read_text() and "model_type" in log.read_text()
        assert "ORJSONResponse is deprecated" not in log.read_text()  # (KServe's routes')
        # mended, a load through the API brings it back
        shutil.rmtree(tmp_path / "broken")
        shutil.copytree(repo / "gamma", tmp_path / "broken")
        r = httpx.post(f"{srv.url}/v2/repository/models/broken/load", timeout=60)
        assert r.status_code == 200, r.text
        for path in ("/v1/models/broken", "/v2/models/broken/ready"):
            assert httpx.get(f"{srv.url}{path}").status_code == 200, path
        # mended, a V1 request loads it again once RETRY_AFTER_FAILURE has passed: KServe's
        # route refused it as not ready for good
        shutil.rmtree(tmp_path / "mended")
        shutil.copytree(repo / "gamma", tmp_path / "mended")
        assert v1(srv, "mended", "ROMEO:").status_code == 503  # not again at once
        time.sleep(max(0.0, failed + RETRY_AFTER_FAILURE + 0.5 - time.monotonic()))
        r = v1(srv, "mended", "ROMEO:")
        assert r.status_code == 200, r.text
        assert r.json()["predictions"][0].startswith("ROMEO:")
    finally:
        srv.stop()


def test_a_model_named_versions_is_served_and_a_version_still_refused(repo, tmp_path):
    """Model versions were told by '/versions/' anywhere in a V2 path, and 'model_version='
    anywhere in its query: a model named `versions` got 400 'model versions are not
    supported' on its readiness, generate and infer routes, and so did `?my_model_version=`."""
    shutil.copytree(repo / "alpha", tmp_path / "versions")
    srv = ServerProcess("--model_dir", str(tmp_path), "--kv_cache_memory", str(KV),
                        "--enable_grpc", "false")
    try:
        srv.wait_ready("versions")
        base = f"{srv.url}/v2/models/versions"
        r = httpx.get(f"{base}/ready", params={"my_model_version": "1"}, timeout=30)
        assert r.status_code == 200 and r.json() == {"name": "versions", "ready": True}, r.text
        r = post(f"{base}/generate", {"text_input": "ROMEO:", "parameters": GREEDY})
        assert r.status_code == 200 and r.json()["text_output"].startswith("ROMEO:"), r.text
        r = post(f"{base}/infer", {"inputs": [{"name": "text_input", "datatype": "BYTES",
                                               "shape": [1], "data": ["ROMEO:"]}]})
        assert r.status_code == 200, r.text
        for path, params in [("/versions/1/ready", {}), ("/ready", {"model_version": "1"}),
                             ("/ready", {"model_version": ""})]:
            r = httpx.get(base + path, params=params, timeout=30)
            assert r.status_code == 400 and "versions are not supported" in r.text, (path, r.text)
    finally:
        srv.stop()


def test_an_unknown_model_s_refusal_is_short_in_a_large_repository(repo, tmp_path):
    """Found in the list of what was left alone: OpenAI's 404 for an unknown model listed every
    folder of the repository, and echoed a name of any length."""
    for i in range(12):
        shutil.copytree(repo / "alpha", tmp_path / f"m{i:02d}")
    srv = ServerProcess("--model_dir", str(tmp_path), "--load_models", "none",
                        "--kv_cache_memory", str(KV), "--enable_grpc", "false")
    try:
        srv.wait_ready(path="/v2/health/ready")
        for route in ("/openai/v1/completions", "/tokenize"):
            r = post(f"{srv.url}{route}", {"model": "x" * 100_000, "prompt": "a"})
            error = r.json()["error"]
            assert r.status_code == 404 and error["param"] == "model", r.text
            assert "'m00', 'm01'" in error["message"] and "'m10'" not in error["message"]
            assert "and 2 more (GET /openai/v1/models lists them)" in error["message"]
            assert len(r.content) < 1000
        r = post(f"{srv.url}/openai/v1/completions", {"prompt": "a"})
        assert r.status_code == 400 and "and 2 more" in r.json()["error"]["message"], r.text
        r = httpx.get(f"{srv.url}/v1/models/{'x' * 10_000}", timeout=30)  # KServe's routes too
        assert r.status_code == 404 and "'m00', 'm01'" in r.json()["error"], r.text
        assert r.json()["error"].endswith("'m09' and 2 more (GET /v1/models lists them)")
        r = httpx.post(f"{srv.url}/v2/repository/models/x/load", timeout=30)  # every model
        assert r.json()["error"].endswith("and 2 more (POST /v2/repository/index lists them)")
    finally:
        srv.stop()
    empty = tmp_path / "empty"
    empty.mkdir()
    srv = ServerProcess("--model_dir", str(empty), "--enable_grpc", "false")
    try:
        srv.wait_ready(path="/v2/health/ready")
        r = post(f"{srv.url}/openai/v1/completions", {"prompt": "a"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "'model' is required: this server has no models"
    finally:
        srv.stop()


def test_a_folder_with_a_hostile_config_is_listed_and_fails_alone(repo, tmp_path):
    """config.json with an integer past int()'s digit limit raised a ValueError that nothing
    expected: 500 on /openai/v1/models for every model, and the server did not start when
    the folder sorted first (the playground reads the first model's context)."""
    shutil.copytree(repo / "alpha", tmp_path / "alpha")
    shutil.copytree(repo / "beta", tmp_path / "aaa")
    (tmp_path / "aaa" / "config.json").write_text('{"n_positions": ' + "9" * 5000 + "}")
    shutil.copytree(repo / "beta", tmp_path / "-dash")  # not a model's name: skipped
    shutil.copytree(repo / "beta", tmp_path / ".staging")  # hidden: passed over in silence
    (tmp_path / "halfway" / "config.json").mkdir(parents=True)  # not a file: skipped, said
    log = tmp_path.parent / f"{tmp_path.name}.log"
    srv = ServerProcess("--model_dir", str(tmp_path), "--load_models", "none",
                        "--kv_cache_memory", str(KV), "--enable_grpc", "false", log=log)
    try:
        srv.wait_ready(path="/v2/health/ready")
        for _ in range(3):  # each scans the folder; the skip is said once
            assert not {"-dash", ".staging", "halfway"} & set(index(srv))
        assert log.read_text().count("skipping") == 2
        assert "a model's name is a letter or digit, then" in log.read_text()  # why '-dash'
        assert "halfway: no config.json file in it" in log.read_text()
        # gone, then back: said again
        shutil.rmtree(tmp_path / "-dash")
        index(srv)
        shutil.copytree(repo / "beta", tmp_path / "-dash")
        index(srv)
        assert log.read_text().count("skipping") == 3
        r = httpx.get(f"{srv.url}/openai/v1/models")
        assert r.status_code == 200, r.text
        assert {m["id"]: m["max_model_len"] for m in r.json()["data"]} == {
            "aaa": None, "alpha": 128}
        page = httpx.get(f"{srv.url}/playground")
        assert page.status_code == 200 and '"context": 128' in page.text  # alpha's
        r = v1(srv, "aaa", "ROMEO:")
        assert r.status_code == 503 and "config.json: not valid JSON" in r.json()["error"]
        assert v1(srv, "alpha", "ROMEO:").status_code == 200
        said = log.read_text()  # a load is said as it starts, and as it ends
        assert said.index(f"loading alpha from {tmp_path / 'alpha'} on cpu/float32") < \
            said.index(f"loaded alpha from {tmp_path / 'alpha'} (2 layers")
    finally:
        srv.stop()


def in_process(folder, budget: int | None = None):
    """A Repository over `folder` in this process, to drive its calls on a fixed schedule."""
    from gpt2serve.engine import EngineConfig
    from gpt2serve.server.predictor import GPT2Predictor
    from gpt2serve.server.repository import LoadSettings, Repository

    return Repository(str(folder), "", LoadSettings(torch.device("cpu"), torch.float32, None, 1),
                      EngineConfig(kv_cache_memory=KV), budget=budget, enable_control=True,
                      make_predictor=GPT2Predictor)


async def unload_while_load_waits(repository, name: str) -> tuple[asyncio.Task, asyncio.Task]:
    """While the repository is held (another model's load or unload in progress), a load of
    `name` waits and an unload of it comes in; the repository is then let go. The two
    calls' tasks, neither finished."""
    entry = repository.entries[name]
    async with repository._lock:
        load = asyncio.create_task(repository.load(name))
        while entry.loading is None:
            await asyncio.sleep(0)
        unload = asyncio.create_task(repository.unload(name))
        while not entry.held:
            await asyncio.sleep(0)
    return load, unload


def test_an_unload_that_comes_in_while_a_load_waits_overrules_it(repo):
    """Over the Repository itself, its schedule fixed: while a load or unload of another
    model holds the repository, gamma's load waits, and an unload of gamma comes in. The
    later call wins: the load gets Overruled (REST 409, gRPC ABORTED); it said 503,
    "cannot be loaded: unloaded: ... load brings it back"."""
    from gpt2serve.server.repository import Overruled

    async def scenario():
        repository = in_process(repo)
        gamma = repository.entries["gamma"]
        try:
            load, unload = await unload_while_load_waits(repository, "gamma")
            with pytest.raises(Overruled, match="unloaded by a later call"):
                await load
            await unload
            assert (gamma.state, gamma.engine) == ("UNAVAILABLE", None)
            await repository.load("gamma")  # asked again, it loads
            assert gamma.state == "READY"
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_load_that_comes_in_while_an_unload_waits_overrules_it(repo):
    """The other way round: gamma serving, its unload waits for the repository, and a load
    of gamma comes in and answers at once (gamma is READY). The unload then went on and
    unloaded it, leaving the load's caller told "loaded" of a model gone; the later call
    wins now, and the unload gets Overruled. Two unloads of a model whose folder was deleted
    meanwhile (KServe's agent deletes, then unloads, and may retry) both return: the second
    raised KeyError, a 500."""
    from gpt2serve.server.repository import Overruled

    async def scenario():
        repository = in_process(repo)
        gamma = repository.entries["gamma"]
        try:
            await repository.load("gamma")
            async with repository._lock:
                unload = asyncio.create_task(repository.unload("gamma"))
                while not gamma.held:
                    await asyncio.sleep(0)
                await repository.load("gamma")
            with pytest.raises(Overruled, match="loaded by a later call"):
                await unload
            assert gamma.state == "READY" and repository.get_model("gamma").ready
            assert (await repository.engine("gamma")) is gamma.engine
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_load_stopped_by_an_unload_and_wanted_again_is_no_failed_load(repo):
    """Gamma's load waits for the repository; an unload comes in, so the load's task stops
    where it is, unwanted; a second load comes in before the first caller hears of it. The
    first caller was told 503 "cannot be loaded: not loaded" of a load that never failed; it
    now waits for the second's load, as a load wanted again should."""
    from gpt2serve.server.repository import Overruled

    async def scenario():
        repository = in_process(repo)
        gamma = repository.entries["gamma"]
        try:
            first, unload = await unload_while_load_waits(repository, "gamma")
            # the repository free: the first load's task runs, finds gamma unwanted, stops
            second = asyncio.create_task(repository.load("gamma"))
            await asyncio.gather(first, second)
            with pytest.raises(Overruled, match="loaded by a later call"):
                await unload
            assert gamma.state == "READY" and gamma.failed_at is None
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_model_named_twice_at_start_loads_once(repo):
    """--load_models alpha,alpha built alpha twice: the first engine stayed on the step
    thread, outside the budget's count, and no unload or shutdown stopped it."""
    repository = in_process(repo)
    try:
        repository.start("alpha,alpha")
        alpha = repository.entries["alpha"]
        assert repository.loop.engines == [alpha.engine]
        assert repository.used == alpha.nbytes
    finally:
        repository.stop(10)


@pytest.mark.parametrize("vocab_size", [400, 401])
def test_a_first_load_is_reckoned_at_no_less_than_it_holds(tmp_path, vocab_size):
    """The size a load is let in by, before any load of the model measured it: the fp32
    head's int8 screen was reckoned at a byte a weight, without its rows' scales, norms
    and errors (12 bytes a token), so two first loads fitted a budget they passed."""
    make_hf_model(tmp_path / "alpha", vocab_size=vocab_size)

    async def scenario():
        repository = in_process(tmp_path)
        try:
            alpha = repository.entries["alpha"]
            await repository.load("alpha")
            reckoned, held = alpha.measured
            assert held == alpha.engine.memory_bytes
            assert held <= reckoned <= held * 1.01, (reckoned, held)
        finally:
            repository.stop(10)

    asyncio.run(scenario())

def test_a_second_unload_of_a_deleted_folder_returns(repo, tmp_path):
    shutil.copytree(repo / "alpha", tmp_path / "alpha")

    async def scenario():
        repository = in_process(tmp_path)
        try:
            await repository.load("alpha")
            async with repository._lock:
                unloads = [asyncio.create_task(repository.unload("alpha")) for _ in range(2)]
                await asyncio.sleep(0)
                shutil.rmtree(tmp_path / "alpha")
            await asyncio.gather(*unloads)
            assert "alpha" not in repository.entries
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_deleted_folder_that_holds_nothing_is_forgotten(repo, tmp_path):
    """A folder whose load failed, or whose model was unloaded, then deleted, stayed in the
    index for ever, and its load and requests answered 503 'cannot be loaded' (naming the
    server's own paths), not 404."""
    from gpt2serve.server.repository import LoadFailed, ModelNotFound

    for name in ("alpha", "beta"):
        shutil.copytree(repo / name, tmp_path / name)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")

    async def scenario():
        repository = in_process(tmp_path)
        try:
            with pytest.raises(LoadFailed) as failed:
                await repository.load("broken")
            assert str(tmp_path) not in str(failed.value) and "broken" in str(failed.value)
            await repository.unload("beta")
            engine = await repository.engine("alpha")
            for name in ("beta", "alpha"):  # as KServe's predict route times them
                kserve.metrics.PREDICT_HIST_TIME.labels(name).observe(0.1)
            for name in ("broken", "beta", "alpha"):
                shutil.rmtree(tmp_path / name)
            for name in ("broken", "beta"):  # a request finds it gone
                with pytest.raises(ModelNotFound):
                    await repository.engine(name)
                assert repository.get_model(name) is None
            # and its series leave /metrics (they stayed for as long as the server ran)
            exported = prometheus_client.generate_latest().decode()
            assert 'model="alpha"' in exported and 'model="beta"' not in exported
            assert 'model="broken"' not in exported
            # KServe's too (request_predict_seconds stayed)
            assert 'model_name="alpha"' in exported and 'model_name="beta"' not in exported
            # alpha is loaded: it serves on from memory, and is listed
            assert [m["name"] for m in repository.index()] == ["alpha"]
            assert await repository.engine("alpha") is engine
            shutil.copytree(repo / "beta", tmp_path / "beta")  # put back: found again
            await repository.load("beta")
            shutil.rmtree(tmp_path / "beta")
            await repository.unload("beta")  # (its entry goes with the unload)
            with pytest.raises(ModelNotFound):
                await repository.load("beta")
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_load_that_cannot_succeed_unloads_no_other_model(repo, model_bytes, tmp_path):
    """Budget for one model and a half. `wide` takes 512 positions, more than its KV cache
    share holds in one sequence; `alpha` was loaded before and its folder is gone since;
    `cut`'s weights file ends early.
    Each load unloaded beta, which serves, to make room, then failed building its engine
    (a budget error, a missing folder); now each fails first, and beta serves on. A
    repository folder that is gone answers an unknown model with ModelNotFound, not an
    OSError (a 500)."""
    from gpt2serve.server.repository import LoadFailed, ModelNotFound

    for name in ("alpha", "beta"):
        shutil.copytree(repo / name, tmp_path / name)
    make_hf_model(tmp_path / "wide", n_positions=512)
    shutil.copytree(repo / "gamma", tmp_path / "cut")  # its weights cut short (a bad copy)
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])

    async def scenario():
        repository = in_process(tmp_path, budget=int(model_bytes * 1.5))
        beta = repository.entries["beta"]
        try:
            await repository.load("alpha")
            await repository.load("beta")  # unloads alpha, measured, to make room
            assert repository.entries["alpha"].state == "UNAVAILABLE"
            shutil.rmtree(tmp_path / "alpha")
            with pytest.raises(ModelNotFound):  # (forgotten: nothing of it was loaded)
                await repository.load("alpha")
            assert beta.state == "READY"
            with pytest.raises(LoadFailed, match=r"budget 0\.25 MiB \(.*\) cannot hold one "
                               r"512-token sequence, which needs 0\.50 MiB"):
                await repository.load("wide")
            assert beta.state == "READY"
            with pytest.raises(LoadFailed, match="not a valid safetensors file"):
                await repository.load("cut")
            assert beta.state == "READY" and (await repository.engine("beta")) is beta.engine
            shutil.rmtree(tmp_path)
            with pytest.raises(ModelNotFound):
                await repository.engine("nothing-here")
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_load_while_shutting_down_keeps_the_model_off(repo):
    """A load that comes in once the server drains is refused before it touches the model:
    it turned an unloaded model's readiness back on (and counted a failed load)."""
    from gpt2serve.server.repository import ModelUnavailable

    async def scenario():
        repository = in_process(repo)
        try:
            await repository.unload("beta")
            repository.drain()
            with pytest.raises(ModelUnavailable, match="shutting down"):
                await repository.load("beta")
            beta = repository.entries["beta"]
            assert beta.held and not beta.predictor.ready
            assert repository.get_model("beta") is None
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_load_during_an_unload_of_a_deleted_folder_keeps_its_entry(repo, tmp_path):
    """KServe's agent deletes a folder, then unloads it; a load that comes in while that
    unload drains makes the model servable again in KServe's registry, so the unload must
    not delete its entry afterwards (every request was then a KeyError, a 500): the load
    fails, the folder being gone, and the next request finds the folder gone: 404."""
    from gpt2serve.engine import Prompt
    from gpt2serve.sampling import SamplingParams
    from gpt2serve.server.repository import LoadFailed, ModelNotFound

    shutil.copytree(repo / "alpha", tmp_path / "alpha")

    async def scenario():
        repository = in_process(tmp_path)
        alpha = repository.entries["alpha"]
        try:
            engine = await repository.engine("alpha")
            params = SamplingParams.from_dict({"max_new_tokens": 120, "ignore_eos": True})
            accepted = engine.submit([Prompt([1, 2, 3], params)])  # the drain waits for it
            shutil.rmtree(tmp_path / "alpha")
            unload = asyncio.create_task(repository.unload("alpha"))
            while alpha.state != "UNLOADING":
                await asyncio.sleep(0)
            assert engine.load != (0, 0)  # still draining: the load comes in now
            load = asyncio.create_task(repository.load("alpha"))
            with pytest.raises(LoadFailed):  # (its folder is gone)
                await load
            await unload
            assert "alpha" in repository.entries and repository.get_model("alpha") is not None
            with pytest.raises(ModelNotFound):
                await repository.engine("alpha")
            assert "alpha" not in repository.entries and repository.get_model("alpha") is None
            assert [c.finish_reason for (c,) in await asyncio.wait_for(
                _whole(engine, accepted), 10)] == ["length"]
        finally:
            repository.stop(10)

    asyncio.run(scenario())


async def _whole(engine, requests) -> list:
    from gpt2serve.engine import Completion

    out = [[Completion(i)] for i in range(len(requests))]
    async for p, ev in engine.stream(requests):
        out[p][ev.index].add(ev)
    return out


def test_a_folder_that_holds_a_larger_model_since_its_last_load_is_sized_anew(
        repo, model_bytes, tmp_path):
    """The size a model's last load measured stands for its next load only while config.json
    reckons it as before: a folder replaced by a model of 20 times the vocabulary loaded on
    the old measurement, past the whole budget."""
    from gpt2serve.server.repository import LoadFailed

    shutil.copytree(repo / "alpha", tmp_path / "alpha")

    async def scenario():
        repository = in_process(tmp_path, budget=int(model_bytes * 1.5))
        try:
            await repository.load("alpha")
            await repository.unload("alpha")
            shutil.rmtree(tmp_path / "alpha")
            make_hf_model(tmp_path / "alpha", vocab_size=8000)
            with pytest.raises(LoadFailed, match="whole memory budget"):
                await repository.load("alpha")
            assert repository.used == 0
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_connection_holds_as_many_calls_as_the_models_queues(two_fit):
    """A connection's bound on calls open at once was sized for one model's queue (1024 at
    these flags), while each of the three models has its own queue of 256: the calls past
    1024 were refused (RST_STREAM, UNAVAILABLE, to grpcio's client) or held back (by
    grpc.aio's, which waited 60 s here) before any queue was full. 1100 calls that have not
    yet sent their request are open at once; none is refused."""
    async def scenario():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{two_fit.grpc_port}") as channel:
            infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer",
                                         request_serializer=pb.ModelInferRequest.SerializeToString,
                                         response_deserializer=pb.ModelInferResponse.FromString)
            release = asyncio.Event()

            async def never_sent():
                await release.wait()
                yield pb.ModelInferRequest()  # (never reached: the calls are cancelled)

            calls = [infer(never_sent()) for _ in range(1100)]
            # each call's HEADERS is on the wire once it starts; with too low a bound, a
            # call past it was refused or never started
            started = asyncio.gather(*(call.wait_for_connection() for call in calls))
            await asyncio.wait_for(started, timeout=60)
            # the server answers a connection's frames in order: a refusal of any call above
            # reaches the client before this answer does
            live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                       request_serializer=pb.ServerLiveRequest.SerializeToString,
                                       response_deserializer=pb.ServerLiveResponse.FromString)
            assert (await live(pb.ServerLiveRequest(), timeout=30)).live
            refused = [(await call.code(), await call.details())
                       for call in calls if call.done()]
            for call in calls:
                call.cancel()
            return refused

    assert asyncio.run(scenario()) == []


def test_the_start_log_says_where_each_model_s_kv_cache_budget_comes_from(repo, tmp_path):
    """Each model's KV-cache line names --kv_cache_memory, given or not: in a repository,
    without the flag, it is 1/16 of the memory budget, which the start-up line now says."""
    for flag, said in (([], "a KV cache of up to 64 MiB a model (1/16 of the budget)"),
                       (["--kv_cache_memory", "8MiB"],
                        "a KV cache of up to 8 MiB a model (--kv_cache_memory)")):
        log = tmp_path / "server.log"
        srv = ServerProcess("--model_dir", str(repo), "--load_models", "none",
                            "--memory_budget", "1GiB", "--enable_grpc", "false", *flag, log=log)
        try:
            srv.wait_ready(path="/v2/health/live")
            assert f"memory budget 1024 MiB, {said}" in log.read_text(), log.read_text()[-2000:]
        finally:
            srv.stop()


def test_a_load_refused_by_the_shutdown_is_no_failed_load(repo, model_bytes, tmp_path):
    """A load waiting for its turn (alpha's unload drains) when SIGTERM comes is refused as
    shutting down, as a request waiting for a load is: it was logged as an ERROR, counted as
    a failed load and told as one ('load failed: the server is shutting down')."""
    log = tmp_path / "server.log"
    srv = ServerProcess("--model_dir", str(repo), "--load_models", "alpha",
                        "--memory_budget", str(int(model_bytes * 2.5)),
                        "--kv_cache_memory", str(KV), "--max_batch_size", "8",
                        "--enable_grpc", "false", log=log)
    repo_url = f"{srv.url}/v2/repository"

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(timeout=120) as client:
            running = await busy(client, srv.url, "alpha")
            unload = asyncio.create_task(client.post(f"{repo_url}/models/alpha/unload"))
            while {m["name"]: m["state"] for m in (
                    await client.post(f"{repo_url}/index")).json()}["alpha"] != "UNLOADING":
                await asyncio.sleep(0.005)
            load = asyncio.create_task(client.post(f"{repo_url}/models/beta/load"))
            await asyncio.sleep(0.2)  # (the load waits for the unload's turn to end)
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(unload, *running)
            return await load

    try:
        srv.wait_ready("alpha")
        load = asyncio.run(scenario())
        assert srv.proc.wait(timeout=60) == 0
    finally:
        srv.stop()
    assert load.status_code == 503, load.text
    assert load.json()["error"] == "the server is shutting down", load.text
    said = log.read_text()
    assert "load failed" not in said, said
    assert not [line for line in said.splitlines() if "ERROR" in line and "beta" in line], said


def test_a_folder_deleted_while_its_model_is_read_leaves_it_loaded_and_counted(repo, tmp_path):
    """config.json was read again once the engine was built: a folder deleted meanwhile
    (KServe's agent deletes a TrainedModel's, then unloads it) failed the load with its engine
    running, counted nowhere, which the next scan then forgot for good. Now what was read
    before the build is what is counted: the model is loaded, then unloaded as asked."""
    from gpt2serve.server.repository import Repository

    shutil.copytree(repo / "alpha", tmp_path / "alpha")
    build = Repository._build

    def build_then_delete(self, entry, checked=None):
        engine = build(self, entry, checked)
        shutil.rmtree(entry.folder)  # while the weights were read
        return engine

    async def scenario():
        repository = in_process(tmp_path)
        repository._build = build_then_delete.__get__(repository)
        try:
            await repository.load("alpha")
            alpha = repository.entries["alpha"]
            assert alpha.state == "READY" and repository.used == alpha.nbytes > 0
            engine = alpha.engine
            await repository.unload("alpha")
            assert repository.used == 0 and engine not in repository.loop.engines
            assert "alpha" not in repository.entries  # its folder gone: forgotten
        finally:
            repository.stop(10)

    asyncio.run(scenario())


def test_a_load_unloaded_while_it_makes_room_unloads_no_more_for_it(repo, tmp_path):
    """A load that needed two models' room, its first to go still draining, was unloaded
    through the API: it went on to drain and unload the second, serving, model for nothing,
    and a request waiting for it heard only at its --load_timeout (503) that it would not
    load. Now it stops making room, and the request hears at once (404)."""
    from gpt2serve import checkpoint
    from gpt2serve.server.repository import ModelUnloaded

    for name in ("alpha", "beta"):
        shutil.copytree(repo / name, tmp_path / name)
    make_hf_model(tmp_path / "big", seed=9, vocab_size=2500)
    gate = threading.Event()

    async def scenario():
        probe = in_process(tmp_path)
        await probe.load("alpha")
        one = probe.entries["alpha"].nbytes
        probe.stop(10)
        budget = 2 * one + 1024
        repository = in_process(tmp_path, budget=budget)
        try:
            await repository.load("alpha")
            await repository.load("beta")  # alpha: the least recently used
            big = repository._reckon(checkpoint.read_config(tmp_path / "big"))
            assert budget - one < big <= budget, "big must need both models' room"
            # alpha's drain lasts until the gate opens (a long generation's stand-in)
            repository.entries["alpha"].engine.wait_idle = lambda timeout: gate.wait(60)
            request = asyncio.create_task(repository.engine("big"))
            while repository.entries["alpha"].state != "UNLOADING":
                await asyncio.sleep(0.01)
            unload = asyncio.create_task(repository.unload("big"))
            with pytest.raises(ModelUnloaded):
                await asyncio.wait_for(request, 5)  # at once, not at the load's timeout
            gate.set()
            await unload
            assert repository.entries["beta"].state == "READY"
            assert repository.entries["big"].state == "UNAVAILABLE"
        finally:
            gate.set()
            repository.stop(10)

    asyncio.run(scenario())


def test_a_model_built_after_the_drain_began_is_drained_too(repo, tmp_path):
    """SIGTERM's drain turns every loaded model away from new work; a model whose weights
    were being read then came up after it, taking new work through the grace period."""
    from gpt2serve.engine import EngineStopped, Prompt
    from gpt2serve.sampling import SamplingParams
    from gpt2serve.server.repository import Repository

    shutil.copytree(repo / "alpha", tmp_path / "alpha")
    build, gate = Repository._build, threading.Event()

    def build_past_the_drain(self, entry, checked=None):
        engine = build(self, entry, checked)
        gate.wait(30)  # (the drain comes while the weights are read)
        return engine

    async def scenario():
        repository = in_process(tmp_path)
        repository._build = build_past_the_drain.__get__(repository)
        try:
            load = asyncio.create_task(repository.load("alpha"))
            while repository.entries["alpha"].state != "LOADING":
                await asyncio.sleep(0.01)
            repository.drain()
            gate.set()
            await asyncio.gather(load, return_exceptions=True)
            engine = repository.entries["alpha"].engine
            params = SamplingParams.from_dict({"max_new_tokens": 2})
            with pytest.raises(EngineStopped, match="shutting down"):
                engine.submit([Prompt([1, 2], params)])
        finally:
            gate.set()
            repository.stop(10)

    asyncio.run(scenario())
