"""The control plane: KServe's model-repository extension, off unless asked for, and
reversible when on.

The `kserve` SDK serves `POST /v2/repository/models/{name}/load|unload` and the gRPC
`RepositoryModelLoad|Unload` to anyone who can reach the port. Its unload stopped and dropped
the one model for good (its `load` does nothing, so it answered 503 and predictions 404 from
then on, while liveness stayed 200). Here:

- Off by default (`--enable_model_repository` turns them on): REST answers 404 and gRPC
  UNIMPLEMENTED, as for a route or method the server does not have. With one model they serve
  no one; a server with many models is what they are for.
- On, they sit behind `--api_key` like every other route (auth.py), and an unload is
  reversible: it takes the model out of service and keeps it in memory (weights, KV cache,
  the engine's step thread), so `load` puts it back at once. While unloaded, V1/V2 inference
  and metadata answer 404 / NOT_FOUND (the model is not in KServe's registry), readiness 503,
  and the OpenAI completions and V2 generate routes, which reach the engine directly, 404 as
  well (`UnloadedGate`); requests accepted before the unload finish.
- Liveness is not touched by an unload: `load` reverses it, so restarting the pod would only
  lose what was running. Liveness fails when the process can no longer serve and cannot
  recover by itself: the engine's step thread has died (health.py, gRPC ServerLive).
"""

from __future__ import annotations

import json
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from kserve.errors import ModelNotFound
from kserve.model_repository import ModelRepository

log = logging.getLogger("gpt2serve.server")

OFF = ("the model repository extension is off; start the server with "
       "--enable_model_repository to load and unload models")


class RepositoryOff(Exception):
    pass


class NotLoadable(Exception):
    """`load` cannot bring the model back now (draining, or its engine has died)."""


class ServedModels(ModelRepository):
    """KServe's model registry with a reversible unload: an unloaded model waits in
    `unloaded` until `load` puts it back."""

    def __init__(self, enabled: bool = False):
        super().__init__()
        self.enabled = enabled
        self.unloaded: dict = {}

    def all_models(self) -> list:
        """Served and unloaded models: liveness looks at both."""
        return [*self.models.values(), *self.unloaded.values()]

    def is_unloaded(self, name: str) -> bool:
        return name in self.unloaded

    def unload(self, name: str) -> None:
        """Take `name` out of service (KeyError if there is no such model; unloading an
        unloaded one is a no-op). Nothing is stopped."""
        if name in self.unloaded:
            return
        model = self.models.pop(name)
        model.ready = False
        self.unloaded[name] = model
        log.info("model %s unloaded (kept in memory; load brings it back)", name)

    def load(self, name: str) -> bool:
        """Put an unloaded model back (KeyError if there is no such model; NotLoadable when it
        cannot serve now). Loading a served model is a no-op."""
        if name in self.models:
            return True
        model = self.unloaded[name]
        if model.generator.draining:
            raise NotLoadable(f"model {name} cannot be loaded: the server is shutting down")
        if not model.alive:
            raise NotLoadable(f"model {name} cannot be loaded: its engine has died")
        del self.unloaded[name]
        model.ready = True
        self.models[name] = model
        log.info("model %s loaded", name)
        return True

    # The REST and gRPC handlers call these two, so both protocols answer alike.

    def do_unload(self, name: str) -> None:
        if not self.enabled:
            raise RepositoryOff(OFF)
        try:
            self.unload(name)
        except KeyError:
            raise ModelNotFound(name) from None

    def do_load(self, name: str) -> None:
        if not self.enabled:
            raise RepositoryOff(OFF)
        try:
            self.load(name)
        except KeyError:
            raise ModelNotFound(name) from None


def repository_router(models: ServedModels) -> APIRouter:
    """Our load/unload routes, registered before KServe's so that theirs are never reached."""
    router = APIRouter(prefix="/v2/repository/models/{model_name}", tags=["V2 repository"],
                       include_in_schema=models.enabled)

    def answer(action, model_name: str, key: str) -> JSONResponse:
        try:
            action(model_name)
        except RepositoryOff as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except ModelNotFound as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        except NotLoadable as e:
            return JSONResponse({"error": str(e)}, status_code=503,
                                headers={"Retry-After": "1"})
        return JSONResponse({"name": model_name, key: True})

    @router.post("/load")
    async def load(model_name: str) -> JSONResponse:
        return answer(models.do_load, model_name, "load")

    @router.post("/unload")
    async def unload(model_name: str) -> JSONResponse:
        return answer(models.do_unload, model_name, "unload")

    return router


class UnloadedGate:
    """404 for the routes that reach the engine without KServe's registry (OpenAI
    completions, V2 infer, generate and generate_stream) while the served model is
    unloaded."""

    def __init__(self, app, models: ServedModels, model_name: str):
        self.app, self.models, self.name = app, models, model_name
        self.paths = {"/openai/v1/completions", f"/v2/models/{model_name}/infer",
                      f"/v2/models/{model_name}/generate",
                      f"/v2/models/{model_name}/generate_stream"}

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and scope["path"] in self.paths
                and self.models.is_unloaded(self.name)):
            message = (f"model '{self.name}' is unloaded; POST "
                       f"/v2/repository/models/{self.name}/load brings it back")
            body = ({"error": {"message": message, "type": "not_found_error", "param": "model",
                               "code": 404}} if scope["path"].startswith("/openai/")
                    else {"error": message})
            payload = json.dumps(body).encode()
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        await self.app(scope, receive, send)
