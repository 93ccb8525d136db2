"""Wiring: load the model, build the engine, register the predictor and our routes on KServe's
ModelServer, and run it."""

from __future__ import annotations

import argparse
import gc
import logging
import time

from fastapi.responses import ORJSONResponse

from .. import checkpoint
from ..engine import Engine, EngineConfig, EngineStopped, QueueFull, RequestTimeout

log = logging.getLogger("gpt2serve.server")


async def _unavailable(_request, exc: Exception) -> ORJSONResponse:
    """Overload and shutdown: 503 at once with Retry-After, so clients and Knative back off."""
    return ORJSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})


def serve(args: argparse.Namespace) -> None:
    # kserve parses sys.argv when imported; import it only when serving.
    import kserve
    from kserve.model_server import app

    from . import grpc_v2, playground, shutdown
    from .control import ServedModels, UnloadedGate, repository_router
    from .errors import HideInternalErrors
    from .generate import generate_router
    from .health import health_router
    from .middleware import (BearerAuth, BodyLimit, CancelOnDisconnect, FiniteJSON,
                             NoModelVersions)
    from .openai import openai_router
    from .predictor import GPT2Predictor
    from .tokenize import tokenize_router
    from .v2_infer import infer_router

    t0 = time.monotonic()
    model, tokenizer, threads = checkpoint.load_for_engine(
        args.model_dir, args.device, args.dtype, args.quantize, args.threads)
    param = next(model.parameters())
    engine = Engine(model, tokenizer, EngineConfig.from_args(args, threads=threads))
    log.info("loaded %s (%d layers, %d dims, vocab %d) on %s/%s%s, %d threads, in %.2fs",
             args.model_dir or "the embedded demo model", model.config.n_layer,
             model.config.n_embd, model.config.vocab_size, param.device, param.dtype,
             " int8" if args.quantize == "int8" else "", threads,
             time.monotonic() - t0)
    predictor = GPT2Predictor(args.model_name, engine, max_instances=args.max_instances)
    for exc in (QueueFull, RequestTimeout, EngineStopped):
        app.add_exception_handler(exc, _unavailable)

    # Our routes are added before ModelServer adds KServe's, so ours win where paths meet.
    app.include_router(health_router(predictor, engine))
    # KServe's repository routes are never reached: ours answer 404 unless
    # --enable_model_repository, and unload reversibly when it is on (control.py).
    models = ServedModels(enabled=args.enable_model_repository)
    app.include_router(repository_router(models))
    app.include_router(openai_router(engine, args.model_name, args.max_instances))
    app.include_router(generate_router(engine, args.model_name))
    app.include_router(infer_router(predictor))  # before KServe's /infer, so ours answers
    app.include_router(tokenize_router(engine, args.model_name))
    app.include_router(tokenize_router(engine, args.model_name, prefix="/openai/v1"))
    playground.add_routes(app, engine)
    # Starlette runs the last added middleware first: auth, the body limit, model versions,
    # non-finite JSON, the unloaded model's routes, then cancel-on-disconnect around the
    # handlers.
    app.add_middleware(CancelOnDisconnect)
    if args.enable_model_repository:
        app.add_middleware(UnloadedGate, models=models, model_name=args.model_name)
    app.add_middleware(FiniteJSON)
    app.add_middleware(NoModelVersions)
    app.add_middleware(BodyLimit, max_bytes=args.max_body_bytes)
    if args.api_key:
        app.add_middleware(BearerAuth, api_key=args.api_key)
    app.add_middleware(HideInternalErrors)  # outermost of ours: no internal message leaks
    shutdown.install(predictor, engine, args.shutdown_grace)
    grpc_v2.install(models, args.api_key, args.max_body_bytes)
    log.info("playground: http://localhost:%d/playground", args.http_port)
    # grace_period is how long uvicorn (and the gRPC server) wait for open requests once told
    # to exit (30 s by default). Our drain has finished or failed every request by then, so
    # this only bounds the last responses' writing; the drain itself is --shutdown_grace.
    # What exists now (torch, kserve, the model's modules) lives as long as the server. Frozen,
    # it is out of the collector's sight, so a full collection scans only what requests made:
    # unfrozen, each full collection scanned all of it and paused every stream.
    gc.collect()
    gc.freeze()
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                                enable_grpc=args.enable_grpc, workers=1,
                                registered_models=models,
                                grace_period=shutdown.WRITE_OUT_SECONDS)
    shutdown.exit_before_serving(server, engine)
    server.start([predictor])
