"""Wiring: load the model, build the engine, register the predictor and our routes on KServe's
ModelServer, and run it."""

from __future__ import annotations

import argparse
import logging
import time

from fastapi.responses import ORJSONResponse

from .. import checkpoint
from ..engine import Engine, EngineStopped, QueueFull, RequestTimeout

log = logging.getLogger("gpt2serve.server")


async def _unavailable(_request, exc: Exception) -> ORJSONResponse:
    """Overload and shutdown: 503 at once with Retry-After, so clients and Knative back off."""
    return ORJSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


def serve(args: argparse.Namespace) -> None:
    # kserve parses sys.argv when imported; import it only when serving.
    import kserve
    from kserve.model_server import app

    from .disconnect import CancelOnDisconnect
    from .openai import openai_router
    from .predictor import GPT2Predictor

    t0 = time.monotonic()
    device, dtype = checkpoint.resolve_device(args.device, args.dtype)
    model, tokenizer = checkpoint.load(args.model_dir, dtype=dtype, device=device,
                                       quantize=args.quantize)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size,
                    max_queue=args.max_queue, request_timeout=args.request_timeout)
    log.info("loaded %s (%d layers, %d dims, vocab %d) on %s/%s%s in %.2fs",
             args.model_dir or "the embedded demo model", model.config.n_layer,
             model.config.n_embd, model.config.vocab_size, device, dtype,
             " int8" if args.quantize == "int8" else "", time.monotonic() - t0)
    predictor = GPT2Predictor(args.model_name, engine)
    for exc in (QueueFull, RequestTimeout, EngineStopped):
        app.add_exception_handler(exc, _unavailable)
    app.include_router(openai_router(engine, args.model_name))
    app.add_middleware(CancelOnDisconnect)
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                                enable_grpc=args.enable_grpc, workers=1)
    server.start([predictor])
