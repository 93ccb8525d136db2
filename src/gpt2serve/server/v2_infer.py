"""`POST /v2/models/<name>/infer` over REST: the Open Inference Protocol's request, read and
checked here, then handed to the predictor as KServe's own route would.

KServe's route reads the body into a pydantic model whose parameters may only be numbers,
booleans and strings: the README's list and object parameters (`stop: [...]`,
`logit_bias: {...}`, `stop_token_ids: [...]`) were refused with a 422 and a pydantic dump, and
so was every malformed body. It also took a `shape` that did not match the data, let a
duplicate input silently win and ignored unknown requested outputs. This route is registered
before KServe's (ours win where paths meet) and answers all of that with a 400 naming the
field:

- the body is an object of `id` and `model_name` (strings; the path names the model; KServe's
  client sends `model_name`), `parameters` (object: the sampling parameters,
  whose values may be strings, numbers, booleans, lists and objects), `inputs`, `outputs`;
- `inputs` holds `text_input`, datatype `BYTES`, `shape` a list of non-negative integers
  whose product is the number of strings in `data` (flat, or nested as the shape says), its
  own `parameters` over the request's; and, optionally, `sampling_parameters` (BYTES, shape
  [1]: the request's parameters as one JSON object, as Triton's vLLM backend takes them);
- `outputs`, when given, may only ask for `text_output`, once;
- KServe's binary tensor extension (`Inference-Header-Content-Length`, each input's
  `binary_data_size`, 4-byte little-endian length-prefixed UTF-8 strings) is read too.
"""

from __future__ import annotations

import math
import struct
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from kserve.errors import InvalidInput, ModelNotReady
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput

from . import jsonbody
from .errors import refusals
from .predictor import (V2_INPUT, V2_INPUTS, V2_OUTPUT, V2_PARAMETERS, check_count,
                        json_object)
from .repository import Repository

_TENSOR = {"type": "object", "required": ["name", "shape", "datatype"],
           "additionalProperties": False, "properties": {
               "name": {"type": "string"},
               "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
               "datatype": {"type": "string"}, "parameters": {"type": ["object", "null"]},
               "data": {"type": "array"}}}
SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
        "id": {"type": ["string", "null"]}, "model_name": {"type": ["string", "null"]},
        "parameters": {"type": ["object", "null"]},
        "inputs": {"type": "array", "items": _TENSOR, "minItems": 1},
        "outputs": {"type": ["array", "null"], "items": {
            "type": "object", "required": ["name"], "additionalProperties": False,
            "properties": {"name": {"type": "string"},
                           "parameters": {"type": ["object", "null"]}}}}}}}}}}
MAX_DIMS = 8


def infer_router(repository: Repository) -> APIRouter:
    router = APIRouter(prefix="/v2/models/{model_name}", tags=["V2"])

    @router.post("/infer", response_model=None, openapi_extra=SCHEMA, responses={
        **refusals(), 200: {"content": {"application/octet-stream": {}}}})  # (binary outputs)
    async def infer(model_name: str, request: HTTPRequest) -> Response:
        repository.refuse_absent(model_name)
        repository.refuse_draining()
        predictor = repository.get_model(model_name)
        if not predictor.ready:
            raise ModelNotReady(model_name)
        headers = dict(request.headers)
        infer_request = read_request(await request.body(), headers, model_name,
                                     predictor.max_instances)
        response, _ = await predictor(infer_request, headers=headers)
        body, json_length = response.to_rest()
        if isinstance(body, bytes):  # an output asked for in KServe's binary extension
            return Response(body, media_type="application/octet-stream", headers={
                "inference-header-content-length": str(json_length)})
        return JSONResponse(body)

    return router


def read_request(raw: bytes, headers: dict, model_name: str,
                 max_instances: int) -> InferRequest:
    """The body as an InferRequest, or InvalidInput naming what is wrong; its shape is held to
    `max_instances` elements before they are read."""
    header = headers.get("inference-header-content-length")
    if header is not None:
        json_length = jsonbody.json_part_length(header)
        if json_length is None or json_length > len(raw):
            raise InvalidInput("'Inference-Header-Content-Length' must be the length of the "
                               "body's JSON part")
        json_part, binary = raw[:json_length], raw[json_length:]
    else:
        json_part, binary = raw, b""
    body = json_object(json_part)
    # KServe's own REST client also sends `model_name`; the path names the model.
    _only(body, {"id", "model_name", "parameters", "inputs", "outputs"}, "request body")
    for name in ("id", "model_name"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise InvalidInput(f"'{name}' must be a string")
    request_id = body.get("id")
    parameters = _parameters(body.get("parameters"), "parameters")
    check_bool(parameters, "binary_data_output", "parameters")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    names, tensors, used = [], [], 0
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise InvalidInput(f"inputs[{i}] must be an object with a string 'name'")
        if tensor["name"] in names:
            raise InvalidInput(f"inputs[{i}]: input '{tensor['name']}' is given more than once")
        if tensor["name"] not in (V2_INPUT, V2_PARAMETERS):
            raise InvalidInput(f"inputs[{i}]: unknown input '{tensor['name'][:40]}': "
                               f"{V2_INPUTS}")
        names.append(tensor["name"])
        parsed, size = _input(tensor, f"inputs[{i}]", binary[used:], max_instances)
        tensors.append(parsed)
        used += size
    if used != len(binary):
        raise InvalidInput(f"the binary data after the JSON part is {len(binary)} bytes, but "
                           f"the inputs' 'binary_data_size' add up to {used}")
    return InferRequest(model_name=model_name, infer_inputs=tensors, request_id=request_id,
                        parameters=parameters, request_outputs=_outputs(body.get("outputs")))


def _input(tensor: dict, where: str, binary: bytes,
           max_instances: int) -> tuple[InferInput, int]:
    """The input, and how many bytes of `binary` (the binary data after the JSON part, from
    this input's own on) it took."""
    name = tensor["name"]
    _only(tensor, {"name", "shape", "datatype", "parameters", "data"}, where)
    if tensor.get("datatype") != "BYTES":
        raise InvalidInput(f"{where}: input '{name}' must have datatype BYTES")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise InvalidInput(f"{where}: 'shape' must be a list of at most {MAX_DIMS} "
                           "non-negative integers")
    parameters = _parameters(tensor.get("parameters"), f"{where}.parameters")
    count = math.prod(shape)
    if name == V2_PARAMETERS and shape != [1]:
        raise InvalidInput(f"{where}: input '{name}' must have shape [1]: one JSON object")
    check_count(count, f"input '{name}'", max_instances)
    used, source = 0, "'data'"
    if "data" in tensor:
        if "binary_data_size" in parameters:
            raise InvalidInput(f"{where}: give 'data' or 'binary_data_size', not both")
        data = tensor["data"]
        if not isinstance(data, list):
            raise InvalidInput(f"{where}: 'data' must be a list of strings")
        flat = _flatten(data, shape, where, name)
    elif "binary_data_size" in parameters:
        used, source = parameters["binary_data_size"], "its binary data"
        if not isinstance(used, int) or isinstance(used, bool) or not 0 <= used <= len(binary):
            raise InvalidInput(f"{where}: 'binary_data_size' must be the length of this "
                               "input's binary data, after the JSON part")
        try:
            flat = [e.decode("utf-8") for e in split_length_prefixed(
                binary[:used], count, f"{where}: binary data")]
        except UnicodeDecodeError:
            raise InvalidInput(f"{where}: input '{name}' is not valid UTF-8") from None
    else:
        raise InvalidInput(f"{where}: 'data' is missing")
    if len(flat) != count:
        raise InvalidInput(f"{where}: 'shape' {shape_text(shape)} holds {count} elements but "
                           f"{source} has {len(flat)}")
    return InferInput(name, shape, "BYTES", data=flat, parameters=parameters or None), used


def _flatten(data: list, shape: list[int], where: str, name: str) -> list[str]:
    """The strings of `data`, flat or nested as `shape` says (the protocol allows both)."""
    if all(isinstance(item, str) for item in data):
        return data
    flat: list[str] = []
    stack = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= len(shape) or len(item) != shape[depth]:
                raise InvalidInput(f"{where}: 'data' is nested other than 'shape' "
                                   f"{shape_text(shape)}")
            stack.extend((child, depth + 1) for child in reversed(item))
        elif isinstance(item, str):
            if depth != len(shape):
                raise InvalidInput(f"{where}: 'data' is nested other than 'shape' "
                                   f"{shape_text(shape)}")
            flat.append(item)
        else:
            raise InvalidInput(f"{where}: input '{name}' must hold strings, "
                               f"got {jsonbody.kind(item)}")
    return flat


def shape_text(shape: list[int]) -> str:
    """A client's shape for a message, cut: 8 dimensions of 19 digits came back whole."""
    text = str(list(shape))
    return text if len(text) <= 60 else f"{text[:56]}...]"


def split_length_prefixed(raw: bytes, most: int, what: str) -> list[bytes]:
    """The protocol's BYTES serialization (REST's binary data, gRPC's raw contents): each
    element a uint32 (little-endian) length, then that many bytes; at most `most`, the
    shape's count, so that data past it is not split. `what` names the data in errors."""
    out, at = [], 0
    while at < len(raw):
        if len(out) == most:
            raise InvalidInput(f"{what} hold more elements than the shape's {most}")
        if at + 4 > len(raw):
            raise InvalidInput(f"{what} end inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise InvalidInput(f"{what}: an element of {size} bytes runs past the end "
                               f"({len(raw) - at} left)")
        out.append(raw[at:at + size])
        at += size
    return out


def _outputs(outputs: Any) -> list[RequestedOutput] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list")
    requested = []
    for i, output in enumerate(outputs):
        where = f"outputs[{i}]"
        if not isinstance(output, dict) or not isinstance(output.get("name"), str):
            raise InvalidInput(f"{where} must be an object with a string 'name'")
        _only(output, {"name", "parameters"}, where)
        if output["name"] != V2_OUTPUT:
            raise InvalidInput(f"{where}: unknown output '{output['name'][:40]}'; this model "
                               f"has one output, '{V2_OUTPUT}'")
        if requested:
            raise InvalidInput(f"{where}: output '{V2_OUTPUT}' is asked for more than once")
        parameters = _parameters(output.get("parameters"), f"{where}.parameters")
        check_output_parameters(parameters, f"{where}.parameters")
        requested.append(RequestedOutput(V2_OUTPUT, parameters))
    return requested


def check_output_parameters(parameters: dict, where: str) -> None:
    """A requested output's parameters, on either protocol: `binary_data` (REST's binary
    extension; over gRPC raw outputs follow raw inputs, and it is only checked), nothing else."""
    _only(parameters, {"binary_data"}, where)
    check_bool(parameters, "binary_data", where)


def _parameters(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"'{where}' must be an object")
    return value


def check_bool(parameters: dict, name: str, where: str) -> None:
    if name in parameters and not isinstance(parameters[name], bool):
        raise InvalidInput(f"{where}: '{name}' must be true or false")


def _only(obj: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(obj) - known)
    if unknown:
        raise InvalidInput(f"{where}: unknown field '{unknown[0][:40]}'")
