"""KServe V2 over gRPC against the real server process, as a client of the protocol and as a
hostile one: the binary tensor extension (`raw_input_contents`) with KServe's own
`InferenceGRPCClient` at its defaults and with raw grpcio, model metadata, malformed protobuf,
non-UTF-8 strings, hostile tensors, and a seeded fuzz over every method that must never get
UNKNOWN or INTERNAL."""

import asyncio
import collections
import random
import re
import struct
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from conftest import free_port, running_server
from test_grpc import rest_texts

MODEL = "aitextgen"
SERVICE = "/inference.GRPCInferenceService/"
METHODS = {name: pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[name]
           for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                        "ModelMetadata", "ModelInfer", "RepositoryModelLoad",
                        "RepositoryModelUnload")}
GREEDY = {"max_new_tokens": 6, "do_sample": False}
# A status that says the server lost track of a request: never for anything a client sends.
SERVER_FAULTS = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


@pytest.fixture(scope="module")
def rpc(tiny_model):
    port = free_port()
    with running_server("--model_dir", str(tiny_model), "--grpc_port", str(port),
                        "--max_batch_size", "8") as srv, \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        srv.grpc_address = f"127.0.0.1:{port}"
        srv.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        srv.channel = channel
        yield srv


def call_raw(srv, method: str, data: bytes, timeout: float = 30):
    """Send `data` as the request body of `method`; (status code, details, response bytes)."""
    call = srv.channel.unary_unary(SERVICE + method)
    try:
        return grpc.StatusCode.OK, "", call(data, timeout=timeout)
    except grpc.RpcError as e:
        return e.code(), e.details(), None


def length_prefixed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def set_params(target, params: dict) -> None:
    for name, value in params.items():
        if isinstance(value, bool):
            target[name].bool_param = value
        else:
            target[name].int64_param = value


def served(srv) -> bool:
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="text_input", datatype="BYTES", shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[b"ROMEO:"]))])
    set_params(request.parameters, {"max_new_tokens": 2})
    response = srv.stub.ModelInfer(request, timeout=30)
    return response.outputs[0].contents.bytes_contents[0].startswith(b"ROMEO:")


# ---- the binary tensor extension ---------------------------------------------------------

def test_kserve_grpc_client_at_its_defaults(rpc):
    """KServe's own async client, nothing but defaults: set_data_from_numpy sends the text in
    raw_input_contents (binary_data=True). It was INVALID_ARGUMENT ('must hold one or more
    strings'); now it gets the text REST gives for the same request."""
    prompts = [b"ROMEO:", "JULIET: héllo".encode()]

    async def ask():
        client = InferenceGRPCClient(rpc.grpc_address)
        try:
            tensor = InferInput("text_input", [2], "BYTES")
            tensor.set_data_from_numpy(np.array(prompts, dtype=object))
            request = InferRequest(model_name=MODEL, infer_inputs=[tensor], parameters=GREEDY)
            wire = request.to_grpc()
            assert len(wire.raw_input_contents) == 1 and not wire.inputs[0].HasField("contents")
            return await client.infer(request)
        finally:
            await client.close()

    response = asyncio.run(ask())
    out = response.outputs[0]
    assert out.name == "text_output" and out.datatype == "BYTES" and out.shape == [2]
    got = [b.decode() for b in out.as_numpy().tolist()]
    assert got == rest_texts(rpc, [p.decode() for p in prompts], GREEDY)
    assert got[0].startswith("ROMEO:") and got[1].startswith("JULIET: héllo")


def test_raw_input_contents_over_grpcio(rpc):
    """The same request in raw_input_contents and in contents gives the same text; raw in,
    raw out (length-prefixed), as KServe's SDK and Triton answer."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="text_input", datatype="BYTES", shape=[2])
    raw = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor],
                               raw_input_contents=[length_prefixed(b"ROMEO:", b"")])
    set_params(raw.parameters, GREEDY)
    response = rpc.stub.ModelInfer(raw, timeout=60)
    assert len(response.raw_output_contents) == 1
    assert not response.outputs[0].HasField("contents")
    blob, texts = response.raw_output_contents[0], []
    while blob:
        (size,), blob = struct.unpack("<I", blob[:4]), blob[4:]
        texts.append(blob[:size].decode())
        blob = blob[size:]
    assert texts == rest_texts(rpc, ["ROMEO:", ""], GREEDY)


@pytest.mark.parametrize("raw,contents,inputs,message", [
    (b"\x06\x00\x00", False, 1, "inside an element's 4-byte length"),
    (b"\x09\x00\x00\x00ROMEO:", False, 1, "runs past the end"),
    (length_prefixed(b"ROMEO:"), True, 1, "both contents and raw_input_contents"),
    (length_prefixed(b"ROMEO:"), False, 2, "raw_input_contents"),
    (length_prefixed(b"\xff\xfe"), False, 1, "not valid UTF-8"),
    (length_prefixed(b"a", b"b"), False, 1, "hold more elements than the shape's 1"),
    (length_prefixed(b"a"), False, 1, None),  # (the same, whole: served)
])
def test_malformed_raw_contents_are_invalid_argument(rpc, raw, contents, inputs, message):
    tensors = [pb.ModelInferRequest.InferInputTensor(name=f"text_input{'_x' * i}",
                                                     datatype="BYTES", shape=[1])
               for i in range(inputs)]
    if contents:
        tensors[0].contents.bytes_contents.append(b"JULIET:")
    request = pb.ModelInferRequest(model_name=MODEL, inputs=tensors, raw_input_contents=[raw])
    if message is None:
        set_params(request.parameters, GREEDY)
        assert len(rpc.stub.ModelInfer(request, timeout=30).raw_output_contents) == 1
        return
    with pytest.raises(grpc.RpcError) as e:
        rpc.stub.ModelInfer(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert __import__("re").search(message, e.value.details()), e.value.details()


# ---- malformed messages ------------------------------------------------------------------

def non_utf8_string_param() -> bytes:
    """ModelInferRequest{model_name: "aitextgen", parameters: {"stop": string_param b"\\xff\\xfe"}}
    written by hand: no protobuf library will serialise a string that is not UTF-8."""
    param = b"\x1a\x02\xff\xfe"                                  # string_param (3)
    entry = b"\x0a\x04stop" + b"\x12" + bytes([len(param)]) + param  # map entry: key, value
    return b"\x0a\x09aitextgen" + b"\x22" + bytes([len(entry)]) + entry  # field 4: parameters


@pytest.mark.parametrize("method", sorted(METHODS))
def test_malformed_protobuf_is_invalid_argument(rpc, method):
    """A garbled message on every method, and a string that is not UTF-8 (a name, or a
    string_param), were UNKNOWN ('Unexpected DecodeError')."""
    fields = METHODS[method].input_type.fields_by_number
    name_is_a_string = 1 in fields and fields[1].type == fields[1].TYPE_STRING
    garbled = [b"\xff\xff\xff", b"\x0a\x05ab"]  # a cut varint; a string cut short
    for data in garbled + ([b"\x0a\x02\xff\xfe"] if name_is_a_string else []):
        code, details, _ = call_raw(rpc, method, data)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (data, code, details)
        assert "malformed" in details
    if method == "ModelInfer":
        code, details, _ = call_raw(rpc, method, non_utf8_string_param())
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details


def tensor(name="text_input", datatype="BYTES", shape=(1,), data=(b"ROMEO:",), **contents):
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))
    if data is not None:
        t.contents.bytes_contents.extend(data)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return t


def double_param(value: float) -> bytes:
    return b"\x21" + struct.pack("<d", value)


HUGE_UINT64 = b"\x28" + b"\xff" * 9 + b"\x01"  # uint64_param 2**64 - 1


@pytest.mark.parametrize("inputs,params,outputs,message", [
    ([tensor(), tensor()], {}, [], "given twice"),
    ([tensor(shape=(2,))], {}, [], r"shape \[2\] \(2 elements\) but 1"),
    ([tensor(shape=(1, 0))], {}, [], r"\(0 elements\) but 1"),
    ([tensor(shape=(-1,))], {}, [], "negative dimension"),
    ([tensor(shape=(1,) * 9)], {}, [], "9 dimensions; at most 8"),  # (REST's bound)
    ([tensor(shape=(2**62, 2**62))], {}, [], r"has \d+ prompts; this server takes at most 64"),
    # refused for its shape, whatever its data (the shape is checked first: a 1 MiB request
    # of 524,000 empty elements took 0.14 s of the event loop to be refused)
    ([tensor(shape=(100_000,))], {}, [], "has 100000 prompts; this server takes at most 64"),
    ([tensor(), tensor(name="extra")], {}, [], "unknown input 'extra'"),
    ([tensor(data=None, fp32_contents=[1.0])], {}, [], "bytes_contents, not fp32_contents"),
    ([tensor(int64_contents=[1])], {}, [], "bytes_contents, not int64_contents"),
    ([tensor(datatype="FP32")], {}, [], "datatype BYTES"),
    ([tensor()], {}, ["logits"], "unknown requested output 'logits'"),
    ([tensor()], {}, ["text_output"] * 2, "asked for more than once"),  # (REST's 400)
    ([tensor()], {}, ["Z" * 5000], "unknown requested output '" + "Z" * 40 + "': this"),
    ([tensor(shape=(0,) + (2**63 - 1,) * 7)], {}, [],
     r"shape \[0, 9223372036854775807, 9223372036854775807, 9223372036\.\.\.\] \(0 elements\)"),
    ([tensor()], {"temperature": double_param(float("nan"))}, [], "finite"),
    ([tensor()], {"temperature": double_param(float("inf"))}, [], "finite"),
    ([tensor()], {"max_new_tokens": HUGE_UINT64}, [], "max_new_tokens"),
    ([tensor()], {"max_new_tokens": b"\x10\x00"}, [], "'max_new_tokens' must be at least 1"),
    ([tensor(data=[b"a" * 100_000])], {}, [], "max_prompt_chars"),
    ([tensor(shape=(65,), data=[b"a"] * 65)], {}, [], "at most 64"),
    # the request's parameters as one JSON object (Triton's vLLM backend's input)
    ([tensor(), tensor(name="sampling_parameters", shape=(2,), data=[b"{}", b"{}"])], {}, [],
     r"'sampling_parameters' must have shape \[1\]: one JSON object"),
    ([tensor(name="sampling_parameters", data=[b"{}"])], {}, [], "needs a BYTES input"),
    ([tensor(), tensor(name="sampling_parameters", data=[b"[1]"])], {}, [],
     "'sampling_parameters' must hold a JSON object, not an array"),
    ([tensor(), tensor(name="sampling_parameters", data=[b'{"a": NaN}'])], {}, [],
     "input 'sampling_parameters': 'a' is NaN"),
    ([tensor(), tensor(name="sampling_parameters", data=[b'NaN'])], {}, [],
     "input 'sampling_parameters' is NaN"),
    ([tensor(), tensor(name="sampling_parameters", shape=(1, 1), data=[b"{}"])], {}, [],
     r"'sampling_parameters' must have shape \[1\]"),
    ([tensor(), tensor(name="sampling_parameters", data=[b"\xff"])], {}, [],
     "'sampling_parameters' is not valid UTF-8"),
    ([tensor(), tensor(name="sampling_parameters", data=[b'{"stop_token_ids": "a"}'])], {},
     [], "input 'sampling_parameters': 'stop_token_ids' must be"),
    ([tensor(), tensor(name="sampling_parameters", data=[b'{"temperature": 0.5}'])],
     {"temperature": double_param(0.7)}, [],
     "'temperature' in 'parameters' and 'temperature' in input 'sampling_parameters' set the "
     "same thing"),
])
def test_hostile_tensors_are_invalid_argument(rpc, inputs, params, outputs, message):
    request = pb.ModelInferRequest(model_name=MODEL, inputs=inputs, outputs=[
        pb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in outputs])
    for name, raw in params.items():
        request.parameters[name].MergeFromString(raw)
    with pytest.raises(grpc.RpcError) as e:
        rpc.stub.ModelInfer(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert __import__("re").search(message, e.value.details()), e.value.details()
    assert served(rpc)


def test_binary_flags_are_checked_as_rest_checks_them(rpc):
    """REST refuses a requested output's unknown parameter, and `binary_data` or
    `binary_data_output` that is not a bool; gRPC ignored all three (found by helper 65's
    fuzz). Valid ones are taken and change nothing over gRPC: raw outputs follow raw inputs."""
    def call(output_params: dict, params: dict):
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor()], outputs=[
            pb.ModelInferRequest.InferRequestedOutputTensor(name="text_output")])
        set_params(request.parameters, {"max_new_tokens": 2, **params})
        for name, value in output_params.items():
            if isinstance(value, bool):
                request.outputs[0].parameters[name].bool_param = value
            else:
                request.outputs[0].parameters[name].string_param = value
        return rpc.stub.ModelInfer(request, timeout=30)

    for output_params, params, message in [
            ({"binary_data": "yes"}, {},
             "outputs[0].parameters: 'binary_data' must be true or false"),
            ({"foo": "1"}, {}, "outputs[0].parameters: unknown field 'foo'"),
            ({}, {"binary_data_output": 1},
             "parameters: 'binary_data_output' must be true or false")]:
        with pytest.raises(grpc.RpcError) as e:
            call(output_params, params)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert e.value.details() == message
    reply = call({"binary_data": True}, {"binary_data_output": True})
    assert len(reply.outputs[0].contents.bytes_contents) == 1 and not reply.raw_output_contents


def test_calls_at_once_on_one_connection_get_the_queues_answer(rpc):
    """300 calls at once on one connection: with 128 streams a connection, the server
    refused those past it (RST_STREAM, UNAVAILABLE 'Stream removed'), 154 of 300, though the
    queue (--max_queue 256) would have taken them; grpcio's client does not wait for a
    stream. Each call now gets its text, or the queue's own refusal."""
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor()])
    set_params(request.parameters, {"max_new_tokens": 2})
    calls = [rpc.stub.ModelInfer.future(request, timeout=120) for _ in range(300)]
    answers = collections.Counter()
    for call in calls:
        try:
            call.result()
            answers["OK"] += 1
        except grpc.RpcError as e:
            answers[e.details()] += 1
    assert set(answers) <= {"OK", "queue is full (256 waiting requests)"}, answers
    assert answers["OK"] >= 256 + 8, answers


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_refused_requests_leave_no_memory_behind(rpc):
    """A refused request's frames hold it, and they were freed only by a full collection of
    the cyclic garbage, which a process of torch's size runs rarely: 50 requests of 524,000
    empty strings (1 MiB each) grew the server's RSS by about 300 MB, for good."""
    request = pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(shape=(524_000,),
                                                                     data=[b""] * 524_000)])
    for _ in range(5):  # the allocator's first growth
        with pytest.raises(grpc.RpcError):
            rpc.stub.ModelInfer(request, timeout=30)
    before = rss_mib(rpc.proc.pid)
    for _ in range(50):
        with pytest.raises(grpc.RpcError) as e:
            rpc.stub.ModelInfer(request, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rss_mib(rpc.proc.pid) - before < 60  # (with them freed: about 20)
    assert served(rpc)


def test_a_long_name_in_an_error_leaves_its_status_whole(rpc):
    """Names a client chose were repeated in full in the details, which travel in a header:
    past gRPC's metadata limit the status was lost to RESOURCE_EXHAUSTED."""
    for name in ("k" * 20_000, "\u2603" * 3_000):
        with pytest.raises(grpc.RpcError) as e:
            rpc.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            rpc.stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(
                name=name)]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
        assert len(e.value.details().encode()) <= 1100 and "unknown input" in e.value.details()


# ---- metadata ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,request_type,field", [
    ("ModelInfer", pb.ModelInferRequest, "model_name"),
    ("ModelReady", pb.ModelReadyRequest, "name"),
    ("ModelMetadata", pb.ModelMetadataRequest, "name"),
])
def test_a_model_version_is_invalid_argument_on_every_method(rpc, method, request_type, field):
    """REST refuses a version on every route; gRPC's ModelReady and ModelMetadata answered for
    the model whatever version they were asked about."""
    def request(**version) -> bytes:
        message = request_type(**{field: MODEL}, **version)
        if method == "ModelInfer":
            message.inputs.append(tensor())
        return message.SerializeToString()

    code, details, _ = call_raw(
        rpc, method, request(**{"model_version" if method == "ModelInfer" else "version": "2"}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
    assert "model versions are not supported" in details
    assert call_raw(rpc, method, request())[0] == grpc.StatusCode.OK


def test_model_metadata_lists_text_input_and_text_output(rpc):
    want_in = [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    want_out = [{"name": "text_output", "datatype": "BYTES", "shape": [-1]}]
    rest = httpx.get(f"{rpc.url}/v2/models/{MODEL}", timeout=10).json()
    assert rest["name"] == MODEL
    assert rest["inputs"] == want_in and rest["outputs"] == want_out
    meta = rpc.stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text_input", "BYTES", [-1])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("text_output", "BYTES", [-1])]
    with pytest.raises(grpc.RpcError) as e:
        rpc.stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# ---- fuzz --------------------------------------------------------------------------------

PARAM_NAMES = ["max_new_tokens", "max_length", "min_length", "temperature", "do_sample",
               "top_k", "top_p", "repetition_penalty", "n", "seed", "stop", "ignore_eos",
               "presence_penalty", "frequency_penalty", "logit_bias", "min_tokens",
               "stop_token_ids", "include_stop_str_in_output", "content_type",
               "binary_data_size", "", "tempreature", "日本", "x" * 300]
STRINGS = ["", "ROMEO:", "aitextgen", "nope", "héllo wörld ✓ 日本", "\x00", "a" * 40_000,
           "text_input", "text_output", "{}", "[1, 2]", "-1", "1e400", "NaN"]
BYTES_VALUES = [b"", b"ROMEO:", b"\xff\xfe\xfd", "日本".encode(), b"\x00" * 10, b"a" * 40_000,
                b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]  # a lone surrogate, beyond U+10FFFF
INTS = [0, 1, 2, 3, -1, 16, 17, 64, 65, 10**6, 2**31, 2**62, -2**63, 2**63 - 1]
DOUBLES = [0.0, 0.5, 1.0, 1.5, -1.0, 1e-9, 1e300, -1e300, float("nan"), float("inf"),
           float("-inf"), 5e-324]


def fuzz_parameter(rng: random.Random, target) -> None:
    name = rng.choice(PARAM_NAMES)
    kind = rng.randrange(6)
    if kind == 0:
        target[name].bool_param = rng.random() < 0.5
    elif kind == 1:
        target[name].int64_param = rng.choice(INTS)
    elif kind == 2:
        target[name].string_param = rng.choice(STRINGS)
    elif kind == 3:  # double_param (4) and uint64_param (5): not in kserve's proto
        target[name].MergeFromString(b"\x21" + struct.pack("<d", rng.choice(DOUBLES)))
    elif kind == 4:
        value = rng.choice([0, 1, 2, 300, 2**32, 2**64 - 1])
        varint = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            varint.append(byte | (0x80 if value else 0))
            if not value:
                break
        target[name].MergeFromString(b"\x28" + bytes(varint))
    else:
        target[name].Clear()  # a parameter with no value


def fuzz_tensor(rng: random.Random, raw_contents: list):
    name = rng.choice(["text_input"] * 6 + ["", "x", "text_output", "TEXT_INPUT"])
    datatype = rng.choice(["BYTES"] * 6 + ["FP32", "INT64", "", "bytes", "BOOL"])
    count = rng.choice([0, 1, 1, 1, 2, 3, 70])
    shape = ([count] if rng.random() < 0.6 else
             rng.choice([[1, count], [], [-1], [count + 1], [2**62, 4], [0],
                         [count, 0, 2**63 - 1]]))
    t = pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    elements = [rng.choice(BYTES_VALUES) for _ in range(count)]
    for _ in range(rng.choice([0, 0, 1, 2])):
        fuzz_parameter(rng, t.parameters)
    how = rng.random()
    if how < 0.5:
        t.contents.bytes_contents.extend(elements)
    elif how < 0.75:
        raw_contents.append(length_prefixed(*elements) if rng.random() < 0.8
                            else rng.randbytes(rng.randrange(12)))
    else:
        field = rng.choice(["int_contents", "int64_contents", "fp32_contents", "bool_contents",
                            "uint64_contents", "fp64_contents"])
        getattr(t.contents, field).extend(
            [rng.choice([0, 1]) if field != "bool_contents" else True for _ in range(count)])
    return t


# Values a well-meaning client sends, so that near-valid requests reach the engine.
FAIR_PARAMS = {"temperature": [0.0, 0.7, 1.3], "top_k": [0, 1, 50], "top_p": [0.5, 1.0],
               "do_sample": [True, False], "seed": [1, 7], "n": [1, 2, 3],
               "repetition_penalty": [1.0, 1.3], "stop": ["\n", "zz"], "ignore_eos": [True],
               "min_tokens": [1], "presence_penalty": [0.5], "frequency_penalty": [-0.5]}


def fair_infer(rng: random.Random) -> pb.ModelInferRequest:
    """A request a client could mean: one text_input, shape right, UTF-8 prompts, a few
    sampling parameters; in contents or in raw_input_contents."""
    prompts = [rng.choice(["ROMEO:", "", "héllo wörld ✓ 日本", "JULIET: O Romeo"]).encode()
               for _ in range(rng.choice([1, 1, 2, 3]))]
    request = pb.ModelInferRequest(model_name=MODEL)
    t = request.inputs.add(name="text_input", datatype="BYTES", shape=[len(prompts)])
    if rng.random() < 0.5:
        t.contents.bytes_contents.extend(prompts)
    else:
        request.raw_input_contents.append(length_prefixed(*prompts))
    request.parameters["max_new_tokens"].int64_param = rng.choice([1, 2, 4])
    for name in rng.sample(sorted(FAIR_PARAMS), rng.choice([0, 1, 2, 3])):
        value = rng.choice(FAIR_PARAMS[name])
        target = (t if rng.random() < 0.3 else request).parameters[name]
        if isinstance(value, bool):
            target.bool_param = value
        elif isinstance(value, int):
            target.int64_param = value
        elif isinstance(value, float):
            target.MergeFromString(b"\x21" + struct.pack("<d", value))
        else:
            target.string_param = value
    return request


def fuzz_infer(rng: random.Random) -> pb.ModelInferRequest:
    if rng.random() < 0.4:
        request = fair_infer(rng)
        if rng.random() < 0.5:  # one hostile touch to a fair request
            if rng.random() < 0.5:
                fuzz_parameter(rng, rng.choice([request, request.inputs[0]]).parameters)
            else:
                request.inputs.append(fuzz_tensor(rng, request.raw_input_contents))
        return request
    raw: list = []
    request = pb.ModelInferRequest(
        model_name=rng.choice([MODEL] * 8 + ["", "nope", "日本", "a" * 1000]),
        id=rng.choice(["", "1", "x" * 500]),
        inputs=[fuzz_tensor(rng, raw) for _ in range(rng.choice([0, 1, 1, 1, 1, 2, 3]))])
    if raw and rng.random() < 0.9:
        request.raw_input_contents.extend(raw)
    if rng.random() < 0.9:  # keep most generations short: the fuzz is about inputs
        request.parameters["max_new_tokens"].int64_param = rng.choice([1, 2, 3])
    for _ in range(rng.choice([0, 1, 2, 4])):
        fuzz_parameter(rng, request.parameters)
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        request.outputs.add(name=rng.choice(["text_output", "logits", ""]))
    return request


def fuzz_other(rng: random.Random, method: str):
    message = getattr(pb, METHODS[method].input_type.name)()
    for field in message.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING and rng.random() < 0.9:
            setattr(message, field.name, rng.choice([MODEL, MODEL, "", "nope", "日本", "\x00"]))
    return message


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage: flips, cuts, insertions, invalid UTF-8 where a string was."""
    data = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(4)
        if op == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            del data[rng.randrange(len(data)):]
        elif op == 2:
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randrange(1, 6))
        else:
            at = data.find(b"ROMEO:")
            if at >= 0:
                data[at:at + 2] = b"\xc3\x28"  # an invalid two-byte sequence
    return bytes(data)


def fuzz_cases(seed: int, count: int):
    rng = random.Random(seed)
    names = sorted(METHODS)
    for _ in range(count):
        method = rng.choice(["ModelInfer"] * 5 + names)
        message = fuzz_infer(rng) if method == "ModelInfer" else fuzz_other(rng, method)
        data = message.SerializeToString()
        if rng.random() < 0.2:
            data = mutate(rng, data)
        yield method, data


FUZZ_CASES = 2000


def test_fuzz_every_method_never_answers_unknown_or_internal(rpc):
    """2,000 seeded requests over the 8 methods (ModelInfer most): tensors of any name,
    datatype, shape and contents, raw contents well and badly framed, parameters of all five
    kinds with extreme values, requests a client could mean (some with one hostile part),
    and 20% of all of them damaged byte by byte. Every answer must be OK
    or a status that blames the request; the server must keep serving. The model repository
    is off here, so the Repository methods are UNIMPLEMENTED and cannot unload the model."""
    t0 = time.monotonic()
    codes, by_method, faults = collections.Counter(), collections.Counter(), []
    for i, (method, data) in enumerate(fuzz_cases(seed=24, count=FUZZ_CASES)):
        code, details, _ = call_raw(rpc, method, data)
        codes[code.name] += 1
        by_method[method, code.name] += 1
        if code in SERVER_FAULTS or code == grpc.StatusCode.DEADLINE_EXCEEDED:
            faults.append((i, method, code.name, details, data[:200]))
    elapsed = time.monotonic() - t0
    print(f"\n{FUZZ_CASES} gRPC fuzz cases in {elapsed:.1f}s: {dict(codes)}\n"
          f"ModelInfer: { {c: n for (m, c), n in by_method.items() if m == 'ModelInfer'} }")
    assert not faults, faults[:5]
    # both kinds were exercised: requests that generate, and refusals
    assert by_method["ModelInfer", "OK"] > 100 and codes["INVALID_ARGUMENT"] > 300
    assert rpc.stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert rpc.stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert served(rpc)
    assert elapsed < 120  # bounded: about 10 s alone on 2 cores, more when they are shared
