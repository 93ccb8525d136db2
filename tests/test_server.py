"""The real server process over HTTP on loopback: every endpoint, payload shape and bad input."""

import json
import re

import httpx
import pytest

from conftest import ServerProcess, post

MODEL = "aitextgen"


def predict_url(server, model=MODEL):
    return f"{server.url}/v1/models/{model}:predict"


def test_health_and_model_endpoints(server):
    assert httpx.get(f"{server.url}/").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server.url}/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v1/models").json() == {"models": [MODEL]}
    assert httpx.get(f"{server.url}/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert httpx.get(f"{server.url}/v2/models/{MODEL}/ready").json()["ready"] is True
    metrics = httpx.get(f"{server.url}/metrics").text
    assert "gpt2serve_generated_tokens_total" in metrics
    assert "request_predict_seconds" in metrics  # KServe's own


def test_v1_instances_strings_and_objects(server):
    body = {"instances": ["ROMEO:", {"prompt": "JULIET:", "max_length": 12, "n": 3, "seed": 1},
                         {"text": "O Romeo", "max_new_tokens": 3}],
            "parameters": {"max_new_tokens": 5, "seed": 7}}
    r = post(predict_url(server), body)
    assert r.status_code == 200, r.text
    first, many, third = r.json()["predictions"]
    assert first.startswith("ROMEO:") and len(first) > len("ROMEO:")
    assert isinstance(many, list) and len(many) == 3
    assert all(t.startswith("JULIET:") for t in many)
    assert len(set(many)) > 1  # n sequences sample independently
    assert third.startswith("O Romeo")


def test_plain_curl_without_content_type_works(server):
    r = httpx.post(predict_url(server), content='{"instances": ["ROMEO:"]}',
                   headers={"content-type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0].startswith("ROMEO:")


def test_seed_predictor_payload(server):
    r = post(predict_url(server), {"text": "ROMEO:", "length": 10})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"prediction"}
    assert r.json()["prediction"].startswith("ROMEO:")


def test_seeded_requests_repeat_exactly(server):
    body = {"instances": [{"prompt": "ROMEO:", "seed": 42, "max_new_tokens": 20,
                           "temperature": 1.0}]}
    texts = {post(predict_url(server), body).json()["predictions"][0] for _ in range(3)}
    assert len(texts) == 1
    other = dict(body["instances"][0], seed=43)
    assert post(predict_url(server), {"instances": [other]}).json()["predictions"][0] not in texts


def test_greedy_is_deterministic_without_seed(server):
    body = {"instances": [{"prompt": "JULIET:", "do_sample": False, "max_new_tokens": 15}]}
    a, b = (post(predict_url(server), body).json() for _ in range(2))
    assert a == b


def test_stop_sequence_ends_text(server):
    body = {"instances": [{"prompt": "ROMEO:", "seed": 5, "max_new_tokens": 60, "temperature": 1.0}]}
    full = post(predict_url(server), body).json()["predictions"][0][len("ROMEO:"):]
    stop = full[len(full) // 2: len(full) // 2 + 2]
    body["instances"][0]["stop"] = stop
    cut = post(predict_url(server), body).json()["predictions"][0][len("ROMEO:"):]
    assert cut == full[:full.index(stop)]


def test_v2_infer(server):
    body = {"inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES",
                        "data": ["ROMEO:", "JULIET:"]}],
            "parameters": {"max_new_tokens": 4, "seed": 3}}
    r = post(f"{server.url}/v2/models/{MODEL}/infer", body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "text_output" and out["datatype"] == "BYTES"
    assert out["data"][0].startswith("ROMEO:") and out["data"][1].startswith("JULIET:")


BAD_INPUTS = {
    "malformed json": ('{"instances": [', "Unrecognized request format"),
    "instances not a list": ({"instances": "ROMEO:"}, "instances"),
    "empty instances": ({"instances": []}, "'instances' must be a non-empty list"),
    "instance wrong type": ({"instances": [42]}, r"instances\[0\] must be a string"),
    "prompt wrong type": ({"instances": [{"prompt": 5}]}, r"instances\[0\]: 'prompt' must be"),
    "unknown param": ({"instances": [{"prompt": "a", "tempreature": 1}]},
                      r"instances\[0\]: unknown parameter 'tempreature'"),
    "unknown top-level": ({"instances": ["a"], "foo": 1}, "unknown top-level field"),
    "bad temperature": ({"instances": ["a"], "parameters": {"temperature": -1}},
                        r"'temperature' must be in"),
    "temperature string": ({"instances": [{"prompt": "a", "temperature": "hot"}]},
                           r"'temperature' must be a number"),
    "top_p zero": ({"instances": [{"prompt": "a", "top_p": 0}]}, "'top_p' must be in"),
    # one range, the server's, whatever the n (issue 24: n > 128 said [1, 128])
    "n too big": ({"instances": [{"prompt": "a", "n": 1000}]}, r"'n' must be in \[1, 8\]"),
    "n over batch": ({"instances": [{"prompt": "a", "n": 9}]}, r"'n' must be in \[1, 8\]"),
    "both lengths": ({"instances": [{"prompt": "a", "max_length": 5, "max_new_tokens": 5}]},
                     "either 'max_length' or 'max_new_tokens'"),
    "length beyond context": ({"instances": [{"prompt": "a", "max_length": 5000}]},
                              r"'max_length' is 5000\. This model's maximum context length is "
                              r"128 tokens\.$"),
    "new tokens beyond context": ({"instances": [{"prompt": "a", "max_new_tokens": 500}]},
                                  r"plus the prompt's 1 tokens is 501\. This model's maximum "
                                  r"context length is 128 tokens\.$"),
    "prompt beyond context": ({"instances": ["ROMEO: " * 200]},
                              r"prompt is \d+ tokens\. This model's maximum context length "
                              r"is 128 tokens\.$"),
    "stop wrong type": ({"instances": [{"prompt": "a", "stop": [1]}]}, "'stop' must be"),
    # (refused as JSON, by its path: KServe's parser would read it as a double)
    "seed below int64": ({"instances": [{"prompt": "a", "seed": -2**64}]},
                         r"'instances\[0\]\.seed' is an integer beyond 64 bits"),
    "seed just below int64": ({"instances": [{"prompt": "a", "seed": -2**63 - 1}]},
                              r"'instances\[0\]\.seed' is an integer beyond 64 bits"),
    "seed past int64": ({"instances": [{"prompt": "a", "seed": 2**63}]}, "'seed' must be"),
    "bool as int": ({"instances": [{"prompt": "a", "top_k": True}]}, "'top_k' must be an integer"),
    "no instances or text": ({"prompt": "a"}, "needs 'instances'"),
    "seed payload bad length": ({"text": "a", "length": "long"}, "'length' must be an integer"),
    "seed payload two lengths": ({"text": "a", "length": 5, "max_length": 9},
                                 "give either 'length' or 'max_length', not both"),
    "seed payload long length": ({"text": "a", "length": 5000},
                                 "'length' is 5000. This model's maximum context length is 128"),
    "body not object": ('["a"]', "must be a JSON object"),
    "logprobs outside OpenAI": ({"instances": [{"prompt": "a", "logprobs": 2}]},
                                r"instances\[0\]: 'logprobs' is answered on the OpenAI "),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_400_naming_the_problem(server, case):
    body, message = BAD_INPUTS[case]
    r = post(predict_url(server), body)
    assert r.status_code == 400, r.text
    assert re.search(message, r.json()["error"]), r.text
    # and the server keeps serving
    assert post(predict_url(server), {"instances": [{"prompt": "a", "max_new_tokens": 2}]}
                ).status_code == 200


def test_unknown_model_is_404(server):
    r = post(predict_url(server, "nope"), {"instances": ["a"]})
    assert r.status_code == 404
    assert "nope" in r.json()["error"]


def test_v2_bad_input(server):
    body = {"inputs": [{"name": "wrong", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    r = post(f"{server.url}/v2/models/{MODEL}/infer", body)
    assert r.status_code == 400 and "text_input" in r.json()["error"]


def test_model_versions_are_a_400_not_kserves_501(server):
    r = httpx.get(f"{server.url}/v2/models/{MODEL}/versions/1/ready")
    assert r.status_code == 400 and "versions are not supported" in r.json()["error"]
    r = httpx.get(f"{server.url}/v2/models/{MODEL}", params={"model_version": "2"})
    assert r.status_code == 400


def test_vanishing_temperature_is_greedy_not_a_500(server):
    """Dividing logits by 1e-300 overflowed to NaN inside the sampler (a 500, found by review)."""
    greedy = {"prompt": "ROMEO:", "max_new_tokens": 8, "do_sample": False}
    tiny = {"prompt": "ROMEO:", "max_new_tokens": 8, "temperature": 1e-300, "top_k": 0}
    r = post(predict_url(server), {"instances": [tiny, greedy]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0] == r.json()["predictions"][1]


def test_the_schema_describes_the_routes_that_answer(server):
    """Where a route of ours answers a path KServe also serves, /openapi.json described
    KServe's (the later entry won: V2 infer's body was KServe's InferenceRequest, not what our
    route reads). Requests to KServe's routers come first: FastAPI copies a route's flags when
    a request first reaches its router."""
    assert httpx.get(f"{server.url}/v2/models", timeout=30).status_code == 200
    assert httpx.get(f"{server.url}/no/such/path", timeout=30).status_code == 404
    schema = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    infer = schema["paths"]["/v2/models/{model_name}/infer"]["post"]
    body = infer["requestBody"]["content"]["application/json"]["schema"]
    assert body["required"] == ["inputs"] and "parameters" in body["properties"], body
    ready = schema["paths"]["/v2/health/ready"]["get"]
    assert "Server ready endpoint" not in ready.get("description", ""), ready  # KServe's


def test_the_schema_gives_what_our_routes_answer(server):
    """Our routes were described as answering 200 and a 422 that none of them answers (each
    reads its own body and refuses with a 400 naming the field), the streams as JSON, and
    their bodies as taking any field (unknown ones are refused) and no null (null takes the
    default): found by schemathesis's conformance checks."""
    paths = httpx.get(f"{server.url}/openapi.json", timeout=30).json()["paths"]
    ours = [paths["/v2/models/{model_name}/" + p]["post"] for p in ("generate", "generate_stream",
                                                                     "infer")]
    ours += [paths[p]["post"] for p in ("/openai/v1/completions", "/tokenize", "/detokenize")]
    for operation in ours:
        assert set(operation["responses"]) == {"200", "4XX", "503"}, operation["responses"]
        assert "Retry-After" in operation["responses"]["503"]["headers"]
    stream = paths["/v2/models/{model_name}/generate_stream"]["post"]["responses"]["200"]
    assert list(stream["content"]) == ["text/event-stream"]
    completions = paths["/openai/v1/completions"]["post"]
    assert set(completions["responses"]["200"]["content"]) == {"application/json",
                                                               "text/event-stream"}
    error = completions["responses"]["4XX"]["content"]["application/json"]["schema"]
    assert set(error["properties"]["error"]["properties"]) == {"message", "type", "param", "code"}
    body = completions["requestBody"]["content"]["application/json"]["schema"]
    assert body["additionalProperties"] is False and "required" not in body  # (no prompt: "")
    assert {"type": "null"} in body["properties"]["max_tokens"]["anyOf"]
    # and what the schema says is what the route takes: each of its fields, null too
    for field in body["properties"]:
        r = post(f"{server.url}/openai/v1/completions", {"max_tokens": 1, field: None})
        assert r.status_code == 200, (field, r.text)
    r = post(f"{server.url}/openai/v1/completions", {"max_tokens": 1, "cache_salt": "s"})
    assert r.status_code == 200, r.text
    assert "200" not in paths["/openai/v1/chat/completions"]["post"]["responses"]  # (refused)
    r = post(f"{server.url}/openai/v1/completions", {"prompt": "a", "min_p": 0.1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_p", r.text
    generate = paths["/v2/models/{model_name}/generate"]["post"]["requestBody"]
    fields = generate["content"]["application/json"]["schema"]["properties"]
    r = post(f"{server.url}/v2/models/{MODEL}/generate", {"text_input": "a", "parameters": None})
    assert r.status_code == 200 and "null" in fields["parameters"]["type"], r.text


def test_the_log_config_file_governs_the_start_up_lines_too(tmp_path):
    """KServe's --log_config_file took effect once ModelServer was made, after the models
    had loaded: every start-up line (a model's load, its KV cache, its runner) came at INFO
    in the default format whatever the operator's file said."""
    config = tmp_path / "logging.json"
    config.write_text(json.dumps({
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"mine": {"format": "MINE %(levelname)s %(name)s %(message)s"}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "mine"}},
        "root": {"level": "INFO", "handlers": ["out"]}}))
    log = tmp_path / "server.log"
    srv = ServerProcess("--enable_grpc", "false", "--log_config_file", str(config), log=log)
    try:
        srv.wait_ready()
    finally:
        srv.stop()
    lines = [line for line in log.read_text().splitlines() if "gpt2serve." in line]
    assert any("runner: " in line for line in lines), lines
    assert all(line.startswith("MINE ") for line in lines), lines
