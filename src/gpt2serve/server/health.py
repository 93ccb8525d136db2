"""Probes, in place of KServe's (registered first, so they win): liveness follows the step
thread, readiness the models and the drain; the V2 server metadata; and a model's V2
readiness and metadata, KServe's but for a model unloaded through the API, which is 404
saying so (KServe's said it did not exist, while the index lists it)."""

from __future__ import annotations

from importlib import metadata

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kserve.constants.constants import KSERVE_MODEL_SERVER_NAME
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.rest.v2_datamodels import ModelMetadataResponse, ModelReadyResponse
from kserve.protocol.rest.v2_endpoints import V2Endpoints

from .errors import refusals
from .repository import Repository


def server_metadata(repository: Repository) -> dict:
    """V2 server metadata (REST `GET /v2`, gRPC ServerMetadata) as KServe's, but with the
    extensions this server has: the SDK lists the model repository extension whether or not
    its routes answer."""
    return {"name": KSERVE_MODEL_SERVER_NAME, "version": metadata.version("kserve"),
            "extensions": ["model_repository_extension"] if repository.enabled else []}


def liveness(repository: Repository, alive_body: dict, dead_body: dict) -> JSONResponse:
    """200 while the step thread runs; 503 once it has died (nothing accepted can finish, so
    the kubelet should restart the container). KServe's own probes always answer alive."""
    if repository.alive:
        return JSONResponse(alive_body)
    return JSONResponse({**dead_body, "error": "the engine's step thread has died"},
                          status_code=503)


def health_router(repository: Repository) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/")
    async def root() -> JSONResponse:
        return liveness(repository, {"status": "alive"}, {"status": "dead"})

    @router.get("/v2")
    async def server() -> JSONResponse:
        return JSONResponse(server_metadata(repository))

    @router.get("/v2/health/live")
    async def live() -> JSONResponse:
        return liveness(repository, {"live": True}, {"live": False})

    @router.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        # Replaces KServe's server-level check (always true) with the models' own state, so
        # readiness turns false as soon as a drain starts.
        ok = repository.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    endpoints = V2Endpoints(DataPlane(model_registry=repository))

    @router.get("/v2/models/{model_name}", response_model=ModelMetadataResponse,
                responses=refusals())
    async def model_metadata(model_name: str):
        repository.refuse_absent(model_name)
        return await endpoints.model_metadata(model_name)

    @router.get("/v2/models/{model_name}/ready", response_model=ModelReadyResponse,
                responses=refusals())
    async def model_ready(model_name: str):
        repository.refuse_absent(model_name)
        return await endpoints.model_ready(model_name)

    return router
