"""The API key on every entry point, REST and gRPC, and the model-repository control plane:
off by default, behind the key when on, and reversible. Real server processes on loopback,
real grpcio and KServe's own gRPC client."""

import asyncio
import json
import socket
import subprocess
import sys

import grpc
import httpx
import numpy as np
import openai
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from conftest import free_port, post, running_server

# the 401's message, which says how the key is sent
MISSING_KEY = ("missing or wrong API key: send 'Authorization: Bearer KEY' (gRPC: metadata "
               "'authorization')")
MODEL = "aitextgen"
KEY = "s3cret"
AUTH = {"authorization": f"Bearer {KEY}"}
AUTH_METADATA = (("authorization", f"Bearer {KEY}"),)
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
OPEN_RPCS = {"ServerLive", "ServerReady"}
OPEN_PATHS = {"/", "/v2/health/live", "/v2/health/ready", "/metrics", "/playground",
              "/playground/playground.js", "/playground/playground.css"}


def with_grpc(*args):
    """A running server with gRPC on; yields it with `.channel` and `.stub`."""
    port = free_port()
    cm = running_server(*args, "--grpc_port", str(port),
                        headers=AUTH if "--api_key" in args else None)

    class Served:
        def __enter__(self):
            self.srv = cm.__enter__()
            self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            grpc.channel_ready_future(self.channel).result(timeout=30)
            self.srv.channel, self.srv.grpc_address = self.channel, f"127.0.0.1:{port}"
            self.srv.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
            return self.srv

        def __exit__(self, *exc):
            self.channel.close()
            return cm.__exit__(*exc)

    return Served()


@pytest.fixture(scope="module")
def guarded(tiny_model):
    """--api_key and --enable_model_repository, a small body limit."""
    with with_grpc("--model_dir", str(tiny_model), "--api_key", KEY,
                   "--enable_model_repository", "--max_body_bytes", "4096") as srv:
        yield srv


@pytest.fixture(scope="module")
def default(tiny_model):
    """The defaults: no key, no model repository."""
    with with_grpc("--model_dir", str(tiny_model)) as srv:
        yield srv


def call(srv, method: str, request=b"", metadata=None):
    """`method` with a serialized request (default: the empty message); (code, details)."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    try:
        srv.channel.unary_unary(f"/inference.GRPCInferenceService/{method}")(
            data, timeout=30, metadata=metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details()


def infer_request(prompt="ROMEO:", **params) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents \
        .bytes_contents.append(prompt.encode())
    request.parameters["max_new_tokens"].int64_param = params.get("max_new_tokens", 3)
    return request


def example_request(method: str):
    """A request each method would accept from a client with the key."""
    if method == "ModelInfer":
        return infer_request()
    message = getattr(pb, SERVICE.methods_by_name[method].input_type.name)()
    for name in ("name", "model_name"):
        if name in message.DESCRIPTOR.fields_by_name:
            setattr(message, name, MODEL)
    return message


# ---- the key on every route --------------------------------------------------------------

def rest_routes(srv) -> list[tuple[str, str]]:
    """(method, path) of every route the server describes, and those it does not (model
    versions, the playground's files, the schema itself)."""
    schema = httpx.get(f"{srv.url}/openapi.json", headers=AUTH, timeout=10).json()
    routes = {(m.upper(), p.replace("{model_name}", MODEL).replace("{model_version}", "1"))
              for p, item in schema["paths"].items() for m in item}
    routes |= {("GET", "/openapi.json"), ("GET", "/playground"),
               ("GET", "/playground/playground.js"), ("GET", "/playground/playground.css"),
               ("POST", f"/v2/models/{MODEL}/versions/1/infer"),
               ("GET", f"/v2/models/{MODEL}/versions/1"),
               ("POST", f"/v2/repository/models/{MODEL}/load"),
               ("POST", f"/v2/repository/models/{MODEL}/unload")}
    return sorted(routes)


# What a request from outside the pod carries when it reaches the server on loopback, through
# queue-proxy or KServe's agent proxy (from elsewhere it does not come from loopback at all).
OUTSIDE = {"x-forwarded-for": "203.0.113.7"}


def test_no_rest_route_answers_without_the_key_but_probes_metrics_and_playground(guarded):
    """Every route but the probes, metrics and the playground's files needs the key from
    outside the pod. (Repository load and unload from the pod itself, KServe's model agent,
    do not: test_repository.py.)"""
    routes = rest_routes(guarded)
    assert len(routes) >= 28
    for method, path in routes:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY},
                        {"authorization": f"Basic {KEY}"}, {"authorization": "Bearer"},
                        {"authorization": f"Bearer {KEY}x"}, {"authorization": f"Bearer\t{KEY}"}):
            r = httpx.request(method, guarded.url + path, headers={**headers, **OUTSIDE},
                              timeout=30, content=b"{}" if method == "POST" else None)
            if path in OPEN_PATHS:
                assert r.status_code == 200, (method, path, r.status_code)
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{guarded.url}/v2/repository/models/{MODEL}/unload",
                      headers=OUTSIDE).status_code == 401
    assert httpx.get(f"{guarded.url}/v2/health/ready").status_code == 200  # still loaded


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_the_scheme_is_case_insensitive_on_both_protocols(guarded, scheme):
    headers = {"authorization": f"{scheme} {KEY}"}
    r = post(f"{guarded.url}/v1/models/{MODEL}:predict",
             {"instances": [{"prompt": "a", "max_new_tokens": 2}]}, headers=headers)
    assert r.status_code == 200, r.text
    response = guarded.stub.ModelInfer(infer_request(), metadata=tuple(headers.items()),
                                       timeout=30)
    assert response.outputs[0].contents.bytes_contents[0].startswith(b"ROMEO:")


def test_no_grpc_method_answers_without_the_key_but_the_probes(guarded):
    """It did: with --api_key, ModelInfer with no metadata generated text, and
    RepositoryModelUnload unloaded the model."""
    assert len(SERVICE.methods) == 8
    for method in SERVICE.methods:
        request = example_request(method.name)
        for metadata in (None, (("authorization", "Bearer wrong"),), (("authorization", KEY),),
                         (("authorization", f"Basic {KEY}"),), (("x-api-key", KEY),),
                         (("authorization", f"Bearer {KEY}"), ("authorization", "Bearer x"))):
            code, details = call(guarded, method.name, request, metadata)
            if method.name in OPEN_RPCS:
                assert code == grpc.StatusCode.OK, (method.name, code, details)
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method.name, metadata, code)
                assert details == MISSING_KEY
        # garbage is refused for the key, before it is parsed
        if method.name not in OPEN_RPCS:
            assert call(guarded, method.name, b"\xff\xff")[0] == grpc.StatusCode.UNAUTHENTICATED
    assert guarded.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready  # not unloaded
    for method in ("ModelReady", "ModelMetadata", "ModelInfer", "ServerMetadata"):
        code, details = call(guarded, method, example_request(method),
                             (("authorization", f"Bearer {KEY}"),))
        assert code == grpc.StatusCode.OK, (method, details)


def test_kserve_grpc_client_needs_the_key(guarded):
    async def ask(headers):
        client = InferenceGRPCClient(guarded.grpc_address)
        try:
            tensor = InferInput("text_input", [1], "BYTES")
            tensor.set_data_from_numpy(np.array([b"ROMEO:"], dtype=object))
            request = InferRequest(model_name=MODEL, infer_inputs=[tensor],
                                   parameters={"max_new_tokens": 3})
            return await client.infer(request, headers=headers)
        finally:
            await client.close()

    with pytest.raises(grpc.RpcError) as e:
        asyncio.run(ask(None))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    response = asyncio.run(ask((("authorization", f"bearer {KEY}"),)))
    assert response.outputs[0].as_numpy()[0].startswith(b"ROMEO:")


def is_openai_error(body: dict, code: int) -> bool:
    error = body["error"]
    return (set(error) == {"message", "type", "param", "code"} and error["code"] == code
            and isinstance(error["message"], str) and error["type"] == "invalid_request_error")


def test_401_and_413_on_openai_routes_are_openai_errors_and_grpc_has_the_same_limit(guarded):
    for path in ("/openai/v1/completions", "/openai/v1/tokenize", "/tokenize"):
        r = post(guarded.url + path, {"model": MODEL, "prompt": "a"})
        assert r.status_code == 401 and is_openai_error(r.json(), 401), r.text
        r = post(guarded.url + path, {"model": MODEL, "prompt": "a" * 5000}, headers=AUTH)
        assert r.status_code == 413 and is_openai_error(r.json(), 413), r.text
        assert "4096 bytes" in r.json()["error"]["message"]
    r = httpx.get(f"{guarded.url}/openai/v1/models", timeout=10)
    assert r.status_code == 401 and is_openai_error(r.json(), 401)
    # the official client reads them as what they are
    with pytest.raises(openai.AuthenticationError) as e:
        openai.OpenAI(base_url=f"{guarded.url}/openai/v1", api_key="nope", max_retries=0) \
            .completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert e.value.body["message"] == MISSING_KEY
    with pytest.raises(openai.APIStatusError) as e:
        openai.OpenAI(base_url=f"{guarded.url}/openai/v1", api_key=KEY, max_retries=0) \
            .completions.create(model=MODEL, prompt="a" * 5000, max_tokens=2)
    assert e.value.status_code == 413 and "4096 bytes" in e.value.body["message"]
    # gRPC has the same bound (it took up to KServe's 8 MiB)
    code, details = call(guarded, "ModelInfer", infer_request("a" * 5000), (AUTH_METADATA))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    code, details = call(guarded, "ModelInfer", infer_request("a" * 3000), AUTH_METADATA)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in details  # read, judged
    # KServe's routes keep KServe's shape
    r = post(f"{guarded.url}/v1/models/{MODEL}:predict", {"instances": ["a" * 5000]},
             headers=AUTH)
    assert r.status_code == 413 and isinstance(r.json()["error"], str)
    r = post(f"{guarded.url}/v1/models/{MODEL}:predict", {"instances": ["a"]})
    assert r.status_code == 401 and r.json() == {"error": MISSING_KEY}


# ---- the control plane -------------------------------------------------------------------

def v1(srv, headers=None) -> httpx.Response:
    return post(f"{srv.url}/v1/models/{MODEL}:predict",
                {"instances": [{"prompt": "ROMEO:", "max_new_tokens": 2}]}, headers=headers)


def serving_everywhere(srv, headers=None) -> dict:
    """Status of each inference route: V1, V2 infer, generate, OpenAI, gRPC."""
    metadata = tuple((headers or {}).items()) or None
    v2 = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                      "data": ["ROMEO:"]}], "parameters": {"max_new_tokens": 2}}
    return {
        "v1": v1(srv, headers).status_code,
        "v2": post(f"{srv.url}/v2/models/{MODEL}/infer", v2, headers=headers).status_code,
        "generate": post(f"{srv.url}/v2/models/{MODEL}/generate",
                         {"text_input": "ROMEO:", "parameters": {"max_new_tokens": 2}},
                         headers=headers).status_code,
        "openai": post(f"{srv.url}/openai/v1/completions",
                       {"model": MODEL, "prompt": "ROMEO:", "max_tokens": 2},
                       headers=headers).status_code,
        "grpc": call(srv, "ModelInfer", infer_request(), metadata)[0].name,
        "metadata": httpx.get(f"{srv.url}/v2/models/{MODEL}", headers=headers).status_code,
    }


UP = {"v1": 200, "v2": 200, "generate": 200, "openai": 200, "grpc": "OK", "metadata": 200}
UNLOADED = {"v1": 404, "v2": 404, "generate": 404, "openai": 404, "grpc": "NOT_FOUND",
            "metadata": 404}


def probes(srv, headers=None) -> tuple:
    return (httpx.get(f"{srv.url}/v2/health/live").status_code,
            httpx.get(f"{srv.url}/v2/health/ready").status_code,
            srv.stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live,
            srv.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready)


def test_repository_routes_are_off_by_default(default):
    """The repro: with no flag, one unauthenticated POST unloaded the model for good (200,
    then /load 503 and predictions 404). Off, both protocols answer as for a route the
    server does not have, and nothing changes."""
    for action in ("unload", "load"):
        r = httpx.post(f"{default.url}/v2/repository/models/{MODEL}/{action}", timeout=10)
        assert r.status_code == 404 and "--enable_model_repository" in r.json()["error"]
    for method, request in (("RepositoryModelUnload", pb.RepositoryModelUnloadRequest),
                            ("RepositoryModelLoad", pb.RepositoryModelLoadRequest)):
        code, details = call(default, method, request(model_name=MODEL))
        assert code == grpc.StatusCode.UNIMPLEMENTED and "--enable_model_repository" in details
    assert serving_everywhere(default) == UP
    assert probes(default) == (200, 200, True, True)
    assert extensions(default) == ([], [])  # the SDK listed the repository extension anyway
    spec = httpx.get(f"{default.url}/openapi.json").json()
    assert "post" in spec["paths"]["/v2/repository/models/{model_name}/load"]  # the SDK's,
    # registered after ours and never reached: the 404 above came from ours


def extensions(srv, headers: dict | None = None) -> tuple[list, list]:
    """The V2 server metadata's extensions, over REST and gRPC."""
    rest = httpx.get(f"{srv.url}/v2", headers=headers).json()["extensions"]
    metadata = [("authorization", headers["authorization"])] if headers else None
    grpc_ = srv.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10, metadata=metadata)
    return rest, list(grpc_.extensions)


def test_an_unload_over_rest_is_reversible_and_liveness_stays(guarded):
    assert extensions(guarded, AUTH) == (["model_repository_extension"],) * 2
    assert serving_everywhere(guarded, AUTH) == UP
    r = httpx.post(f"{guarded.url}/v2/repository/models/{MODEL}/unload", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"name": MODEL, "unload": True}
    try:
        assert serving_everywhere(guarded, AUTH) == UNLOADED
        r = post(f"{guarded.url}/openai/v1/completions", {"model": MODEL, "prompt": "a"},
                 headers=AUTH)
        assert r.json()["error"]["type"] == "not_found_error" and "load" in r.text
        # not ready, but alive: `load` reverses this, a restart would not be needed
        assert probes(guarded) == (200, 503, True, False)
        # a second unload changes nothing; an unknown model is 404
        assert httpx.post(f"{guarded.url}/v2/repository/models/{MODEL}/unload",
                          headers=AUTH).status_code == 200
        assert httpx.post(f"{guarded.url}/v2/repository/models/nope/load",
                          headers=AUTH).status_code == 404
    finally:
        r = httpx.post(f"{guarded.url}/v2/repository/models/{MODEL}/load", headers=AUTH)
    assert r.status_code == 200 and r.json() == {"name": MODEL, "load": True}
    assert serving_everywhere(guarded, AUTH) == UP
    assert probes(guarded) == (200, 200, True, True)
    # loading what is loaded is a no-op
    assert httpx.post(f"{guarded.url}/v2/repository/models/{MODEL}/load",
                      headers=AUTH).status_code == 200
    assert v1(guarded, AUTH).status_code == 200


def test_an_unload_over_grpc_is_reversible(guarded):
    """RepositoryModelLoad answered UNKNOWN ('ModelNotReady' object has no attribute
    'reason') once the model was unloaded."""
    key = (("authorization", f"Bearer {KEY}"),)
    unload = guarded.stub.RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name=MODEL), metadata=key, timeout=10)
    assert unload.isUnloaded and unload.model_name == MODEL
    try:
        assert serving_everywhere(guarded, AUTH) == UNLOADED
        assert call(guarded, "ModelReady", pb.ModelReadyRequest(name=MODEL),
                    key)[0] == grpc.StatusCode.NOT_FOUND
        assert call(guarded, "RepositoryModelLoad", pb.RepositoryModelLoadRequest(
            model_name="nope"), key)[0] == grpc.StatusCode.NOT_FOUND
        assert probes(guarded) == (200, 503, True, False)
    finally:
        load = guarded.stub.RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name=MODEL), metadata=key, timeout=10)
    assert load.isLoaded and load.model_name == MODEL
    assert serving_everywhere(guarded, AUTH) == UP
    assert guarded.stub.ModelReady(pb.ModelReadyRequest(name=MODEL), metadata=key).ready
    assert probes(guarded) == (200, 200, True, True)


def test_without_a_key_everything_but_the_repository_is_open(default):
    """No --api_key: nothing asks for one (and the repository stays off)."""
    assert v1(default).status_code == 200
    assert call(default, "ModelInfer", infer_request())[0] == grpc.StatusCode.OK
    assert json.loads(httpx.get(f"{default.url}/v2/models/{MODEL}").text)["inputs"]


def test_a_browsers_cross_origin_form_is_refused_but_cors_json_and_its_own_page_are_not(
        default):
    """Found by a review: with no key, a page on any site could post a form or a no-cors
    fetch of text (no CORS preflight for either) to a server on localhost in a loop, and
    have it generate for nobody: the routes read JSON whatever the Content-Type."""
    url = f"{default.url}/openai/v1/completions"
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 2})
    own = default.url.removeprefix("http://")
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        r = httpx.post(url, content=body, headers={"Origin": "https://evil.example",
                                                    "Content-Type": content_type})
        assert r.status_code == 403 and r.json()["error"]["code"] == 403, r.text
        r = httpx.post(url, content=body, headers={"Origin": "null",
                                                    "Content-Type": content_type})
        assert r.status_code == 403, r.text
    # no Content-Type (a fetch of a Blob), or a form's with parameters; a Basic credential,
    # which a browser adds by itself, or a Bearer one to a server with no key (a gateway's)
    for headers in ({}, {"Content-Type": "multipart/form-data; boundary=x"},
                    {"Content-Type": "text/plain", "Authorization": "Basic dTpw"},
                    {"Content-Type": "text/plain", "Authorization": "Bearer gateway"}):
        r = httpx.post(f"{default.url}/v1/models/{MODEL}:predict",
                       content=b'{"instances": ["a"]}',
                       headers={"Origin": "https://evil.example", **headers})
        assert r.status_code == 403, (headers, r.text)
    # what a browser sends another origin only after a CORS preflight (an ingress's policy
    # admits it): JSON, another type, KServe's binary tensors (with or without a type); and
    # its own page behind a proxy that rewrote Host
    for headers in ({"Content-Type": "application/json"},
                    {"Content-Type": "application/octet-stream"},
                    {"Inference-Header-Content-Length": str(len(body))},
                    {"Content-Type": "text/plain", "Sec-Fetch-Site": "same-origin"}):
        cors = httpx.post(url, content=body, headers={"Origin": "https://app.example",
                                                      **headers})
        assert cors.status_code == 200, (headers, cors.text)
    # the server's own page, and curl (no Origin), whatever the Content-Type
    for headers in ({"Origin": f"http://{own}", "Content-Type": "text/plain"},
                    {"Content-Type": "application/x-www-form-urlencoded"}):
        assert httpx.post(url, content=body, headers=headers).status_code == 200, headers


def rebound(srv, host: str, address: str = "127.0.0.1", **headers) -> tuple[int, int]:
    """(the status of a completion, of a model's metadata) as a page on `host` sends them
    once its name points at `address`: the `Host` and `Origin` its own."""
    port = srv.url.rpartition(":")[2]
    headers = {"host": f"{host}:{port}", "origin": f"http://{host}:{port}", **headers}
    completion = httpx.post(f"http://{address}:{port}/openai/v1/completions", headers=headers,
                            json={"model": MODEL, "prompt": "a", "max_tokens": 2})
    if completion.status_code == 403:
        assert completion.json()["error"]["code"] == 403
        assert host.lower().rstrip(".") in completion.json()["error"]["message"]
    return completion.status_code, httpx.get(f"http://{address}:{port}/v1/models/{MODEL}",
                                             headers=headers).status_code


def own_address() -> str | None:
    """This machine's address on its default route, where it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # (no packet is sent)
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_a_dns_name_rebound_to_this_machine_is_refused_but_local_names_are_not(tiny_model):
    """Found in the list of what was left alone: a page on evil.example that rebinds its name
    to 127.0.0.1 (or to the machine's own address) is, to the browser, of the same origin as
    the key-less server there, so it could generate and read the answers; CrossSiteForms lets
    it through (its Origin and Host agree). A review found that X-Forwarded-For, which a
    page's script may set, let it through the guard's first form."""
    model = ("--model_dir", str(tiny_model), "--enable_grpc", "false")
    with running_server(*model, env={"KUBERNETES_SERVICE_HOST": ""}) as srv:
        for host in ("evil.example", "EVIL.example.", "localhost.evil.example",
                     "127.0.0.1.nip.io"):
            assert rebound(srv, host) == (403, 403), host
            assert rebound(srv, host, **OUTSIDE) == (403, 403), host
            assert rebound(srv, host, forwarded="for=203.0.113.7") == (403, 403), host
        for host in ("localhost", "LocalHost.", "app.localhost", "127.0.0.1", "[::1]",
                     "devbox"):
            assert rebound(srv, host) == (200, 200), host
        if own_address():
            assert rebound(srv, "evil.example", own_address()) == (403, 403)
            assert rebound(srv, own_address(), own_address()) == (200, 200)
    # In a pod: requests its proxies forward (queue-proxy, KServe's agent) come from loopback
    # with the service's name; the pod's own address is another machine's connection
    with running_server(*model, "--allowed_hosts", " Dev.Example.,gpu.lan",
                        env={"KUBERNETES_SERVICE_HOST": "10.96.0.1"}) as srv:
        assert rebound(srv, "evil.example") == (403, 403)
        assert rebound(srv, "aitextgen.default.example.com", **OUTSIDE) == (200, 200)
        assert rebound(srv, "dev.example") == rebound(srv, "GPU.lan") == (200, 200)
        if own_address():
            assert rebound(srv, "evil.example", own_address()) == (200, 200)
    with running_server(*model, "--allowed_hosts", "*",
                        env={"KUBERNETES_SERVICE_HOST": ""}) as srv:
        assert rebound(srv, "evil.example") == (200, 200)
    for hosts in ("dev.example:8080", "http://dev.example", "*.example", "[::1]"):
        run = subprocess.run([sys.executable, "-m", "gpt2serve.cli", "serve", "--allowed_hosts",
                              hosts], capture_output=True, text=True, timeout=60)
        assert run.returncode == 2 and "expected host names" in run.stderr, run.stderr


def test_a_cross_origin_request_with_the_servers_key_went_through_a_preflight(guarded):
    """A page sets Authorization only after a CORS preflight; a server with a key counts it
    whatever the Content-Type (the key check follows)."""
    r = httpx.post(f"{guarded.url}/openai/v1/completions",
                   content=json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 2}),
                   headers={"Origin": "https://app.example", "Content-Type": "text/plain",
                            **AUTH, **OUTSIDE})
    assert r.status_code == 200, r.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_unloaded_model_whose_engine_dies_fails_liveness_and_cannot_be_loaded(tiny_model):
    """The line drawn for liveness: an unload alone keeps it (above); a dead step thread is
    what fails it, and `load` refuses to bring a model back onto it. In process, on a real
    repository: the thread is killed from outside, as no request can, while it steps (in its
    condition's wait, an asynchronous exception can leave the condition's lock held)."""
    from gpt2serve.engine import EngineConfig, EngineStopped, Prompt
    from gpt2serve.server.grpc_v2 import GPT2Servicer
    from gpt2serve.server.health import liveness
    from gpt2serve.server.predictor import GPT2Predictor
    from gpt2serve.sampling import SamplingParams
    from gpt2serve.server.repository import LoadFailed, Repository, settings_of
    from test_metrics import kill_thread

    repository = Repository(str(tiny_model), MODEL, settings_of("cpu", "auto", "none", 1),
                            EngineConfig(max_batch_size=2), enable_control=True,
                            make_predictor=lambda name, repo: GPT2Predictor(name, repo))
    repository.start("all")
    servicer = GPT2Servicer.__new__(GPT2Servicer)
    servicer.models = repository

    async def live() -> tuple:
        grpc_live = (await servicer.ServerLive(pb.ServerLiveRequest(), None)).live
        return grpc_live, liveness(repository, {}, {}).status_code

    async def scenario():
        await repository.unload(MODEL)
        assert await live() == (True, 200)
        await repository.load(MODEL)
        engine = await repository.engine(MODEL)
        long = SamplingParams.from_dict({"max_new_tokens": 100, "ignore_eos": True})
        events = engine.stream(engine.submit(
            [Prompt(engine.encode_prompt("ROMEO:"), long) for _ in range(6)]))
        await anext(events)  # the step thread is busy with them
        thread = repository.loop._thread
        kill_thread(thread)
        thread.join(timeout=10)
        with pytest.raises(EngineStopped, match="step thread has died"):
            async for _ in events:  # fails, does not wait forever
                pass
        assert await live() == (False, 503)
        # and the model is not ready (V1/V2 ready, gRPC ModelReady): it still read ready
        assert not await repository.get_model(MODEL).healthy()
        await repository.unload(MODEL)
        assert await live() == (False, 503)
        with pytest.raises(LoadFailed, match="step thread has died"):
            await repository.load(MODEL)
        (entry,) = repository.index()
        assert entry["state"] == "UNAVAILABLE" and "step thread has died" in entry["reason"]

    try:
        asyncio.run(asyncio.wait_for(scenario(), timeout=60))
    finally:
        repository.stop(timeout=1)
