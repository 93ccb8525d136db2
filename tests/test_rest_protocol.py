"""Issue 24, REST side: each repro against the real server on the embedded demo model (its
tokenizer splits é, ✓ and 日本 into byte tokens), through the official `openai` client where
it applies.

- hostile JSON (lone surrogates, 1,000-deep nesting, duplicate keys, invalid UTF-8, numbers
  too long) is a 400 naming the field on every route, never a 500;
- an unexpected exception is a 500 that says only "internal error" (a planted fault);
- OpenAI logprobs: end-of-text in streams, cumulative and character text_offset, the sampled
  token in top_logprobs, logprobs 0, end-of-text counted, top_k -1;
- smaller deviations: one n range, stream_options rules, "usage": null, V2 /infer's
  parameters, shapes, duplicates and outputs.
"""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ServerProcess, free_port, post, running_server

MODEL = "aitextgen"
PREDICT = f"/v1/models/{MODEL}:predict"
INFER = f"/v2/models/{MODEL}/infer"
GENERATE = f"/v2/models/{MODEL}/generate"
GENERATE_STREAM = f"/v2/models/{MODEL}/generate_stream"
COMPLETIONS = "/openai/v1/completions"
EOS_REPRO = {"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0, "logit_bias": {"0": 100},
             "logprobs": 1, "stream": True}


@pytest.fixture(scope="module")
def demo():
    """The embedded demo model, as `gpt2serve serve` runs it with no --model_dir."""
    with running_server("--enable_grpc", "false", "--max_batch_size", "8", "--max_n", "4") as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(demo):
    return openai.OpenAI(base_url=f"{demo.url}/openai/v1", api_key="unused", max_retries=0)


def sse(srv, path: str, body: dict) -> list[dict | str]:
    """The events of a stream: parsed JSON, or the string "[DONE]"."""
    r = post(srv.url + path, body)
    assert r.status_code == 200, r.text
    out = []
    for line in r.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def error_message(r: httpx.Response) -> str:
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


# ---- hostile JSON: 400 naming the field, on every route ----------------------------------

SURROGATE = '"x\\ud800y"'  # the JSON text of a lone surrogate escape
# route -> (raw body with {s} where the hostile string goes, the field the 400 must name)
ROUTES = {
    "v1": (PREDICT, '{"instances": [{"prompt": %s}]}', r"instances\[0\]\.prompt"),
    "v1 seed payload": (PREDICT, '{"text": %s}', "'text'"),
    "v2 infer": (INFER, '{"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", '
                        '"data": [%s]}]}', r"inputs\[0\]\.data\[0\]"),
    "v2 infer parameter": (INFER, '{"inputs": [{"name": "text_input", "shape": [1], '
                                  '"datatype": "BYTES", "data": ["a"]}], '
                                  '"parameters": {"stop": [%s]}}', r"parameters\.stop\[0\]"),
    "generate": (GENERATE, '{"text_input": %s}', "'text_input'"),
    "generate_stream": (GENERATE_STREAM, '{"text_input": %s}', "'text_input'"),
    "openai": (COMPLETIONS, '{"prompt": %s, "max_tokens": 1}', "'prompt'"),
    "openai stream": (COMPLETIONS, '{"prompt": [%s], "max_tokens": 1, "stream": true}',
                      r"prompt\[0\]"),
    "openai stop": (COMPLETIONS, '{"prompt": "a", "stop": %s, "max_tokens": 1}', "'stop'"),
    "tokenize": ("/tokenize", '{"prompt": %s}', "'prompt'"),
    "openai tokenize": ("/openai/v1/tokenize", '{"prompt": %s}', "'prompt'"),
}


def assert_400(r: httpx.Response, name: str, pattern: str) -> None:
    assert r.status_code == 400, (name, r.status_code, r.text)
    assert re.search(pattern, error_message(r)), (name, r.text)
    if name.startswith(("openai", "tokenize")):
        assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("content_type", ["application/json", "text/plain"])
@pytest.mark.parametrize("name", list(ROUTES))
def test_a_lone_surrogate_is_a_400_naming_the_field(demo, name, content_type):
    """The issue's repro: 500 `TypeError : TextInputSequence must be str` on OpenAI, V2 infer,
    generate, generate_stream and /tokenize."""
    path, template, field = ROUTES[name]
    r = post(demo.url + path, template % SURROGATE, headers={"content-type": content_type})
    assert_400(r, name, field + ".*lone UTF-16 surrogate")
    assert "TypeError" not in r.text


def test_a_surrogate_pair_is_text(demo, oai):
    """An escaped pair is one character (U+1F600), not a lone surrogate."""
    r = post(demo.url + "/tokenize", '{"prompt": "\\ud83d\\ude00"}')
    assert r.status_code == 200 and r.json()["count"] >= 1
    assert oai.completions.create(model=MODEL, prompt="\U0001F600", max_tokens=1).choices


@pytest.mark.parametrize("name", list(ROUTES))
def test_json_nested_1000_deep_is_a_400(demo, name):
    """The issue's repro: 500 RecursionError on /tokenize, the OpenAI route and generate."""
    path, template, field = ROUTES[name]
    top = re.split(r"\\|'", field.strip("'"))[0]  # the top-level field it is in
    r = post(demo.url + path, template % ("[" * 1000 + "]" * 1000))
    assert_400(r, name, f"'{top}' nests deeper than 64 levels")
    if path.startswith("/openai/") or path == "/tokenize":
        assert r.json()["error"]["param"] == top


@pytest.mark.parametrize("name", list(ROUTES))
def test_duplicate_keys_are_a_400_naming_them(demo, name):
    path, template, _ = ROUTES[name]
    r = post(demo.url + path, template % '{"a": 1, "a": 2}')
    assert_400(r, name, r"'[^']*\ba' is given more than once")


@pytest.mark.parametrize("name", list(ROUTES))
def test_invalid_utf8_and_overlong_numbers_are_a_400(demo, name):
    """The numbers named no field ("a number has too many digits")."""
    path, template, field = ROUTES[name]
    invalid = (template % '"x\xffy"').encode("latin-1")  # byte 0xFF: never UTF-8
    r = post(demo.url + path, invalid)
    assert r.status_code == 400 and ("UTF-8" in error_message(r) or "JSON" in error_message(r))
    r = post(demo.url + path, template % ("1" * 5000))  # more digits than int() converts
    assert_400(r, name, field + ".* is an integer beyond 64 bits")
    r = post(demo.url + path, template % "1e400")  # beyond a double: Python's inf
    assert_400(r, name, field + ".* is 1e400, which is not a JSON number")


def test_the_server_serves_after_hostile_input(demo):
    r = post(demo.url + PREDICT, {"instances": [{"prompt": "ROMEO:", "max_new_tokens": 2}]})
    assert r.status_code == 200 and r.json()["predictions"][0].startswith("ROMEO:")


# ---- CloudEvents on V1 :predict (KServe's SDK decodes them) -------------------------------

EVENT = {"specversion": "1.0", "id": "e-1", "source": "tests", "type": "predict",
         "data": {"instances": ["ROMEO:"], "parameters": {"max_new_tokens": 3,
                                                           "do_sample": False}}}
BINARY_HEADERS = {"ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "tests",
                  "ce-type": "predict"}
STRUCTURED = {"content-type": "application/cloudevents+json"}


def plain_prediction(demo) -> list[str]:
    r = post(demo.url + PREDICT, EVENT["data"])
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


@pytest.mark.parametrize("time", [True, False], ids=["with time", "without time"])
def test_a_structured_cloudevent_is_answered_with_one(demo, time):
    """`time` is optional in CloudEvents 1.0; the SDK took an event without it for a plain
    body (a 400 asking for 'instances')."""
    event = {**EVENT, **({"time": "2026-12-08T00:00:00Z"} if time else {})}
    r = post(demo.url + PREDICT, event, headers=STRUCTURED)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/cloudevents+json"
    assert r.json()["data"]["predictions"] == plain_prediction(demo)
    assert r.json()["specversion"] == "1.0"


def test_a_structured_cloudevent_with_binary_headers_too_is_read(demo):
    """The content type makes it structured (its data came decoded, which the SDK's
    decoding took for bytes: a 500)."""
    r = post(demo.url + PREDICT, EVENT, headers={**BINARY_HEADERS, **STRUCTURED})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == plain_prediction(demo)
    assert r.headers["ce-specversion"] == "1.0"


def test_a_binary_cloudevent_is_answered_with_one(demo):
    r = post(demo.url + PREDICT, EVENT["data"], headers=BINARY_HEADERS)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == plain_prediction(demo)
    assert r.headers["ce-type"] == "io.kserve.inference.response"


@pytest.mark.parametrize("body,says", [(b"xx", "not the CloudEvent its headers say"),
                                       (b'{"specversion": "1.0"', "not the CloudEvent"),
                                       (b"[1]", "not the CloudEvent"),
                                       (b"null", "not the CloudEvent"),
                                       (b"\xff\xfe", "not valid UTF-8")])
def test_a_cloudevent_body_that_is_not_json_is_a_400(demo, body, says):
    r = post(demo.url + PREDICT, body, headers={**BINARY_HEADERS, **STRUCTURED})
    assert r.status_code == 400, r.text
    assert says in error_message(r)


@pytest.mark.parametrize("headers,body", [
    (BINARY_HEADERS, b""),
    ({**BINARY_HEADERS, **STRUCTURED}, json.dumps({k: v for k, v in EVENT.items()
                                                   if k != "data"}).encode())],
    ids=["binary", "structured"])
def test_a_cloudevent_without_data_is_a_400(demo, headers, body):
    r = post(demo.url + PREDICT, body, headers=headers)
    assert r.status_code == 400, r.text
    assert "no data" in error_message(r)


# ---- V1 and V2 fields ---------------------------------------------------------------------

def test_a_null_prompt_beside_text_is_not_given(demo):
    """null is "not given" on every route: {"text": null, "prompt": "Hi"} is a prompt, and
    both null is no prompt (not "give one, not both")."""
    r = post(demo.url + PREDICT, {"instances": [{"text": None, "prompt": "ROMEO:"}],
                                  "parameters": EVENT["data"]["parameters"]})
    assert r.status_code == 200, r.text
    assert r.json()["predictions"] == plain_prediction(demo)
    r = post(demo.url + PREDICT, {"instances": [{"text": None, "prompt": None}]})
    assert_400(r, "v1", r"instances\[0\]: 'prompt' must be a string")


@pytest.mark.parametrize("value", [-1, -1.0, 0, 0.0])
def test_max_new_tokens_below_one_is_told_the_same_however_written(demo, value):
    r = post(demo.url + PREDICT, {"instances": ["Hi"], "parameters": {"max_new_tokens": value}})
    assert_400(r, "v1", r"'max_new_tokens' must be at least 1 here")


@pytest.mark.parametrize("given", ["", "req-7"])
def test_v2_infer_echoes_the_id_as_given(demo, given):
    r = post(demo.url + INFER, {"id": given, "parameters": {"max_new_tokens": 1},
                                "inputs": [{"name": "text_input", "shape": [1],
                                            "datatype": "BYTES", "data": ["Hi"]}]})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == given

# ---- an unexpected exception: "internal error", the traceback in the log only ---------------

PLANT = '''"""Planted by tests/test_rest_protocol.py: a fault in the tokenizer for one prompt."""
from gpt2serve import tokenizer

_encode = tokenizer.Tokenizer.encode


def encode(self, text):
    if "PLANTED-FAULT" in text:
        raise RuntimeError("Inplace update to inference tensor outside InferenceMode "
                           "(secret internals)")
    return _encode(self, text)


tokenizer.Tokenizer.encode = encode
'''


class PlantedServer(ServerProcess):
    """The real server with a planted fault: a sitecustomize module on its path makes the
    tokenizer raise RuntimeError for prompts holding PLANTED-FAULT. Its log is kept."""

    def __init__(self, folder: Path, *args: str):
        (folder / "sitecustomize.py").write_text(PLANT)
        self.log_path = folder / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(self.log_path, "w")
        path = os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
        cmd = [sys.executable, "-m", "gpt2serve.cli", "serve", "--http_port", str(self.port),
               "--grpc_port", str(free_port()), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": path})


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model):
    srv = PlantedServer(tmp_path_factory.mktemp("plant"), "--model_dir", str(tiny_model),
                        "--enable_grpc", "false")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


FAULT = "PLANTED-FAULT"
FAULTY = {
    "v1": (PREDICT, {"instances": [FAULT]}),
    "v1 text/plain": (PREDICT, {"instances": [FAULT]}),
    "v2 infer": (INFER, {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                                     "data": [FAULT]}]}),
    "generate": (GENERATE, {"text_input": FAULT}),
    "generate_stream": (GENERATE_STREAM, {"text_input": FAULT}),
    "openai": (COMPLETIONS, {"prompt": FAULT, "max_tokens": 1}),
    "openai stream": (COMPLETIONS, {"prompt": FAULT, "max_tokens": 1, "stream": True}),
    "tokenize": ("/tokenize", {"prompt": FAULT}),
    "openai tokenize": ("/openai/v1/tokenize", {"prompt": FAULT}),
}


@pytest.mark.parametrize("name", list(FAULTY))
def test_an_unexpected_exception_is_a_500_that_says_internal_error_only(planted, name):
    """The issue: V1's 500 body carried the exception ('RuntimeError : Inplace update to
    inference tensor ...', KServe's catch-all handler); others said 'TypeError : ...'."""
    path, body = FAULTY[name]
    content_type = "text/plain" if name.endswith("text/plain") else "application/json"
    r = post(planted.url + path, body, headers={"content-type": content_type})
    assert r.status_code == 500, r.text
    if path.startswith("/openai/") or path == "/tokenize":
        assert r.json() == {"error": {"message": "internal error", "type": "server_error",
                                      "param": None, "code": 500}}
    else:
        assert r.json() == {"error": "internal error"}
    log = planted.log_path.read_text()
    assert "Traceback" in log and "secret internals" in log  # the log keeps what happened
    ok = post(planted.url + path, json.loads(json.dumps(body).replace(FAULT, "ROMEO:")),
              headers={"content-type": content_type})
    assert ok.status_code == 200, ok.text  # and the server goes on serving


# ---- OpenAI logprobs --------------------------------------------------------------------

def test_a_stream_with_logprobs_that_ends_at_end_of_text_does_not_fail(demo):
    """The issue's repro: an error event (TypeError on a None token id) instead of the end."""
    events = sse(demo, COMPLETIONS, {**EOS_REPRO, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert not any("error" in c for c in chunks), chunks
    (last,) = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert last["finish_reason"] == "stop"
    assert last["logprobs"]["tokens"] == ["<|endoftext|>"]
    assert last["logprobs"]["token_logprobs"][0] < 0
    assert "<|endoftext|>" in last["logprobs"]["top_logprobs"][0]
    assert usage["usage"]["completion_tokens"] == 1  # end-of-text counts


def test_with_n_2_one_choice_at_end_of_text_leaves_its_sibling_streaming(demo):
    """The repro with n = 2 ended the sibling's stream too. Both greedy choices end at once
    here; then, sampling with end-of-text made likely, one choice ends at end-of-text while
    its sibling goes on, and both finish."""
    events = sse(demo, COMPLETIONS, {**EOS_REPRO, "n": 2})
    finished = [c["choices"][0] for c in events[:-1] if c["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finished) == [0, 1]
    assert all(c["logprobs"]["tokens"] == ["<|endoftext|>"] for c in finished)
    uneven = 0
    for seed in range(6):
        events = sse(demo, COMPLETIONS, {**EOS_REPRO, "n": 2, "logit_bias": {"0": 16},
                                         "temperature": 1.0, "seed": seed, "max_tokens": 16})
        assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events
        tokens = {0: [], 1: []}
        ends = {}
        for chunk in events[:-1]:
            choice = chunk["choices"][0]
            tokens[choice["index"]] += choice["logprobs"]["tokens"]
            if choice["finish_reason"]:
                ends[choice["index"]] = choice["finish_reason"]
        assert set(ends) == {0, 1}
        at_eos = [i for i in (0, 1) if tokens[i][-1:] == ["<|endoftext|>"]]
        uneven += bool(at_eos) and len(tokens[0]) != len(tokens[1])
    assert uneven  # a choice ended at end-of-text while its sibling went on


def test_completion_tokens_count_end_of_text(demo, oai):
    done = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0,
                                  logit_bias={"0": 100})
    assert done.choices[0].finish_reason == "stop" and done.choices[0].text == ""
    assert done.usage.completion_tokens == 1
    held = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=6, temperature=0,
                                  logit_bias={"0": 100}, extra_body={"min_tokens": 3})
    assert held.usage.completion_tokens == 4  # 3 held back, then end-of-text


def stream_logprobs(oai, **kw) -> tuple[str, dict]:
    """A stream's text and its logprobs joined, as a non-streamed choice has them."""
    text, joined = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                        "text_offset": []}
    for chunk in oai.completions.create(model=MODEL, stream=True, **kw):
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs:
            for key in joined:
                joined[key] += getattr(choice.logprobs, key)
    return text, joined


def test_streamed_text_offset_is_cumulative_and_equals_the_non_streamed(oai):
    kw = dict(prompt="ROMEO: héllo", max_tokens=24, temperature=0, logprobs=2)
    whole = oai.completions.create(model=MODEL, **kw).choices[0]
    text, streamed = stream_logprobs(oai, **kw)
    assert text == whole.text
    assert streamed["text_offset"] == whole.logprobs.text_offset  # it restarted at 0
    assert streamed["tokens"] == whole.logprobs.tokens
    assert streamed["text_offset"] == sorted(streamed["text_offset"])
    assert streamed["text_offset"][-1] > 0
    for token, at in zip(streamed["tokens"], streamed["text_offset"]):
        if "\ufffd" not in token:
            assert text[at:].startswith(token), (token, at, text)


def test_a_stream_of_no_tokens_has_the_empty_logprobs_the_answer_has(demo):
    """max_tokens 0 with logprobs: the answer's lists are empty, and the stream's last chunk
    had `logprobs: null` where it has them too."""
    body = {"prompt": "ROMEO:", "max_tokens": 0, "logprobs": 2}
    whole = post(demo.url + COMPLETIONS, body).json()["choices"][0]
    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    assert whole["logprobs"] == empty
    chunks = [e["choices"][0] for e in sse(demo, COMPLETIONS, {**body, "stream": True})[:-1]]
    assert [c["finish_reason"] for c in chunks] == ["length"]
    assert chunks[0]["logprobs"] == empty


def test_a_special_token_ends_a_prompts_unfinished_character(demo):
    """A prompt of token ids: é's first byte, then <|endoftext|>. /detokenize and the echo
    wrote U+FFFD before <|endoftext|>, and the completion began with a second U+FFFD (its
    detokenizer held the byte across the special token), its text_offset one short."""
    first_byte = post(demo.url + "/tokenize", {"prompt": "é"}).json()["tokens"][0]
    (eos,) = post(demo.url + "/tokenize", {"prompt": "<|endoftext|>"}).json()["tokens"]
    prompt = [first_byte, eos]
    before = post(demo.url + "/detokenize", {"tokens": prompt}).json()["prompt"]
    assert before == "\ufffd<|endoftext|>"
    body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 1}
    plain = post(demo.url + COMPLETIONS, body).json()["choices"][0]
    echoed = post(demo.url + COMPLETIONS, {**body, "echo": True}).json()["choices"][0]
    assert not plain["text"].startswith("\ufffd")
    assert echoed["text"] == before + plain["text"]
    for choice in (plain, echoed):
        lp = choice["logprobs"]
        for token, at in zip(lp["tokens"], lp["text_offset"]):
            assert choice["text"][at:].startswith(token), (token, at, choice["text"])
        streamed = sse(demo, COMPLETIONS, {**body, "echo": choice is echoed, "stream": True})
        assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == choice["text"]


def reference_offsets(token_bytes: list[bytes], start: int = 0) -> list[int]:
    """Character offsets of tokens from their bytes, the slow way: the characters completed
    by the bytes before each token."""
    out, before = [], b""
    for b in token_bytes:
        out.append(start + len(before.decode("utf-8", "ignore")))
        before += b
    return out


def test_echo_offsets_are_in_characters_for_multibyte_prompts(demo, oai):
    """The issue: echo offsets counted U+FFFD per byte token, so 日本 moved every later
    offset on. Here each offset is the character where its token's bytes start (a token
    inside a character is at that character), checked token by token against the text."""
    prompt = "héllo wörld ✓ 日本 ROMEO:"
    choice = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                    echo=True, logprobs=1).choices[0]
    lp = choice.logprobs
    ids = post(demo.url + "/tokenize", {"prompt": prompt, "return_token_strs": True}).json()
    assert len(ids["tokens"]) < len(lp.tokens)
    assert choice.text.startswith(prompt)
    split = sum(t == "\ufffd" for t in lp.tokens[:len(ids["tokens"])])
    assert split >= 6  # the demo tokenizer splits é, ö, ✓, 日, 本 into byte tokens
    prompt_bytes = [bytes(_byte_level(s)) for s in ids["token_strs"]]
    n = len(prompt_bytes)
    assert lp.text_offset[:n] == reference_offsets(prompt_bytes)
    assert lp.text_offset[n] == len(prompt)  # the continuation starts after the prompt
    for token, at in zip(lp.tokens, lp.text_offset):
        if "\ufffd" not in token:
            assert choice.text[at:].startswith(token), (token, at)
    # the streamed echo has the same offsets
    text, streamed = stream_logprobs(oai, prompt=prompt, max_tokens=8, temperature=0,
                                     echo=True, logprobs=1)
    assert text == choice.text and streamed["text_offset"] == lp.text_offset


def _byte_level(symbol: str) -> list[int]:
    """GPT-2's byte-level symbol -> bytes (openai/gpt-2 encoder.py's table, inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    inverse = {c: b for b, c in table.items()}
    return [inverse[c] for c in symbol]


def test_top_logprobs_always_hold_the_sampled_token(oai):
    """The issue: at temperature 1.5, 25 of 30 sampled tokens were missing from their
    top_logprobs. As OpenAI's, an entry holds the `logprobs` likeliest and the sampled one."""
    choice = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30,
                                    temperature=1.5, seed=7, logprobs=1,
                                    extra_body={"ignore_eos": True}).choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == 30
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and 1 <= len(top) <= 2
        if "\ufffd" not in token:
            assert top[token] == pytest.approx(value)
    assert any(len(top) == 2 for top in lp.top_logprobs)  # logprobs + 1 where not the likeliest


def test_logprobs_0_gives_the_sampled_tokens_entry(oai):
    choice = oai.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=5, temperature=1,
                                    seed=1, logprobs=0,
                                    extra_body={"ignore_eos": True}).choices[0]
    lp = choice.logprobs
    assert len(lp.top_logprobs) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top == {token: pytest.approx(value)}  # not {}


@pytest.mark.parametrize("path,body", [
    (PREDICT, {"instances": [{"prompt": "ROMEO:", "max_new_tokens": 2, "top_k": -1}]}),
    (PREDICT, {"instances": ["ROMEO:"], "parameters": {"max_new_tokens": 2, "top_k": -1}}),
    (INFER, {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                         "data": ["ROMEO:"]}], "parameters": {"max_new_tokens": 2,
                                                              "top_k": -1}}),
    (GENERATE, {"text_input": "ROMEO:", "parameters": {"max_new_tokens": 2, "top_k": -1}}),
    (GENERATE_STREAM, {"text_input": "ROMEO:", "parameters": {"max_new_tokens": 2,
                                                              "top_k": -1}}),
    (COMPLETIONS, {"prompt": "ROMEO:", "max_tokens": 2, "top_k": -1}),
])
def test_top_k_minus_1_is_disabled_on_every_route(demo, path, body):
    assert post(demo.url + path, body).status_code == 200
    bad = json.loads(json.dumps(body).replace('"top_k": -1', '"top_k": -2'))
    r = post(demo.url + path, bad)
    assert r.status_code == 400 and "'top_k' must be >= -1" in error_message(r)


def test_top_k_minus_1_samples_as_top_k_0(oai):
    kw = dict(model=MODEL, prompt="ROMEO:", max_tokens=12, temperature=1.0, seed=5)
    off = oai.completions.create(**kw, extra_body={"top_k": 0}).choices[0].text
    assert oai.completions.create(**kw, extra_body={"top_k": -1}).choices[0].text == off


# ---- smaller deviations -----------------------------------------------------------------

@pytest.mark.parametrize("n", [5, 129, 1000])
def test_the_n_error_gives_one_range(demo, n):
    """--max_n 4: n = 5 said [1, 4], n = 1000 said [1, 128]."""
    for path, body in ((PREDICT, {"instances": [{"prompt": "a", "n": n}]}),
                       (COMPLETIONS, {"prompt": "a", "n": n, "max_tokens": 1}),
                       (INFER, {"inputs": [{"name": "text_input", "shape": [1],
                                            "datatype": "BYTES", "data": ["a"]}],
                                "parameters": {"n": n}})):
        r = post(demo.url + path, body)
        assert r.status_code == 400 and f"'n' must be in [1, 4], got {n}" in error_message(r)


def test_stream_options_need_stream_and_a_boolean_include_usage(demo):
    for body, what in (({"stream_options": {"include_usage": True}}, "only allowed when"),
                       ({"stream_options": {"include_usage": True}, "stream": False},
                        "only allowed when"),
                       ({"stream": True, "stream_options": {"include_usage": "yes"}},
                        "must be true or false"),
                       ({"stream": True, "stream_options": {"include_usage": 1}},
                        "must be true or false"),
                       ({"stream": True, "stream_options": {"bogus": True}},
                        "unknown parameter"),
                       ({"stream": True, "stream_options": []}, "must be an object")):
        r = post(demo.url + COMPLETIONS, {"prompt": "a", "max_tokens": 1, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == "stream_options"
        assert what in r.json()["error"]["message"]
    assert post(demo.url + COMPLETIONS, {"prompt": "a", "max_tokens": 1,
                                         "stream_options": None}).status_code == 200


def test_stream_chunks_carry_usage_null_and_the_last_one_the_usage(demo):
    events = sse(demo, COMPLETIONS, {"prompt": "ROMEO:", "max_tokens": 4, "n": 2,
                                     "stream": True, "stream_options": {"include_usage": True}})
    chunks, final = events[:-2], events[-2]
    assert chunks and all("usage" in c and c["usage"] is None for c in chunks)
    assert final["choices"] == [] and final["usage"]["completion_tokens"] >= 2
    plain = sse(demo, COMPLETIONS, {"prompt": "ROMEO:", "max_tokens": 2, "stream": True})
    assert all(c["usage"] is None for c in plain[:-1])


def v2_body(**parameters) -> dict:
    return {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES",
                        "data": ["ROMEO:"]}],
            "parameters": {"max_new_tokens": 4, "temperature": 0, **parameters}}


def v2_text(srv, body) -> str:
    r = post(srv.url + INFER, body)
    assert r.status_code == 200, r.text
    (output,) = r.json()["outputs"]
    assert output["name"] == "text_output" and output["datatype"] == "BYTES"
    return output["data"][0]


def test_v2_infer_takes_list_and_object_parameters_as_the_readme_says(demo):
    """The issue: a 422 pydantic dump for stop, logit_bias and stop_token_ids."""
    greedy = v2_text(demo, v2_body())
    first = greedy[len("ROMEO:"):][:1]
    assert first and v2_text(demo, v2_body(stop=[first, "zz"])) == "ROMEO:"
    ids = post(demo.url + "/tokenize", {"prompt": " KING"}).json()["tokens"]
    forced = v2_text(demo, v2_body(logit_bias={str(ids[0]): 100}, max_new_tokens=2))
    assert forced.startswith("ROMEO:" + post(demo.url + "/detokenize",
                                             {"tokens": ids[:1]}).json()["prompt"])
    stopped = v2_text(demo, v2_body(logit_bias={str(ids[0]): 100}, stop_token_ids=[ids[0]]))
    assert stopped == "ROMEO:"
    # the input's own parameters win, lists included
    body = v2_body(stop=["zz"])
    body["inputs"][0]["parameters"] = {"stop": [first]}
    assert v2_text(demo, body) == "ROMEO:"
    # and they may come as one JSON object in the input `sampling_parameters` (Triton's vLLM
    # backend's), in 'data' or in the binary extension beside a binary text_input
    body = v2_body()
    fields = json.dumps({"stop": [first, "zz"]})
    body["inputs"].append({"name": "sampling_parameters", "shape": [1], "datatype": "BYTES",
                           "data": [fields]})
    assert v2_text(demo, body) == "ROMEO:"
    parts = [struct.pack("<I", len(s)) + s for s in (b"ROMEO:", fields.encode())]
    header = json.dumps({**body, "inputs": [
        {**tensor, "parameters": {"binary_data_size": len(part)}, "data": None}
        for tensor, part in zip(body["inputs"], parts)]}).replace(', "data": null', "")
    r = httpx.post(demo.url + INFER, content=header.encode() + b"".join(parts), timeout=60,
                   headers={"inference-header-content-length": str(len(header.encode()))})
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == ["ROMEO:"], r.text
    # text_input's own parameters still win; a null beside the input's setting sets nothing
    body["inputs"][1]["data"] = [json.dumps({"stop": ["zz"]})]
    body["inputs"][0]["parameters"] = {"stop": [first]}
    assert v2_text(demo, {**body, "parameters": {**body["parameters"], "stop": None}}) == "ROMEO:"
    # a JSON text_input beside a binary sampling_parameters, and binary parts that do not fit
    for size, part, message in [(len(parts[1]), parts[1], None),
                                (len(parts[1]) + 1, parts[1], "binary_data_size' must be"),
                                (len(parts[1]), parts[1] + b"x", "but the inputs' "
                                                                  "'binary_data_size' add up")]:
        header = json.dumps({**body, "inputs": [body["inputs"][0], {
            **{k: v for k, v in body["inputs"][1].items() if k != "data"},
            "parameters": {"binary_data_size": size}}]}).encode()
        r = httpx.post(demo.url + INFER, content=header + part, timeout=60,
                       headers={"inference-header-content-length": str(len(header))})
        if message is None:
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == ["ROMEO:"], r.text
        else:
            assert r.status_code == 400 and message in r.json()["error"], r.text


TENSOR = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["a"]}
V2_BAD = {
    "no inputs": ({}, "'inputs' must be a non-empty list"),
    "inputs not a list": ({"inputs": {"name": "text_input"}}, "'inputs' must be"),
    "input not an object": ({"inputs": ["a"]}, r"inputs\[0\] must be an object"),
    "input without shape": ({"inputs": [{"name": "text_input", "datatype": "BYTES",
                                         "data": ["a"]}]}, "'shape' must be"),
    "shape too small": ({"inputs": [{**TENSOR, "shape": [2]}]},
                        r"'shape' \[2\] holds 2 elements but 'data' has 1"),
    "shape too big for nested data": ({"inputs": [{**TENSOR, "shape": [1, 2],
                                                   "data": [["a"], ["b"]]}]}, "nested other"),
    "negative shape": ({"inputs": [{**TENSOR, "shape": [-1]}]}, "non-negative"),
    "shape of strings": ({"inputs": [{**TENSOR, "shape": ["1"]}]}, "'shape' must be"),
    "duplicate input": ({"inputs": [TENSOR, TENSOR]}, "'text_input' is given more than once"),
    "unknown input": ({"inputs": [TENSOR, {**TENSOR, "name": "x"}]}, "unknown input 'x'"),
    "unknown output": ({"inputs": [TENSOR], "outputs": [{"name": "logits"}]},
                       "unknown output 'logits'"),
    "output twice": ({"inputs": [TENSOR], "outputs": [{"name": "text_output"}] * 2},
                     "more than once"),
    "outputs not a list": ({"inputs": [TENSOR], "outputs": "text_output"},
                           "'outputs' must be a list"),
    "datatype": ({"inputs": [{**TENSOR, "datatype": "FP32", "data": [1.0]}]},
                 "must have datatype BYTES"),
    "data not strings": ({"inputs": [{**TENSOR, "data": [1]}]}, "must hold strings"),
    "data not a list": ({"inputs": [{**TENSOR, "data": "a"}]}, "'data' must be a list"),
    "no data": ({"inputs": [{k: v for k, v in TENSOR.items() if k != "data"}]},
                "'data' is missing"),
    "id not a string": ({"inputs": [TENSOR], "id": 5}, "'id' must be a string"),
    "model_name not a string": ({"inputs": [TENSOR], "model_name": []},
                                "'model_name' must be a string"),
    "parameters a list": ({"inputs": [TENSOR], "parameters": ["stop"]},
                          "'parameters' must be an object"),
    "unknown field": ({"inputs": [TENSOR], "input": []}, "unknown field 'input'"),
    "bad stop": ({"inputs": [TENSOR], "parameters": {"stop": [1]}}, "'stop' must be"),
    "bad logit_bias": ({"inputs": [TENSOR], "parameters": {"logit_bias": {"a": 1}}},
                       "'logit_bias' keys are token ids"),
    "sampling_parameters of two": ({"inputs": [TENSOR, {**TENSOR, "name": "sampling_parameters",
                                                         "shape": [2], "data": ["{}", "{}"]}]},
                                   r"'sampling_parameters' must have shape \[1\]"),
    "sampling_parameters not an object": (
        {"inputs": [TENSOR, {**TENSOR, "name": "sampling_parameters", "data": ["7"]}]},
        "'sampling_parameters' must hold a JSON object, not a number"),
    "sampling_parameters beside parameters": (
        {"inputs": [TENSOR, {**TENSOR, "name": "sampling_parameters",
                             "data": ['{"stop_sequences": ["a"]}']}],
         "parameters": {"stop": "b"}},
        "'stop' in 'parameters' and 'stop_sequences' in input 'sampling_parameters' set the"),
    "sampling_parameters' length beside parameters' other length": (
        {"inputs": [TENSOR, {**TENSOR, "name": "sampling_parameters",
                             "data": ['{"max_new_tokens": 3}']}],
         "parameters": {"max_length": 50}},
        "'max_length' in 'parameters' and 'max_new_tokens' in input"),
    "sampling_parameters giving a setting twice": (
        {"inputs": [TENSOR, {**TENSOR, "name": "sampling_parameters",
                             "data": ['{"stop": "a", "stop_sequences": "b"}']}]},
        "input 'sampling_parameters': give either 'stop' or 'stop_sequences', not both"),
    "sampling_parameters with parameters of its own": (
        {"inputs": [TENSOR, {**TENSOR, "name": "sampling_parameters", "data": ["{}"],
                             "parameters": {"temperature": 2}}]},
        "give parameter 'temperature' in its JSON object"),
    "a long shape, cut": (
        {"inputs": [{**TENSOR, "shape": [0] + [2**63 - 1] * 7}]},
        r"'shape' \[0, 9223372036854775807, 9223372036854775807, 9223372036\.\.\.\] holds 0"),
    "unknown parameter, cut": ({"inputs": [TENSOR], "parameters": {"x" * 1000: 1}},
                               "unknown parameter '" + "x" * 40 + "'[.]{3}$"),
    "body a list": ([TENSOR], "must be a JSON object"),
    "not JSON": ("{inputs", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(V2_BAD))
def test_v2_infer_malformed_bodies_are_a_400_naming_the_problem(demo, case):
    body, message = V2_BAD[case]
    r = post(demo.url + INFER, body)
    assert r.status_code == 400, r.text  # never KServe's 422 and its pydantic dump
    assert re.search(message, r.json()["error"]), r.text


def test_v2_infer_nested_data_and_kserve_binary_extension(demo):
    nested = {"inputs": [{**TENSOR, "shape": [2, 1], "data": [["ROMEO:"], ["JULIET:"]]}],
              "parameters": {"max_new_tokens": 2}}
    r = post(demo.url + INFER, nested)
    assert r.status_code == 200 and len(r.json()["outputs"][0]["data"]) == 2
    # the binary tensor extension: a JSON header, then length-prefixed strings
    data = b"".join(struct.pack("<I", len(s)) + s for s in (b"ROMEO:", "日本".encode()))
    header = json.dumps({"inputs": [{"name": "text_input", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}],
                         "parameters": {"max_new_tokens": 2}}).encode()
    r = httpx.post(demo.url + INFER, content=header + data, timeout=60, headers={
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header))})
    assert r.status_code == 200, r.text
    texts = r.json()["outputs"][0]["data"]
    assert texts[0].startswith("ROMEO:") and texts[1].startswith("日本")
    r = httpx.post(demo.url + INFER, content=header + data[:-1], timeout=60, headers={
        "inference-header-content-length": str(len(header))})
    assert r.status_code == 400 and "binary_data_size" in r.json()["error"]


@pytest.mark.parametrize("shape, data, message", [
    ([1], b"\x01\x00\x00\x00a\x01\x00\x00\x00b", "hold more elements than the shape's 1"),
    ([0], b"\x01\x00\x00\x00a", "hold more elements than the shape's 0"),
    ([1], b"\x06\x00\x00", "end inside an element's 4-byte length"),
    ([1], b"\x09\x00\x00\x00ROMEO:", "an element of 9 bytes runs past the end (6 left)"),
    ([1], b"\x02\x00\x00\x00\xff\xfe", "input 'text_input' is not valid UTF-8"),
    ([3], b"\x01\x00\x00\x00a", "holds 3 elements but its binary data has 1"),
    ([100_000], b"\x01\x00\x00\x00a", "has 100000 prompts; this server takes at most 64"),
], ids=["past the shape", "past an empty shape", "cut length", "cut element", "not UTF-8",
        "short of the shape", "a shape past --max_instances, refused before its data"])
def test_v2_infer_binary_data_that_does_not_fit_is_a_400_naming_it(demo, shape, data, message):
    """The binary extension's data is split no further than the shape's count (the same
    splitter as gRPC's raw contents), and a shape past --max_instances is refused first."""
    header = json.dumps({"inputs": [{"name": "text_input", "shape": shape, "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    r = httpx.post(demo.url + INFER, content=header + data, timeout=60, headers={
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header))})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()["error"]


def test_v2_infer_with_kserves_own_rest_client_json_and_binary(demo):
    """KServe's InferenceRESTClient at its defaults: it sends `model_name` in the body, and
    with binary_data the strings after the JSON header; a list parameter goes through."""
    import asyncio

    import numpy as np
    from kserve import InferenceRESTClient, RESTConfig
    from kserve.protocol.infer_type import InferInput, InferRequest

    async def infer(binary: bool):
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
        tensor = InferInput("text_input", [2], "BYTES")
        tensor.set_data_from_numpy(np.array([b"ROMEO:", "日本".encode()], dtype=object),
                                   binary_data=binary)
        request = InferRequest(model_name=MODEL, infer_inputs=[tensor],
                               parameters={"max_new_tokens": 3, "temperature": 0,
                                           "stop": ["zz"]})
        return await client.infer(demo.url, request, model_name=MODEL)

    json_answer, binary_answer = asyncio.run(infer(False)), asyncio.run(infer(True))
    for answer in (json_answer, binary_answer):
        (output,) = answer.outputs
        assert output.name == "text_output" and output.shape == [2]
        assert output.data[0].startswith("ROMEO:") and output.data[1].startswith("日本")
    assert json_answer.outputs[0].data == binary_answer.outputs[0].data  # greedy: the same


def test_explain_is_a_400_not_the_sdks_501(demo):
    """No explainer runs beside GPT-2: KServe's `:explain` route answered 501, and through it
    a body it could not read was its own 400, before the model's."""
    for body in ({"instances": ["ROMEO:"]}, "not JSON", {"instances": "x"}):
        r = post(f"{demo.url}/v1/models/{MODEL}:explain", body)
        assert r.status_code == 400 and r.json() == {
            "error": "this model has no explainer: use :predict"}, r.text
