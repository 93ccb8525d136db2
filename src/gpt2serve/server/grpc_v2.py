"""KServe's gRPC V2 server with what this server needs on top.

- One guard in front of every method (`RequestGuard`, an interceptor): the API key, checked
  by auth.py as REST's middleware does (UNAUTHENTICATED without it; ServerLive and
  ServerReady stay open, as the HTTP probes), and the request's protobuf parsed here, so a
  malformed message, or a `string` field that is not UTF-8, is INVALID_ARGUMENT (gRPC's own
  parsing answered UNKNOWN).
- ModelInfer reads the request itself (`infer_request`): `text_input` as BYTES in `contents`
  or in `raw_input_contents` (the binary tensor extension: elements each preceded by their
  length, 4 bytes little-endian; what KServe's and Triton's clients send by default), with
  its shape checked against the data, duplicate or unknown inputs and unknown requested
  outputs refused. Raw inputs get raw outputs back, as KServe's SDK and Triton do. The
  optional input `sampling_parameters` (BYTES, shape [1]: one JSON object, as Triton's vLLM
  backend takes it) carries what `InferParameter` cannot: `stop` lists, `stop_token_ids`,
  `logit_bias`.
- Parameters as plain Python values. KServe 0.21 hands request-level `InferParameter`s to the
  model as protobuf messages (so `max_new_tokens` arrived as `int64_param: 6` and was refused)
  and converts input-level ones without `double_param`/`uint64_param`, which its own proto
  lacks but the Open Inference Protocol's (and Triton's clients) send as fields 4 and 5: they
  came through as unknown fields and were dropped. Here every parameter is read against the
  protocol's full `InferParameter`; a NaN or infinite double is INVALID_ARGUMENT.
- Overload and shutdown (queue full, queue timeout, drain, grace over) are UNAVAILABLE, as
  their HTTP 503; the SDK answered INTERNAL.
- A model version, on the methods that take one (ModelInfer, ModelReady, ModelMetadata), is
  INVALID_ARGUMENT, as REST's 400 on every route.
- ServerLive is false once the engines' step thread has died, as `/v2/health/live`;
  ServerReady follows `/v2/health/ready` (the SDK's was always true).
- RepositoryModelLoad/Unload go to the repository (repository.py, as control.py's REST
  routes): UNIMPLEMENTED while the extension is off (the SDK's answered UNKNOWN,
  `'ModelNotReady' object has no attribute 'reason'`, once the model was gone). A model
  unloaded through them is NOT_FOUND until loaded again; a load or unload overruled by a
  call for the same model that came in while it waited is ABORTED (REST: 409). Triton's
  messages are read too (its clients send the name as field 2), and its RepositoryIndex,
  which KServe's proto lacks, answers as the REST index.

ModelServer builds its gRPC server itself; `install()` swaps in this module's before it
starts.
"""

from __future__ import annotations

import math
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_interceptor.exceptions import Aborted, NotFound, Unavailable, Unimplemented
from kserve import model_server as kserve_model_server
from kserve.errors import InvalidInput, ModelNotReady, ServerNotLive, ServerNotReady
from kserve.logging import logger as kserve_logger
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
from kserve.protocol.grpc.server import GRPCServer
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse
from kserve.utils.utils import to_headers

from ..sampling import MAX_INSTANCES, quoted
from .auth import MISSING_KEY, PUBLIC_RPCS, authorized
from .control import LOAD_BODY, UNLOAD_BODY, BadBody, check_fields
from .errors import NO_VERSIONS, NOT_FOUND, UNAVAILABLE
from .health import server_metadata
from .predictor import V2_INPUT, V2_INPUTS, V2_OUTPUT, V2_PARAMETERS, check_count
from .repository import Overruled, Repository, RepositoryOff
from .v2_infer import (MAX_DIMS, check_bool, check_output_parameters, shape_text,
                       split_length_prefixed)


def _wire_messages():
    """The messages this server reads and writes that kserve's generated stubs lack, built at
    run time so as not to ship a second copy of generated code: the Open Inference Protocol's
    InferParameter (all five kinds), and Triton's repository messages, whose clients send a
    load's or unload's model_name as field 2 (KServe's proto has it as field 1, where Triton
    has repository_name) and which have an index (KServe's proto has none)."""
    F = descriptor_pb2.FieldDescriptorProto
    package = "gpt2serve.wire"
    file = descriptor_pb2.FileDescriptorProto(name="gpt2serve/wire.proto", package=package,
                                              syntax="proto3")

    def message(name, fields, within=None):
        """`fields`: (name, type or message name, repeated), numbered from 1."""
        m = (within.nested_type if within is not None else file.message_type).add(name=name)
        for number, (field, kind, repeated) in enumerate(fields, start=1):
            f = m.field.add(name=field, number=number, label=F.LABEL_REPEATED if repeated
                            else F.LABEL_OPTIONAL)
            if isinstance(kind, str):
                f.type, f.type_name = F.TYPE_MESSAGE, f".{package}.{kind}"
            else:
                f.type = kind
        return m

    def choice(name, kinds):
        m = message(name, [(kind, type_, False) for kind, type_ in kinds])
        m.oneof_decl.add(name="parameter_choice")
        for f in m.field:
            f.oneof_index = 0

    choice("InferParameter", [("bool_param", F.TYPE_BOOL), ("int64_param", F.TYPE_INT64),
                              ("string_param", F.TYPE_STRING), ("double_param", F.TYPE_DOUBLE),
                              ("uint64_param", F.TYPE_UINT64)])
    choice("ModelRepositoryParameter", [("bool_param", F.TYPE_BOOL),
                                        ("int64_param", F.TYPE_INT64),
                                        ("string_param", F.TYPE_STRING),
                                        ("bytes_param", F.TYPE_BYTES)])
    request = message("RepositoryModelRequest", [  # Triton's Load and Unload requests
        ("repository_name", F.TYPE_STRING, False), ("model_name", F.TYPE_STRING, False),
        ("parameters", "RepositoryModelRequest.ParametersEntry", True)])
    entry = message("ParametersEntry", [("key", F.TYPE_STRING, False),
                                        ("value", "ModelRepositoryParameter", False)], request)
    entry.options.map_entry = True
    message("RepositoryIndexRequest", [("repository_name", F.TYPE_STRING, False),
                                       ("ready", F.TYPE_BOOL, False)])
    index = message("RepositoryIndexResponse", [
        ("models", "RepositoryIndexResponse.ModelIndex", True)])
    message("ModelIndex", [(field, F.TYPE_STRING, False)
                           for field in ("name", "version", "state", "reason")], index)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {m.name: message_factory.GetMessageClass(pool.FindMessageTypeByName(
        f"{package}.{m.name}")) for m in file.message_type}


WIRE = _wire_messages()
OIPParameter = WIRE["InferParameter"]


def chosen(parameter):
    """A parameter message's value: its oneof's field set, or None where none is."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def plain_parameters(parameters) -> dict:
    """A map of InferParameters -> {name: bool | int | str | float}; an empty one -> {}."""
    out = {}
    for name, parameter in parameters.items():
        value = chosen(OIPParameter.FromString(parameter.SerializeToString()))
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"parameter '{name}' must be a finite number, got {value}")
        out[name] = value
    return out


_CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                   "uint64_contents", "fp32_contents", "fp64_contents")


def infer_request(request: pb.ModelInferRequest, max_instances: int) -> InferRequest:
    """The InferRequest the predictor takes, from a ModelInferRequest checked here: the
    input `text_input` (and `sampling_parameters`, of one element), BYTES, its elements in
    `contents` or `raw_input_contents`, as many as its shape says, at most `max_instances`.
    The shape is checked before any element is read: a 1 MiB request of 524,000 empty
    elements took 0.14 s of the event loop to be refused (0.015 s now, on a 2-vCPU AMD
    EPYC VM)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents; "
                           "give one raw content per input, or none")
    seen, inputs = set(), []
    for k, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in seen:
            raise InvalidInput(f"input '{name}' is given twice")
        seen.add(name)
        if name not in (V2_INPUT, V2_PARAMETERS):
            raise InvalidInput(f"unknown input '{name[:40]}': {V2_INPUTS}")
        if tensor.datatype != "BYTES":
            raise InvalidInput(f"input '{name}' must have datatype BYTES")
        shape = list(tensor.shape)
        if len(shape) > MAX_DIMS:  # (the product of 100,000 of them took seconds)
            raise InvalidInput(f"input '{name}' has {len(shape)} dimensions; at most "
                               f"{MAX_DIMS}")
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input '{name}' has a negative dimension in shape "
                               f"{shape_text(shape)}")
        count = math.prod(shape)
        if name == V2_PARAMETERS and shape != [1]:
            raise InvalidInput(f"input '{name}' must have shape [1]: one JSON object")
        check_count(count, f"input '{name}'", max_instances)
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInput(f"input '{name}' has both contents and raw_input_contents")
            data = split_length_prefixed(raw[k], count, f"raw contents of input '{name}'")
        else:
            other = [f for f in _CONTENT_FIELDS if len(getattr(tensor.contents, f))]
            if other:
                raise InvalidInput(f"input '{name}' must hold its strings in "
                                   f"bytes_contents, not {other[0]}")
            data = tensor.contents.bytes_contents  # (protobuf's: counted without a copy)
        if count != len(data):
            raise InvalidInput(f"input '{name}' has shape {shape_text(shape)} ({count} "
                               f"elements) but {len(data)} elements of data")
        inputs.append(InferInput(name, shape, "BYTES", data=list(data),
                                 parameters=plain_parameters(tensor.parameters) or None))
    for i, output in enumerate(request.outputs):
        if output.name != V2_OUTPUT:
            raise InvalidInput(f"unknown requested output '{output.name[:40]}': this model "
                               f"gives '{V2_OUTPUT}'")
        if i:  # (as REST's route)
            raise InvalidInput(f"output '{V2_OUTPUT}' is asked for more than once")
        # (as REST's route: an unknown parameter, or binary_data not a bool, was ignored)
        check_output_parameters(plain_parameters(output.parameters), f"outputs[{i}].parameters")
    parameters = plain_parameters(request.parameters)
    # REST's binary extension only: over gRPC raw outputs follow raw inputs (raw_outputs)
    check_bool(parameters, "binary_data_output", "parameters")
    parameters.pop("binary_data_output", None)
    return InferRequest(request.model_name, inputs, request_id=request.id or None,
                        parameters=parameters)


def raw_outputs(response: pb.ModelInferResponse) -> pb.ModelInferResponse:
    """The same response with each BYTES output in raw_output_contents, length-prefixed."""
    for output in response.outputs:
        elements = output.contents.bytes_contents
        response.raw_output_contents.append(
            b"".join(len(e).to_bytes(4, "little") + e for e in elements))
        output.ClearField("contents")
    return response


class GPT2Servicer(InferenceServicer):
    models: Repository  # set by GPT2GRPCServer
    max_instances: int

    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        self._named(request.model_name, request.model_version)
        infer = infer_request(request, self.max_instances)
        try:
            response, _ = await self._data_plane.infer(
                request=infer, headers=to_headers(context), model_name=request.model_name)
        except UNAVAILABLE as e:
            raise Unavailable(str(e)) from None  # the SDK's interceptor makes it the status
        except NOT_FOUND as e:
            raise NotFound(str(e)) from None
        if isinstance(response, InferResponse):
            response = response.to_grpc()
            return raw_outputs(response) if request.raw_input_contents else response
        return response

    async def ModelReady(self, request: pb.ModelReadyRequest, context) -> pb.ModelReadyResponse:
        self._named(request.name, request.version)
        return await super().ModelReady(request, context)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context) -> pb.ModelMetadataResponse:
        self._named(request.name, request.version)
        return await super().ModelMetadata(request, context)

    def _named(self, name: str, version: str) -> None:
        """A version is refused on every method that takes one, as REST refuses it on every
        route (ModelReady and ModelMetadata answered for the model, whatever version was
        named); a model unloaded through the API is NOT_FOUND saying so and how to load it
        again (KServe's lookups say it does not exist)."""
        if version:
            raise InvalidInput(NO_VERSIONS)
        try:
            self.models.refuse_absent(name)
        except NOT_FOUND as e:
            raise NotFound(str(e)) from None

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(**server_metadata(self.models))

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.models.alive)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        """As `/v2/health/ready` (the SDK's was always true): false while draining, once the
        step thread has died, or while no model is servable."""
        return pb.ServerReadyResponse(ready=self.models.ready)

    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        name = await self._repository(self.models.load, request, LOAD_BODY)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        name = await self._repository(self.models.unload, request, UNLOAD_BODY)
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)

    async def RepositoryIndex(self, request, context):
        """Triton's (KServe's proto has none), as `POST /v2/repository/index`."""
        self._repository_on(request.repository_name)
        Index = WIRE["RepositoryIndexResponse"]
        return Index(models=[Index.ModelIndex(**model) for model in self.models.index()
                             if not request.ready or model["state"] == "READY"])

    async def _repository(self, action, request, fields: dict) -> str:
        """`action` on the model a load or unload request names, in KServe's message (its
        model_name alone, as field 1) or in Triton's (model_name as field 2; its parameters
        checked as REST's body is); the name."""
        try:  # (the guard parsed KServe's message, whose field 1 alone it checks)
            triton = WIRE["RepositoryModelRequest"].FromString(request.SerializeToString())
        except DecodeError:  # Triton's fields 2 and 3 garbled, or a string not UTF-8
            raise InvalidInput(malformed(type(request).__name__.removesuffix("Request"))
                               ) from None
        is_triton = bool(triton.model_name or triton.parameters)
        self._repository_on(triton.repository_name if is_triton else "")
        name = request.model_name
        if is_triton:
            name = triton.model_name
            try:
                check_fields({"parameters": {key: chosen(p) for key, p in
                                             triton.parameters.items()}}, fields)
            except BadBody as e:
                raise InvalidInput(str(e)) from None
        try:
            await action(name)
        except UNAVAILABLE as e:
            raise Unavailable(str(e)) from None
        except Overruled as e:
            raise Aborted(str(e)) from None
        return name

    def _repository_on(self, repository_name: str = "") -> None:
        if not self.models.enabled:
            raise Unimplemented(str(RepositoryOff()))
        if repository_name:
            raise InvalidInput(f"repository_name {quoted(repository_name, 40)}: this server "
                               "has one repository; leave repository_name empty")


class ExceptionToStatus(ExceptionToStatusInterceptor):
    """The SDK's mapping of exceptions to status codes, without its AttributeError on the
    exceptions that have no `reason` (ModelNotReady, ServerNotReady, ServerNotLive), and
    with details bounded (_BoundedDetails)."""

    async def handle_exception(self, ex, request_or_iterator, context, method_name):
        context = _BoundedDetails(context)
        if isinstance(ex, (ModelNotReady, ServerNotReady, ServerNotLive)):
            kserve_logger.info("unavailable: %s, grpc_method: %s", ex, method_name)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(ex))
        if isinstance(ex, NotImplementedError):
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(ex) or "not implemented")
        await super().handle_exception(ex, request_or_iterator, context, method_name)


# A status's details travel in a header, percent-encoded, under gRPC's 8 KiB soft limit on
# metadata: a client's name repeated in full (a model name of 20,000 characters, 3,000 snowmen)
# lost the status to RESOURCE_EXHAUSTED ('received metadata size exceeds hard limit').
MAX_DETAILS = 1024  # bytes of UTF-8, at most 3 KiB encoded


class _BoundedDetails:
    """A servicer context whose `abort` cuts the details to MAX_DETAILS."""

    def __init__(self, context):
        self._context = context

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def abort(self, code, details: str = "", trailing_metadata=()):
        raw = details.encode()
        if len(raw) > MAX_DETAILS:
            details = raw[:MAX_DETAILS].decode(errors="ignore") + "..."
        await self._context.abort(code, details, trailing_metadata)


class RequestGuard(aio.ServerInterceptor):
    """Outermost on every method: the API key, then the request's parsing."""

    def __init__(self, api_key: str | None):
        self.api_key = api_key

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not handler.unary_unary:  # unknown method: UNIMPLEMENTED
            return handler
        if self.api_key and details.method not in PUBLIC_RPCS:
            given = [v for k, v in (details.invocation_metadata or ())
                     if k == "authorization"]
            if not (len(given) == 1 and authorized(given[0], self.api_key)):
                return grpc.unary_unary_rpc_method_handler(_unauthenticated)
        return grpc.unary_unary_rpc_method_handler(
            _parsed(handler.unary_unary, handler.request_deserializer, details.method),
            response_serializer=handler.response_serializer)


async def _unauthenticated(raw, context):
    del raw  # (the abort's cycle would hold it: see parse_then_call)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY)


def malformed(method: str) -> str:
    """What a request to `method` that protobuf cannot parse is told."""
    return (f"malformed {method} request: not a valid protobuf message (string fields must "
            "be UTF-8)")


def _parsed(behaviour, deserialize, method: str):
    async def parse_then_call(raw: bytes, context):
        try:
            request = deserialize(raw) if deserialize else raw
        except DecodeError:  # a truncated or garbled message, a string that is not UTF-8
            request = None
        if request is None:  # (aborted outside the except: its context would hold the bytes)
            raw = None  # (and so would this frame, in the abort's cycle: see below)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                malformed(method.rsplit("/", 1)[-1]))
        try:
            return await behaviour(request, context)
        except aio.AbortError as e:
            # grpc keeps the abort (the status of a refusal) with the call's state, which
            # the frames it went through reach (their `context`), and those frames, and those
            # of the error it was raised while handling, hold the request: a cycle that only a
            # full collection of the cyclic garbage frees, which a process of torch's size
            # runs rarely. 50 refused requests of 524,000 empty strings (1 MiB each) grew RSS
            # by about 300 MB, for good. The abort goes on without them.
            request = raw = None
            e.__context__ = None
            raise e.with_traceback(None)

    return parse_then_call


class GPT2GRPCServer(GRPCServer):
    """KServe's GRPCServer, started with our servicer and interceptors, the same bound on a
    request's size as REST's (--max_body_bytes; RESOURCE_EXHAUSTED beyond it), none on a
    response's, and `streams()` calls open at once on a connection."""

    api_key: str | None = None
    models: Repository | None = None
    max_receive: int  # (install sets it: --max_body_bytes)
    max_instances = MAX_INSTANCES

    def streams(self) -> int:
        """Calls a connection may have open at once. gRPC's default has no bound: a client
        held 2,000 on a connection, each with part of a request. Past the bound the server
        refuses a call (RST_STREAM, UNAVAILABLE to the client), and grpcio's client (1.85,
        on a connection already in use) sent past it: with 128, 154 of 300 calls at once
        were refused that the queue (--max_queue 256) would have taken. So: twice what the
        models' queues and batches take, and at least 1024. Each model has its own queue:
        a repository's bound counts the models it holds at start (one added later is not)."""
        config, models = self.models.config, max(1, len(self.models.entries))
        return min(2**31 - 1,
                   max(1024, 2 * models * (config.max_queue + config.max_batch_size)))

    async def start(self, max_workers):
        servicer = GPT2Servicer(self._data_plane, self._model_repository_extension)
        servicer.models, servicer.max_instances = self.models, self.max_instances
        streams = self.streams()
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(RequestGuard(self.api_key), LoggingInterceptor(),
                          ExceptionToStatus()),
            options=[
                # No bound on a response: what it may hold is bounded by the request's limits
                # (--max_instances, --max_n, the context), and past KServe's 8 MiB an answer
                # was generated whole, then lost (RESOURCE_EXHAUSTED).
                ("grpc.max_send_message_length", -1),
                ("grpc.max_receive_message_length", self.max_receive),
                ("grpc.max_concurrent_streams", streams),
                # gRPC's core (1.85) cancels calls at random (CANCELLED, before any handler
                # sees them) once more than 1,000 have arrived that the server has not yet
                # taken up, all of them at once past 3,000: 1,100 calls opened at once on a
                # loaded machine lost one or two. The models' queues refuse what they
                # cannot hold (UNAVAILABLE); the backlog holds as many calls as a connection.
                ("grpc.server.max_pending_requests", streams),
                ("grpc.server.max_pending_requests_hard_limit",
                 min(2**31 - 1, 3 * streams)),
            ],
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        index = grpc.unary_unary_rpc_method_handler(
            servicer.RepositoryIndex,
            request_deserializer=WIRE["RepositoryIndexRequest"].FromString,
            response_serializer=WIRE["RepositoryIndexResponse"].SerializeToString)
        self._server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"RepositoryIndex": index})])
        self._server.add_insecure_port(f"[::]:{self._port}")
        kserve_logger.info("Starting gRPC server on [::]:%d", self._port)
        await self._server.start()
        await self._server.wait_for_termination()


def install(models: Repository, api_key: str | None, max_receive: int,
            max_instances: int = MAX_INSTANCES) -> None:
    GPT2GRPCServer.api_key, GPT2GRPCServer.models = api_key, models
    GPT2GRPCServer.max_receive, GPT2GRPCServer.max_instances = max_receive, max_instances
    kserve_model_server.GRPCServer = GPT2GRPCServer
