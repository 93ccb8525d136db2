"""Mistaken and hostile requests that a fuzzing pass over every route found answered wrongly:
500s, checks skipped, values taken silently, errors that named the wrong field or none, and a
traceback logged for each refusal. Each is a 400 naming what is wrong (or, for the V2 binary
output a Triton client asks for by default, served), against the real server process."""

from __future__ import annotations

import gzip
import json
import struct

import httpx
import openai
import pytest

from conftest import post, running_server

MODEL = "aitextgen"
PREDICT = f"/v1/models/{MODEL}:predict"
INFER = f"/v2/models/{MODEL}/infer"
COMPLETIONS = "/openai/v1/completions"


@pytest.fixture(scope="module")
def logged(tiny_model, tmp_path_factory):
    """A server whose output goes to a file the tests read."""
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with running_server("--model_dir", str(tiny_model), "--enable_grpc", "false",
                        "--max_prompt_chars", "500", log=log) as srv:
        srv.log_path = log
        yield srv


def error(r: httpx.Response) -> str:
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()["error"]
    return body["message"] if isinstance(body, dict) else body


@pytest.mark.parametrize("key", ["\u00b2", "\u2460", "\uff11\uff12", "\u0663", "1" * 5000])
def test_logit_bias_keys_are_ascii_digits_on_every_route(logged, key):
    """'²' and '①' passed str.isdigit and made int() raise: a 500. Full-width '１２' and
    Arabic-Indic '٣' were read as tokens 12 and 3."""
    r = post(logged.url + COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 1,
                                        "logit_bias": {key: 1}})
    assert "'logit_bias'" in error(r) and r.json()["error"]["param"] == "logit_bias"
    r = post(logged.url + PREDICT, {"instances": ["a"], "parameters": {"logit_bias": {key: 1}}})
    assert "'logit_bias'" in error(r)
    r = post(f"{logged.url}/v2/models/{MODEL}/generate",
             {"text_input": "a", "parameters": {"logit_bias": {key: 1}}})
    assert "'logit_bias'" in error(r)


@pytest.mark.parametrize(("bias", "said"), [({"-1": 5}, "keys are token ids"),
                                             ({"1.5": 5}, "keys are token ids"),
                                             ({"5": 101}, "values are numbers in [-100, 100]"),
                                             ({"5": "1"}, "values are numbers in [-100, 100]")])
def test_a_logit_bias_refusal_says_whether_the_key_or_the_value_is_wrong(logged, bias, said):
    r = post(logged.url + COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 1,
                                        "logit_bias": bias})
    assert said in error(r)


def test_max_new_tokens_0_is_refused_where_answers_hold_only_text(logged):
    """It reads the prompt and generates nothing: scoring, which only the OpenAI route
    answers (echo with logprobs); elsewhere it returned the prompt, or an empty text."""
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "a", "max_new_tokens": 0}]})
    assert "'max_new_tokens' must be at least 1" in error(r)
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "a", "max_new_tokens": -1}]})
    assert "'max_new_tokens' must be at least 1" in error(r)  # (was told ">= 0")
    r = post(logged.url + PREDICT, {"instances": ["a"], "parameters": {"max_new_tokens": 0}})
    assert "'max_new_tokens' must be at least 1" in error(r)
    r = post(logged.url + INFER, v2_body(max_new_tokens=0))
    assert "'max_new_tokens' must be at least 1" in error(r)
    r = post(f"{logged.url}/v2/models/{MODEL}/generate",
             {"text_input": "a", "parameters": {"max_new_tokens": 0}})
    assert "'max_new_tokens' must be at least 1" in error(r)


def v2_body(**parameters) -> dict:
    return {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                        "data": ["ROMEO:"]}],
            "parameters": {"max_new_tokens": 3, **parameters}}


def test_a_non_ascii_binary_header_length_is_a_400(logged):
    """'¹' (sent as its latin-1 byte) passed str.isdigit and made int() raise: a 500."""
    r = httpx.post(logged.url + INFER, json=v2_body(),
                   headers={"inference-header-content-length": b"\xb9"})
    assert "Inference-Header-Content-Length" in error(r)
    r = httpx.post(logged.url + INFER, json=v2_body(),  # beyond int()'s 4,300 digits
                   headers={"inference-header-content-length": "9" * 5000})
    assert "Inference-Header-Content-Length" in error(r)


def test_the_binary_header_does_not_switch_off_the_json_checks_off_v2_infer(logged):
    """Trusted on every route, a length of 0 let any body past the strict JSON check: a
    duplicate key was taken (the last one winning) and 1,000 levels of nesting reached the
    sampling parameters' error message, whose repr overflowed the stack: a 500."""
    header = {"inference-header-content-length": "0", "content-type": "application/json"}
    r = httpx.post(logged.url + PREDICT, headers=header,
                   content=b'{"instances": ["a"], "instances": ["b"]}')
    assert "instances" in error(r)
    deep = "[" * 1000 + "]" * 1000
    r = httpx.post(logged.url + PREDICT, headers=header,
                   content=f'{{"instances": ["a"], "parameters": {{"temperature": {deep}}}}}')
    assert "nests deeper" in error(r)


def test_an_integer_beyond_64_bits_is_refused_by_name_whatever_the_content_type(logged):
    """Sent as application/json, V1's body went through orjson, which reads such an integer
    as a double: a seed of -2^63 - 1 became -2^63 and was taken; sent as another content
    type, the same body was refused."""
    for content_type in ("application/json", "text/plain"):
        for field, value in (("seed", -2**63 - 1), ("max_new_tokens", 2**70)):
            body = f'{{"instances": ["a"], "parameters": {{"{field}": {value}}}}}'
            r = httpx.post(logged.url + PREDICT, content=body,
                           headers={"content-type": content_type})
            assert f"'parameters.{field}' is an integer beyond 64 bits" in error(r)
    r = post(logged.url + COMPLETIONS, {"model": MODEL, "prompt": "a", "seed": 2**64})
    assert r.json()["error"]["param"] == "seed" and "64 bits" in error(r)


def test_refusals_leave_no_error_or_traceback_in_the_log(logged):
    """The KServe SDK logged every InvalidInput, and every unknown model, at ERROR with its
    traceback: a client could flood the log and trip error alerts with 400s and 404s."""
    before = logged.log_path.read_text()
    for path in ("/v1/models/nope:predict", "/v1/models/%00%ff:predict"):
        assert post(logged.url + path, {"instances": ["a"]}).status_code == 404
    assert post(logged.url + "/v2/models/nope/infer", v2_body()).status_code == 404
    assert post(logged.url + "/v2/models/nope/generate", {"text_input": "a"}).status_code == 404
    bad = {"instances": [{"prompt": "x", "temperature": "hot"}]}
    assert "'temperature'" in error(post(logged.url + PREDICT, bad))
    assert "'temperature'" in error(post(logged.url + INFER, v2_body(temperature="hot")))
    r = post(f"{logged.url}/v2/models/{MODEL}/generate",
             {"text_input": "a", "parameters": {"temperature": "hot"}})
    assert "'temperature'" in error(r)
    assert post(logged.url + PREDICT, {"instances": ["a"]}).status_code == 200  # flushes
    added = logged.log_path.read_text()[len(before):]
    assert "Traceback" not in added and " ERROR " not in added, added


def length_prefixed(texts: list[str]) -> bytes:
    return b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)


def test_v2_binary_output_as_tritons_client_asks_for_it(logged):
    """tritonclient sends `binary_data_output: true` with every request that names no
    outputs: it was refused as an unknown sampling parameter. Now text_output comes in the
    binary extension, unless the output's own `binary_data` says otherwise; both are checked."""
    want = post(logged.url + INFER, v2_body(temperature=0)).json()["outputs"][0]["data"]
    r = post(logged.url + INFER, v2_body(temperature=0, binary_data_output=True))
    assert r.status_code == 200, r.text
    json_length = int(r.headers["inference-header-content-length"])
    header = httpx.Response(200, content=r.content[:json_length]).json()
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(r.content) - json_length
    assert r.content[json_length:] == length_prefixed(want)
    as_json = {**v2_body(temperature=0, binary_data_output=True),
               "outputs": [{"name": "text_output", "parameters": {"binary_data": False}}]}
    assert post(logged.url + INFER, as_json).json()["outputs"][0]["data"] == want
    as_binary = {**v2_body(temperature=0),
                 "outputs": [{"name": "text_output", "parameters": {"binary_data": True}}]}
    r = post(logged.url + INFER, as_binary)
    assert r.content.endswith(length_prefixed(want))
    assert "'binary_data_output' must be true or false" in error(
        post(logged.url + INFER, v2_body(binary_data_output="yes")))
    for parameters, message in (({"binary_data": "yes"}, "'binary_data' must be true or false"),
                                ({"classification": 2}, "unknown field 'classification'")):
        body = {**v2_body(), "outputs": [{"name": "text_output", "parameters": parameters}]}
        assert message in error(post(logged.url + INFER, body))


def test_a_wrong_binary_header_length_is_named_not_the_binary_data(logged):
    """A binary request whose Inference-Header-Content-Length was not its JSON part's length
    (past the body, not a number) was read whole as JSON by the middleware, and a length
    prefix of 0x80 or more made it 'request body is not valid UTF-8'. Of two such headers the
    middleware read the last and the route the first (found by helper 65's fuzz)."""
    header = json.dumps({"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": 132}}],
                         "parameters": {"max_new_tokens": 2}}).encode()
    body = header + length_prefixed([" the" * 32])  # its length prefix: 0x80
    for length in (str(len(header) + 133), "abc"):
        r = httpx.post(logged.url + INFER, content=body,
                       headers={"inference-header-content-length": length})
        assert r.status_code == 400 and error(r) == (
            "'Inference-Header-Content-Length' must be the length of the body's JSON part"), \
            (length, r.text)
    r = httpx.post(logged.url + INFER, content=body, headers=[
        ("inference-header-content-length", str(len(header))),
        ("inference-header-content-length", "abc")])
    assert r.status_code == 200, r.text


def test_openai_prompt_errors_name_the_prompt_and_which_one(logged):
    """Too long (in characters, or in tokens for the context) said `param: null`, and in a
    list of prompts nothing said which (nor for a token id outside the vocabulary)."""
    for prompt, where in (("a" * 600, "prompt is 600 characters"),
                          ([5] * 200, "prompt is 200 tokens"),
                          (["a", "b" * 600], "prompt[1]: prompt is 600 characters"),
                          ([[5], [5] * 200], "prompt[1]: prompt is 200 tokens"),
                          ([[5], [10 ** 6]], "prompt[1]: prompt must be a non-empty list of "
                                             "token ids"),
                          ([5, 10 ** 6], "prompt must be a non-empty list of token ids")):
        r = post(logged.url + COMPLETIONS, {"model": MODEL, "prompt": prompt, "max_tokens": 1})
        assert error(r).startswith(where) and r.json()["error"]["param"] == "prompt"
    r = post(logged.url + COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"], "n": 99})
    assert r.json()["error"]["param"] == "n", r.text


@pytest.mark.parametrize("route,body,message", [
    # true and false were token ids 1 and 0 in a list of token prompts
    (COMPLETIONS, {"prompt": [[True, False]]}, "list of token ids"),
    # True == 1
    (COMPLETIONS, {"prompt": "a", "best_of": True}, "'best_of'"),
    # a field and its alias: the last one won
    (PREDICT, {"instances": [{"prompt": "a", "stop": "x", "stop_sequences": ["y"]}]},
     "give either 'stop' or 'stop_sequences'"),
    (PREDICT, {"instances": [{"prompt": "a", "n": 2, "num_return_sequences": 3}]},
     "give either 'n' or 'num_return_sequences'"),
    (COMPLETIONS, {"prompt": "a", "max_tokens": 2, "min_tokens": 5},
     "'min_tokens' 5 exceeds 'max_tokens' 2"),
    # parameters that are not an object were taken as none
    (PREDICT, {"instances": ["a"], "parameters": []}, "'parameters' must be an object"),
    (PREDICT, {"instances": ["a"], "parameters": False}, "'parameters' must be an object"),
    # a shared parameter's error was blamed on the first instance
    (PREDICT, {"instances": ["a"], "parameters": {"top_k": "x"}}, "parameters: 'top_k'"),
    (INFER, {"inputs": [{**v2_body()["inputs"][0], "parameters": {"top_k": "x"}}]},
     "input 'text_input' parameters: 'top_k'"),
    # any type was ignored
    (COMPLETIONS, {"prompt": "a", "user": 5}, "'user' must be a string"),
    # lengths asked for at least that the lengths at most leave no room for: cut short
    (PREDICT, {"instances": [{"prompt": "a", "min_tokens": 5, "max_length": 3}]},
     "'min_tokens' 5 exceeds the 2 new tokens that 'max_length' 3 leaves"),
    (PREDICT, {"instances": [{"prompt": "a", "min_length": 100, "max_length": 10}]},
     "'min_length' 100 exceeds the prompt's 1 tokens and the 9 new ones"),
    # two keys for one token: the last one won
    (COMPLETIONS, {"prompt": "a", "logit_bias": {"1": 100, "01": -100}},
     "'logit_bias' gives token 1 two biases (keys \"1\" and \"01\")"),
    # Python's spelling of JSON's values
    (PREDICT, {"instances": [{"prompt": "a", "logit_bias": {"1": None}}]}, '"1": null'),
    # Python's name for null
    (INFER, {"inputs": [{**v2_body()["inputs"][0], "data": [None]}]},
     "must hold strings, got null"),
])
def test_values_once_taken_silently_or_misplaced_are_refused_by_name(logged, route, body,
                                                                     message):
    if route == COMPLETIONS:
        body = {"model": MODEL, "max_tokens": 1, **body}
    assert message in error(post(logged.url + route, body))


@pytest.mark.parametrize("route", [PREDICT, INFER, COMPLETIONS])
def test_a_compressed_body_is_a_415_that_closes_the_connection(logged, route):
    """No route decodes a content coding: a gzip body was called "not valid UTF-8"."""
    body = gzip.compress(json.dumps({"instances": ["a"], **v2_body(), "prompt": "a"}).encode())
    r = httpx.post(logged.url + route, content=body, timeout=30,
                   headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert r.status_code == 415, r.text
    assert "Content-Encoding 'gzip' is not supported" in r.text
    assert r.headers["accept-encoding"] == "identity" and r.headers["connection"] == "close"
    r = httpx.post(logged.url + PREDICT, json={"instances": [{"prompt": "a", "max_new_tokens": 1}]},
                   headers={"content-encoding": "identity"}, timeout=30)
    assert r.status_code == 200, r.text


def test_an_error_names_a_field_as_the_client_did(logged):
    """An alias's bad value was reported under the field's own name ('n' for
    num_return_sequences)."""
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "a", "num_return_sequences": 0}]})
    assert "'num_return_sequences' must be in" in error(r)
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "a", "stop_sequences": 5}]})
    assert "'stop_sequences' must be" in error(r)


def test_an_instance_overrides_a_shared_parameter_by_its_alias(logged):
    """`num_return_sequences` in an instance replaces a shared `n` (not "give either")."""
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "a", "num_return_sequences": 3}],
                                     "parameters": {"n": 2, "max_new_tokens": 2}})
    assert r.status_code == 200 and len(r.json()["predictions"][0]) == 3, r.text


def test_a_shared_combination_an_instance_corrects_is_taken_and_one_none_does_is_refused(
        logged):
    """A shared 'min_tokens' over a shared 'max_new_tokens' was refused with the whole
    request, though each input gave its own 'max_new_tokens' that left the pair right."""
    shared = {"max_new_tokens": 2, "min_tokens": 10, "temperature": 0}
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "ROMEO:", "max_new_tokens": 12}],
                                     "parameters": shared})
    assert r.status_code == 200, r.text
    body = {**v2_body(**shared), "inputs": [{**v2_body()["inputs"][0],
                                              "parameters": {"max_new_tokens": 12}}]}
    r = post(logged.url + INFER, body)
    assert r.status_code == 200, r.text
    r = post(logged.url + PREDICT, {"instances": [{"prompt": "a", "max_new_tokens": 12}, "b"],
                                     "parameters": shared})
    assert error(r).startswith("instances[1]: 'min_tokens' 10 exceeds 'max_new_tokens' 2")
    del body["inputs"][0]["parameters"]
    assert error(post(logged.url + INFER, body)).startswith(
        "parameters: 'min_tokens' 10 exceeds 'max_new_tokens' 2")


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
def test_a_body_that_is_json_but_not_an_object_is_called_so(logged, content_type):
    """Under application/json, KServe decoded '"x"' to a string, which was parsed again:
    'not valid JSON'."""
    for body in ('"x"', "[1]", "5"):
        r = httpx.post(logged.url + PREDICT, content=body, timeout=30,
                       headers={"content-type": content_type})
        assert error(r) == "request body must be a JSON object", (body, r.text)


def test_predict_by_another_method_is_a_405_that_allows_post(logged):
    """KServe's GET /v1/models/{name} took 'aitextgen:predict' for a model's name (404), and
    its DELETE answered 405 allowing GET; OPTIONS and TRACE on ':explain' were told
    `Allow: PUT, GET, DELETE, PATCH` (found by schemathesis)."""
    for method in ("GET", "HEAD", "DELETE", "PUT", "OPTIONS", "TRACE"):
        for verb in ("predict", "explain"):
            r = httpx.request(method, f"{logged.url}/v1/models/{MODEL}:{verb}")
            assert r.status_code == 405 and r.headers["allow"] == "POST", (method, r.text)
    assert httpx.get(f"{logged.url}/v1/models/{MODEL}").status_code == 200
    assert httpx.get(f"{logged.url}/v1/models/{MODEL}:other").status_code == 404


def test_openai_routes_answer_no_such_route_and_wrong_method_in_openai_shape(logged):
    """Starlette's 404 and 405 were FastAPI's {"detail": ...} under /openai/, where every
    other error is OpenAI's {"error": {...}}; elsewhere they are KServe's {"error": ...},
    which tritonclient reads (it failed on the 404 of a model's config: 'error')."""
    for method, path, status in (("POST", "/openai/v1/nothing", 404),
                                 ("GET", COMPLETIONS, 405)):
        r = httpx.request(method, f"{logged.url}{path}")
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == status and r.json()["error"]["message"]
    r = httpx.post(f"{logged.url}/v9/nothing")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    r = httpx.get(f"{logged.url}/v2/models/{MODEL}/generate")
    assert r.status_code == 405 and r.json() == {"error": "Method Not Allowed"}
    assert r.headers["allow"] == "POST"
    r = httpx.get(f"{logged.url}/v2/models/{MODEL}/config")  # (a Triton route)
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
    # a vLLM user's base URL, http://HOST/v1: the client said only "{'detail': 'Not Found'}"
    client = openai.OpenAI(base_url=f"{logged.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model=MODEL, prompt="a", max_tokens=1)
    assert "OpenAI routes are under /openai/v1" in e.value.body["message"], e.value.body
    assert e.value.body["type"] == "not_found_error"  # (as the OpenAI routes' 404)


def test_a_negative_seed_is_taken_as_vllm_does(logged):
    """OpenAI and vLLM take any int64 seed; it was refused below 0."""
    body = {"prompt": "ROMEO:", "max_tokens": 8, "seed": -5, "temperature": 1.0}
    texts = set()
    for _ in range(2):
        r = post(f"{logged.url}{COMPLETIONS}", body)
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["text"])
    assert len(texts) == 1
    r = post(f"{logged.url}{COMPLETIONS}", {**body, "seed": -2**64})
    assert "'seed'" in error(r)
