"""Wiring: find the models and load those asked for (repository.py), register a predictor per
model and our routes on KServe's ModelServer, and run it."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
import warnings

from fastapi.responses import JSONResponse

from ..engine import EngineConfig, EngineStopped, QueueFull, RequestTimeout

log = logging.getLogger("gpt2serve.server")


async def _unavailable(_request, exc: Exception) -> JSONResponse:
    """Overload, shutdown, a model that cannot load now: 503 at once with Retry-After, so
    clients and Knative back off."""
    return JSONResponse({"error": str(exc)}, status_code=503,
                        headers={"Retry-After": str(getattr(exc, "retry_after", 1))})


async def _not_found(_request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


# vLLM's paths of OpenAI's routes, where a vLLM user's base URL (http://HOST/v1) sends them;
# here /v1/ is KServe's V1 protocol (its /v1/models lists models in KServe's shape).
OPENAI_ELSEWHERE = ("/v1/completions", "/v1/chat/completions")


async def _http_error(request, exc) -> JSONResponse:
    """Starlette's own refusals (no such route, a method the route does not take): in
    OpenAI's error shape on the OpenAI routes, as every other error there, and at vLLM's
    paths of them, saying where they are (the client said only 'Not Found'); KServe's
    `{"error": ...}` elsewhere, the Open Inference Protocol's error object (FastAPI's
    `{"detail": ...}` broke tritonclient's reading of the 404 for a Triton route this server
    does not have, such as a model's config)."""
    from .middleware import error_body
    from .openai import OpenAIError

    path = request.url.path
    if exc.status_code == 404 and path.rstrip("/") in OPENAI_ELSEWHERE:
        return OpenAIError(f"no route {path.rstrip('/')}: this server's OpenAI routes are under "
                           "/openai/v1 (the openai client's base_url is "
                           "http://HOST:PORT/openai/v1)",
                           status=404, kind="not_found_error").response()
    return JSONResponse(error_body(path, exc.status_code, str(exc.detail)),
                        status_code=exc.status_code, headers=exc.headers)


def describe_the_answering_routes(app) -> None:
    """/openapi.json describes, for each path and method, the route that answers it: ours,
    added first. KServe adds its own for the same paths afterwards, and FastAPI let the later
    entry win (V2 infer was described by KServe's body, not ours) and warned of each pair as a
    duplicate operation ID. The shadowed routes are left out of the schema at start-up, once
    every route is in and before any request (FastAPI copies a route's flags when a request
    first reaches its router)."""
    from fastapi.routing import APIRoute

    def api_routes(routes, prefix: str = "", shown: bool = True):
        for route in routes:
            if isinstance(route, APIRoute):
                yield prefix + route.path_format, route, shown and route.include_in_schema
            inner = getattr(route, "original_router", None)  # (FastAPI keeps includes nested)
            if inner is not None:
                context = route.include_context
                yield from api_routes(inner.routes, prefix + context.prefix,
                                      shown and context.include_in_schema)

    def hide_shadowed() -> None:
        answered: set[tuple[str, str]] = set()
        for path, route, shown in api_routes(app.routes):
            keys = {(path, method) for method in route.methods}
            if keys <= answered:
                route.include_in_schema = False
            elif shown:  # (one of ours kept out of the schema: KServe's describes it)
                answered |= keys

    app.router.add_event_handler("startup", hide_shadowed)


def serve(args: argparse.Namespace) -> None:
    # kserve parses sys.argv when imported; import it only when serving.
    import kserve
    from kserve.model_server import app
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import connection, grpc_v2, playground, shutdown
    from .control import repository_router
    from .errors import HideInternalErrors, QuietDisconnects, QuietRefusals
    from .generate import generate_router
    from .health import health_router
    from .middleware import (BearerAuth, BodyLimit, CancelOnDisconnect, CountAnswers,
                             CrossSiteForms, FiniteJSON, HeadAsGet, NoModelVersions,
                             RebindingGuard, WholeForHttp10)
    from .openai import openai_router
    from .predictor import GPT2Predictor, v1_router
    from .repository import KV_SHARE, ModelUnavailable, ModelUnloaded, Repository, settings_of
    from .tokenize import tokenize_router
    from .v2_infer import infer_router

    # The operator's --log_config_file from the first line: KServe applies it as ModelServer
    # is made, once the models had loaded and said so at INFO in the default format
    options = kserve.model_server.args
    if options.configure_logging and options.log_config_file:
        kserve.logging.configure_logging(options.log_config_file)
    t0 = time.monotonic()
    repository = Repository(
        args.model_dir, args.model_name,
        settings_of(args.device, args.dtype, args.quantize, args.threads, args.kernels),
        EngineConfig.from_args(args), budget=args.memory_budget,
        load_timeout=args.load_timeout, enable_control=args.enable_model_repository,
        make_predictor=lambda name, repo: GPT2Predictor(name, repo, args.max_instances))
    repository.start(args.load_models)
    memory = ""
    if repository.budget is not None:  # (each model's KV-cache line names --kv_cache_memory)
        memory = f"; memory budget {repository.budget / 2**20:.0f} MiB"
        kv = repository.config.kv_cache_memory
        if kv:
            source = ("--kv_cache_memory" if args.kv_cache_memory
                      else f"1/{round(1 / KV_SHARE)} of the budget")
            memory += f", a KV cache of up to {kv / 2**20:.0f} MiB a model ({source})"
    log.info("%d model(s), %d loaded, in %.2fs%s; one step thread of %d intra-op threads",
             len(repository.entries), len(repository.loaded()), time.monotonic() - t0, memory,
             repository.settings.threads)
    for exc in (QueueFull, RequestTimeout, EngineStopped, ModelUnavailable):
        app.add_exception_handler(exc, _unavailable)
    app.add_exception_handler(ModelUnloaded, _not_found)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    logging.getLogger(kserve.logging.KSERVE_LOGGER_NAME).addFilter(QuietRefusals())
    logging.getLogger("asyncio").addFilter(QuietDisconnects())
    # KServe's routes answer with FastAPI's deprecated ORJSONResponse, and FastAPI's own
    # catch_warnings, as it handles requests, resets what warnings have been shown: the
    # deprecation was printed again and again (1,005 times in 5 minutes of a fuzz run).
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")

    # Our routes are added before ModelServer adds KServe's, so ours win where paths meet.
    app.include_router(health_router(repository))
    app.include_router(repository_router(repository))
    app.include_router(openai_router(repository, args.max_instances))
    app.include_router(generate_router(repository))
    app.include_router(infer_router(repository))  # before KServe's /infer, so ours answers
    app.include_router(v1_router(repository))
    app.include_router(tokenize_router(repository))
    app.include_router(tokenize_router(repository, prefix="/openai/v1"))
    playground.add_routes(app, repository)
    describe_the_answering_routes(app)
    # Starlette runs the last added middleware first: the count, cross-site forms, auth, the body
    # limit, the rebinding guard, model versions, non-finite JSON, cancel-on-disconnect, then
    # HEAD as GET around the handlers.
    app.add_middleware(HeadAsGet)
    app.add_middleware(CancelOnDisconnect)
    app.add_middleware(FiniteJSON)
    app.add_middleware(NoModelVersions)
    app.add_middleware(RebindingGuard, allowed=args.allowed_hosts,
                       in_pod=bool(os.environ.get("KUBERNETES_SERVICE_HOST")))
    app.add_middleware(BodyLimit, max_bytes=args.max_body_bytes, seconds=args.body_timeout)
    if args.api_key:
        app.add_middleware(BearerAuth, api_key=args.api_key)
    app.add_middleware(CrossSiteForms, keyed=bool(args.api_key))
    app.add_middleware(HideInternalErrors)  # no internal message leaks
    app.add_middleware(WholeForHttp10)  # sees every response as it is sent
    app.add_middleware(CountAnswers)  # outermost of ours: counts what the client got
    shutdown.install(repository, args.shutdown_grace)
    connection.install(args.header_timeout, args.max_body_bytes, args.send_timeout)
    grpc_v2.install(repository, args.api_key, args.max_body_bytes, args.max_instances)
    if args.http_port:  # (0: a port the OS picks, which uvicorn's own line names)
        log.info("playground: http://localhost:%d/playground", args.http_port)
    # grace_period is how long uvicorn (and the gRPC server) wait for open requests once told
    # to exit (30 s by default). Our drain has finished or failed every request by then, so
    # this only bounds the last responses' writing; the drain itself is --shutdown_grace.
    # What exists now (torch, kserve, the models' modules) lives as long as the server. Frozen,
    # it is out of the collector's sight, so a full collection scans only what requests made:
    # unfrozen, each full collection scanned all of it and paused every stream.
    gc.collect()
    gc.freeze()
    server = kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port,
                                enable_grpc=args.enable_grpc, workers=1,
                                registered_models=repository,
                                grace_period=shutdown.WRITE_OUT_SECONDS)
    shutdown.exit_before_serving(server, repository)
    server.start([e.predictor for e in repository.entries.values()])
