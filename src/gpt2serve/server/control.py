"""The control plane: the V2 model repository extension (Triton's, which KServe's model agent
calls), over the Repository (repository.py).

  POST /v2/repository/index                     -> [{"name", "state", "reason"}, ...]
       {"ready": true} lists the READY ones only
  POST /v2/repository/models/{name}/load        -> {"name", "load": true} once READY
  POST /v2/repository/models/{name}/unload      -> {"name", "unload": true} once unloaded

The `kserve` SDK has the load and unload routes (ours are registered first and answer
instead: its unload stopped the one model for good and its load did nothing) and no index
route. They are on when `--model_dir` is a repository folder, or with
`--enable_model_repository`; off, they answer 404 (gRPC UNIMPLEMENTED), as for a route the
server does not have. Like every route but health, metrics and the playground page, they sit
behind `--api_key` (auth.py).

An unload is a drain: the model's new requests get 404 at once, those it accepted finish,
then its memory is freed; the call returns then. A call that comes in while another for the
same model waits overrules it: an unload a waiting load, a load a waiting unload; the earlier
call answers 409. A load of a name whose folder appeared under
the repository folder since start finds it (KServe's agent pulls a TrainedModel there, then
calls load). Liveness is not touched by either.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from kserve.errors import ModelNotFound

from . import jsonbody
from .repository import LoadFailed, Overruled, Repository, RepositoryOff


def repository_router(repository: Repository) -> APIRouter:
    router = APIRouter(prefix="/v2/repository", tags=["V2 repository"],
                       include_in_schema=repository.enabled)

    async def answer(action, model_name: str, key: str) -> JSONResponse:
        try:
            await action(model_name)
        except (RepositoryOff, ModelNotFound) as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except LoadFailed as e:
            return JSONResponse({"error": str(e)}, status_code=503,
                                headers={"Retry-After": "1"})
        except Overruled as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"name": model_name, key: True})

    @router.post("/index")
    async def index(request: HTTPRequest) -> JSONResponse:
        if not repository.enabled:
            return JSONResponse({"error": str(RepositoryOff())}, status_code=404)
        raw = await request.body()
        try:
            body = jsonbody.parse(raw) if raw.strip() else {}
        except jsonbody.BadJSON:
            body = None
        if not isinstance(body, dict) or set(body) - {"ready"} or not isinstance(
                body.get("ready", False), bool):
            return JSONResponse({"error": "the index takes an optional object "
                                          "{\"ready\": true|false}"}, status_code=400)
        models = repository.index()
        if body.get("ready"):
            models = [m for m in models if m["state"] == "READY"]
        return JSONResponse(models)

    @router.post("/models/{model_name}/load")
    async def load(model_name: str) -> JSONResponse:
        return await answer(repository.load, model_name, "load")

    @router.post("/models/{model_name}/unload")
    async def unload(model_name: str) -> JSONResponse:
        return await answer(repository.unload, model_name, "unload")

    return router
