"""KServe's gRPC V2 servicer with what this server needs on top.

- Parameters as plain Python values. KServe 0.21 hands request-level `InferParameter`s to the
  model as protobuf messages (so `max_new_tokens` arrived as `int64_param: 6` and was refused)
  and converts input-level ones without `double_param`/`uint64_param`, which its own proto
  lacks but the Open Inference Protocol's (and Triton's clients) send as fields 4 and 5: they
  came through as unknown fields and were dropped. Here every parameter is read against the
  protocol's full `InferParameter`.
- Overload and shutdown (queue full, queue timeout, drain, grace over) are UNAVAILABLE, as
  their HTTP 503; the SDK answered INTERNAL.
- ServerLive is false once a model's engine has lost its step thread, as `/v2/health/live`.

ModelServer builds its servicer itself; `install()` swaps in this subclass before it starts.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_interceptor.exceptions import Unavailable
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import server as kserve_grpc_server
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse
from kserve.utils.utils import to_headers

from .errors import UNAVAILABLE


def _oip_parameter_class():
    """The Open Inference Protocol's InferParameter (all five kinds), built at run time so as
    not to ship a second copy of generated code."""
    F = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="gpt2serve/oip_parameter.proto",
                                              package="gpt2serve.oip", syntax="proto3")
    message = file.message_type.add(name="InferParameter")
    message.oneof_decl.add(name="parameter_choice")
    kinds = [("bool_param", F.TYPE_BOOL), ("int64_param", F.TYPE_INT64),
             ("string_param", F.TYPE_STRING), ("double_param", F.TYPE_DOUBLE),
             ("uint64_param", F.TYPE_UINT64)]
    for number, (name, kind) in enumerate(kinds, start=1):
        message.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL,
                          oneof_index=0)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(
        "gpt2serve.oip.InferParameter"))


OIPParameter = _oip_parameter_class()


def plain_parameters(parameters) -> dict:
    """A map of InferParameters -> {name: bool | int | str | float}; an empty one -> None."""
    out = {}
    for name, parameter in parameters.items():
        full = OIPParameter.FromString(parameter.SerializeToString())
        kind = full.WhichOneof("parameter_choice")
        out[name] = getattr(full, kind) if kind else None
    return out


class GPT2Servicer(InferenceServicer):
    async def ModelInfer(self, request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        self.validate_grpc_request(request)
        infer_request = InferRequest.from_grpc(request)
        infer_request.parameters = plain_parameters(request.parameters)
        for tensor, raw in zip(infer_request.inputs, request.inputs):
            tensor.parameters = plain_parameters(raw.parameters) or None
        try:
            response, _ = await self._data_plane.infer(
                request=infer_request, headers=to_headers(context),
                model_name=request.model_name)
        except UNAVAILABLE as e:
            raise Unavailable(str(e)) from None  # the SDK's interceptor makes it the status
        if isinstance(response, InferResponse):
            return response.to_grpc()
        return response

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        models = self._data_plane.model_registry.get_models().values()
        return pb.ServerLiveResponse(live=all(getattr(m, "alive", True) for m in models))


def install() -> None:
    kserve_grpc_server.InferenceServicer = GPT2Servicer
