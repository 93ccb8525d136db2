"""The control plane: the V2 model repository extension (Triton's, which KServe's model agent
calls), over the Repository (repository.py).

  POST /v2/repository/index                     -> [{"name", "state", "reason"}, ...]
       {"ready": true} lists the READY ones only
  POST /v2/repository/models/{name}/load        -> {"name", "load": true} once READY
  POST /v2/repository/models/{name}/unload      -> {"name", "unload": true} once unloaded
       bodies optional (LOAD_BODY, UNLOAD_BODY); a field none of them takes is a 400 naming it

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
from .errors import refusals
from .repository import LoadFailed, Overruled, Repository, RepositoryOff


def repository_router(repository: Repository) -> APIRouter:
    router = APIRouter(prefix="/v2/repository", tags=["V2 repository"],
                       include_in_schema=repository.enabled)

    async def answer(action, model_name: str, key: str, request: HTTPRequest,
                     fields: dict) -> JSONResponse:
        try:
            if not repository.enabled:
                raise RepositoryOff()
            read_body(await request.body(), fields)
            await action(model_name)
        except BadBody as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except (RepositoryOff, ModelNotFound) as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except LoadFailed as e:
            return JSONResponse({"error": str(e)}, status_code=503,
                                headers={"Retry-After": str(e.retry_after)})
        except Overruled as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        return JSONResponse({"name": model_name, key: True})

    @router.post("/index", responses=refusals())
    async def index(request: HTTPRequest) -> JSONResponse:
        if not repository.enabled:
            return JSONResponse({"error": str(RepositoryOff())}, status_code=404)
        try:
            body = read_body(await request.body(), {"ready": bool})
        except BadBody as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        models = repository.index()
        if body.get("ready"):
            models = [m for m in models if m["state"] == "READY"]
        return JSONResponse(models)

    @router.post("/models/{model_name}/load", responses=refusals())
    async def load(model_name: str, request: HTTPRequest) -> JSONResponse:
        return await answer(repository.load, model_name, "load", request, LOAD_BODY)

    @router.post("/models/{model_name}/unload", responses=refusals())
    async def unload(model_name: str, request: HTTPRequest) -> JSONResponse:
        return await answer(repository.unload, model_name, "unload", request, UNLOAD_BODY)

    return router


# The bodies the calls take, all optional (KServe's agent sends none): Triton's load takes
# `parameters` to override the model's configuration or files, which a GPT-2 folder served as
# it is has no use for, so any is refused rather than ignored; its unload's one parameter,
# `unload_dependents`, means nothing here (no model depends on another), so it is accepted.
LOAD_BODY = {"parameters": {}}
UNLOAD_BODY = {"parameters": {"unload_dependents": bool}}


class BadBody(ValueError):
    pass


def read_body(raw: bytes, fields: dict) -> dict:
    """An optional JSON object body whose fields are those of `fields` (name -> bool, a
    flag, or a dict: a nested object's fields); BadBody names the first field that is not."""
    try:
        body = jsonbody.parse(raw) if raw.strip() else {}
    except jsonbody.BadJSON as e:
        raise BadBody(str(e)) from None
    check_fields(body, fields)
    return body


def check_fields(value, fields: dict, path: str = "") -> None:
    if not isinstance(value, dict):
        raise BadBody(f"'{path}' must be an object" if path else
                      "request body must be a JSON object")
    for key, item in value.items():
        where = f"{path}.{key[:40]}" if path else key[:40]
        kind = fields.get(key)
        if kind is None:
            known = ", ".join(repr(f) for f in fields)
            holder = f"'{path}'" if path else "the body"
            raise BadBody(f"unknown field '{where}'; " + (f"{holder} may hold {known}" if known
                                                          else f"{holder} takes no fields"))
        if isinstance(kind, dict):
            check_fields(item, kind, where)
        elif not isinstance(item, bool):
            raise BadBody(f"'{where}' must be true or false")
