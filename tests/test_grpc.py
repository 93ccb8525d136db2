"""KServe V2 over gRPC against the real server process, with kserve's generated stubs: BYTES in
and out, parameters of every kind, errors as status codes, overload, cancellation."""

import json
import re
import struct
import time

import grpc
import pytest
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

from conftest import free_port, metric, post, running_server

MODEL = "aitextgen"


def grpc_server(model_dir, *args):
    port = free_port()
    srv = running_server("--model_dir", str(model_dir), "--enable_grpc", "true",
                         "--grpc_port", str(port), *args)
    return srv, port


@pytest.fixture(scope="module")
def rpc(tiny_model):
    cm, port = grpc_server(tiny_model, "--max_batch_size", "8")
    with cm as srv, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        srv.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        yield srv


# The Open Inference Protocol's InferParameter has double_param (4) and uint64_param (5), as
# Triton's clients send them; kserve 0.21's stubs lack both, so they are written as raw wire
# bytes here: field 4 as a little-endian double, field 5 as a varint.
def double_param(value: float) -> bytes:
    return b"\x21" + struct.pack("<d", value)


def uint64_param(value: int) -> bytes:
    assert value < 128  # one varint byte
    return b"\x28" + bytes([value])


def set_params(target, params: dict) -> None:
    for name, value in params.items():
        if isinstance(value, bytes):
            target[name].MergeFromString(value)
        elif isinstance(value, bool):
            target[name].bool_param = value
        elif isinstance(value, int):
            target[name].int64_param = value
        else:
            target[name].string_param = value


def infer_request(prompts, model=MODEL, params=None, input_params=None, datatype="BYTES",
                  name="text_input"):
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=[len(prompts)],
        contents=pb.InferTensorContents(bytes_contents=[p.encode() for p in prompts]))
    set_params(tensor.parameters, input_params or {})
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor])
    set_params(request.parameters, params or {})
    return request


def texts(response) -> list[str]:
    out = response.outputs[0]
    assert out.name == "text_output" and out.datatype == "BYTES"
    assert list(out.shape) == [len(out.contents.bytes_contents)]
    return [b.decode() for b in out.contents.bytes_contents]


def rest_texts(srv, prompts, params) -> list[str]:
    body = {"inputs": [{"name": "text_input", "shape": [len(prompts)], "datatype": "BYTES",
                        "data": prompts}], "parameters": params}
    r = post(f"{srv.url}/v2/models/{MODEL}/infer", body)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def test_parameters_of_every_kind_mean_what_they_mean_over_rest(rpc):
    """Each kind of InferParameter reaches sampling as a plain value: the text is the one REST
    gives for the same JSON parameters."""
    params = {"seed": 7, "max_new_tokens": uint64_param(9), "temperature": double_param(1.3),
              "top_p": double_param(0.9), "do_sample": True, "stop": "zzz"}
    got = texts(rpc.stub.ModelInfer(infer_request(["ROMEO:", "JULIET:"], params=params),
                                    timeout=60))
    want = rest_texts(rpc, ["ROMEO:", "JULIET:"],
                      {"seed": 7, "max_new_tokens": 9, "temperature": 1.3, "top_p": 0.9,
                       "do_sample": True, "stop": "zzz"})
    assert got == want
    assert got[0].startswith("ROMEO:") and got[1].startswith("JULIET:")
    # and the values matter: another temperature, another text
    params["temperature"] = double_param(0.2)
    assert texts(rpc.stub.ModelInfer(infer_request(["ROMEO:", "JULIET:"], params=params),
                                     timeout=60)) != got


def test_numbers_and_truth_values_may_come_as_strings(rpc):
    """KServe's gRPC client sends a parameter only as a string, a bool or an integer (its
    `to_grpc_parameters` refuses 0.5), and Triton's vLLM backend reads numbers from strings:
    "1.3" means 1.3 on the KServe routes, in `parameters` and in `sampling_parameters`, over
    gRPC and REST alike, while a string that spells no number is still refused by name."""
    numbers = {"seed": 7, "max_new_tokens": 9, "temperature": 1.3, "top_p": 0.9,
               "do_sample": True, "num_return_sequences": 1}
    strings = {"seed": "7", "max_new_tokens": "9", "temperature": "1.3", "top_p": " 9e-1",
               "do_sample": "True", "num_return_sequences": "1"}
    want = rest_texts(rpc, ["ROMEO:", "JULIET:"], numbers)
    assert texts(rpc.stub.ModelInfer(infer_request(["ROMEO:", "JULIET:"], params=strings),
                                     timeout=60)) == want
    request = infer_request(["ROMEO:", "JULIET:"])
    request.inputs.append(sampling_input(strings))
    assert texts(rpc.stub.ModelInfer(request, timeout=60)) == want
    assert rest_texts(rpc, ["ROMEO:", "JULIET:"], strings) == want
    r = post(f"{rpc.url}/v2/models/{MODEL}/generate",
             {"text_input": "ROMEO:", "parameters": strings})
    assert r.status_code == 200 and r.json()["text_output"] == want[0], r.text
    # the strings' values matter: greedy is another text, and "0" new tokens is refused
    greedy = texts(rpc.stub.ModelInfer(infer_request(
        ["ROMEO:", "JULIET:"], params={**strings, "do_sample": "false"}), timeout=60))
    assert greedy == rest_texts(rpc, ["ROMEO:", "JULIET:"], {**numbers, "do_sample": False})
    assert greedy != want
    for bad, message in [({"max_new_tokens": "0"}, "'max_new_tokens' must be at least 1"),
                         ({"do_sample": "yes"}, "'do_sample' must be true or false"),
                         ({"n": "2.5"}, "'n' must be an integer"),
                         ({"top_k": "0x10"}, "'top_k' must be an integer, got \"0x10\"")]:
        with pytest.raises(grpc.RpcError) as e:
            rpc.stub.ModelInfer(infer_request(["ROMEO:"], params=bad), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in e.value.details(), e.value.details()
    # the OpenAI route keeps JSON's types, as OpenAI's does
    r = post(f"{rpc.url}/openai/v1/completions", {"model": MODEL, "prompt": "a",
                                                   "temperature": "1.3"})
    assert r.status_code == 400 and "'temperature' must be a number" in r.text, r.text


def test_input_level_parameters_override_request_level_ones(rpc):
    request = infer_request(["ROMEO:"], params={"seed": 3, "max_new_tokens": 40},
                            input_params={"max_new_tokens": 2, "do_sample": False,
                                          "content_type": "str"})
    short = texts(rpc.stub.ModelInfer(request, timeout=60))[0]
    assert short == rest_texts(rpc, ["ROMEO:"], {"max_new_tokens": 2, "do_sample": False})[0]


def sampling_input(fields: dict) -> pb.ModelInferRequest.InferInputTensor:
    return pb.ModelInferRequest.InferInputTensor(
        name="sampling_parameters", datatype="BYTES", shape=[1],
        contents=pb.InferTensorContents(bytes_contents=[json.dumps(fields).encode()]))


def test_list_and_object_parameters_travel_in_the_sampling_parameters_input(rpc):
    """InferParameter has no list or object type, so `stop` lists, `stop_token_ids` and
    `logit_bias` could not be sent over gRPC. They come in the input `sampling_parameters`,
    one JSON object, as Triton's vLLM backend takes them: the text is REST's for the same
    JSON parameters, in `contents` and in raw contents alike."""
    greedy = {"max_new_tokens": 8, "do_sample": False, "ignore_eos": True}
    plain = rest_texts(rpc, ["ROMEO:"], greedy)[0]
    continuation = plain[len("ROMEO:"):]
    assert len(continuation) >= 3, plain
    first = post(f"{rpc.url}/tokenize", {"prompt": continuation}).json()["tokens"][0]
    other = (first + 1) % 256  # (a byte's token, not the one greedy picks)
    for fields, differs in [
            ({**greedy, "logit_bias": {str(other): 100}}, lambda text: text != plain),
            ({**greedy, "stop": ["never", continuation[1:3]], "stop_token_ids": [other]},
             lambda text: plain.startswith(text) and len(text) < len(plain))]:
        want = rest_texts(rpc, ["ROMEO:"], fields)[0]
        assert differs(want), (fields, want, plain)  # the parameters were applied
        request = infer_request(["ROMEO:"])
        request.inputs.append(sampling_input(fields))
        assert texts(rpc.stub.ModelInfer(request, timeout=60)) == [want]
        for tensor in request.inputs:  # the binary tensor extension, as clients send it
            element = tensor.contents.bytes_contents[0]
            request.raw_input_contents.append(struct.pack("<I", len(element)) + element)
            tensor.ClearField("contents")
        raw = rpc.stub.ModelInfer(request, timeout=60).raw_output_contents[0]
        assert raw[4:].decode() == want and struct.unpack("<I", raw[:4])[0] == len(raw) - 4


@pytest.mark.parametrize("request_args,code,message", [
    (dict(params={"temperature": "hot"}), grpc.StatusCode.INVALID_ARGUMENT,
     "'temperature' must be a number"),
    (dict(params={"max_new_tokens": double_param(2.5)}), grpc.StatusCode.INVALID_ARGUMENT,
     "'max_new_tokens' must be an integer"),
    (dict(params={"tempreature": double_param(1.0)}), grpc.StatusCode.INVALID_ARGUMENT,
     "unknown parameter 'tempreature'"),
    (dict(input_params={"n": 1000}), grpc.StatusCode.INVALID_ARGUMENT, "'n' must be in"),
    (dict(name="prompt"), grpc.StatusCode.INVALID_ARGUMENT, "needs a BYTES input"),
    (dict(datatype="FP32"), grpc.StatusCode.INVALID_ARGUMENT, "datatype BYTES"),
    (dict(model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
])
def test_errors_are_grpc_status_codes(rpc, request_args, code, message):
    with pytest.raises(grpc.RpcError) as e:
        rpc.stub.ModelInfer(infer_request(["ROMEO:"], **request_args), timeout=60)
    assert e.value.code() == code, e.value.details()
    assert re.search(message, e.value.details())
    assert texts(rpc.stub.ModelInfer(infer_request(["a"], params={"max_new_tokens": 2}),
                                     timeout=60))  # and the server keeps serving


def test_health_rpcs(rpc):
    assert rpc.stub.ServerLive(pb.ServerLiveRequest()).live
    assert rpc.stub.ServerReady(pb.ServerReadyRequest()).ready
    assert rpc.stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready


# ---- overload and cancellation -----------------------------------------------------------

@pytest.fixture(scope="module")
def one_slot_rpc(long_model):
    cm, port = grpc_server(long_model, "--max_batch_size", "1", "--max_queue", "0")
    with cm as srv, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        srv.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        yield srv


LONG = {"max_new_tokens": 900, "ignore_eos": True}




def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_overload_is_unavailable_and_cancelling_frees_the_slot(one_slot_rpc):
    srv = one_slot_rpc
    aborted = metric(srv, "gpt2serve_aborted_sequences_total")
    busy = srv.stub.ModelInfer.future(infer_request(["a"], params=LONG), timeout=120)
    assert wait_for(lambda: metric(srv, "gpt2serve_running_sequences") == 1)
    with pytest.raises(grpc.RpcError) as e:
        srv.stub.ModelInfer(infer_request(["b"], params={"max_new_tokens": 2}), timeout=60)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "queue is full" in e.value.details()

    busy.cancel()  # the client gives up: the engine drops the sequence at its next step
    assert busy.cancelled()
    assert wait_for(lambda: metric(srv, "gpt2serve_running_sequences") == 0)
    assert wait_for(lambda: metric(srv, "gpt2serve_aborted_sequences_total") == aborted + 1)
    assert texts(srv.stub.ModelInfer(infer_request(["b"], params={"max_new_tokens": 2}),
                                     timeout=60))


def test_deadline_exceeded_frees_the_slot(one_slot_rpc):
    srv = one_slot_rpc
    aborted = metric(srv, "gpt2serve_aborted_sequences_total")
    with pytest.raises(grpc.RpcError) as e:
        # (900 tokens have finished inside 0.5 s on this machine: the deadline is well inside)
        srv.stub.ModelInfer(infer_request(["a"], params=LONG), timeout=0.15)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: metric(srv, "gpt2serve_aborted_sequences_total") == aborted + 1)
    assert metric(srv, "gpt2serve_running_sequences") == 0
