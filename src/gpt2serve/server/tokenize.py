"""`POST /tokenize` and `POST /detokenize` in vLLM's shapes, at vLLM's paths (its api_server
mounts them at the root, beside `/v1`), and again under `/openai/v1/`, where a KServe user's
OpenAI base URL points (KServe moves vLLM's `/v1/...` to `/openai/v1/...`).

  {"model"?, "prompt": "...", "add_special_tokens"?: true, "return_token_strs"?: false}
      -> {"count", "max_model_len", "tokens", "token_strs"?}
  {"model"?, "tokens": [ids]} -> {"prompt": "..."}

Errors as the completions route's (vLLM's ErrorResponse). GPT-2's tokenizer adds no special
tokens, so `add_special_tokens` changes nothing; vLLM's chat form (`messages`) gets a 400, as
chat completions do.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi import Request as HTTPRequest

from ..sampling import as_token_ids
from .errors import refusals
from .openai import OpenAIError, json_object, model_of
from .repository import Repository

_MODEL = {"type": ["string", "null"],
          "description": "required where the server has several; null or none: its one"}
_TOKENIZE = {"type": "object", "required": ["prompt"], "additionalProperties": False,
             "properties": {"model": _MODEL, "prompt": {"type": "string"},
                            "add_special_tokens": {"type": ["boolean", "null"]},
                            "return_token_strs": {"type": ["boolean", "null"]}}}
_DETOKENIZE = {"type": "object", "required": ["tokens"], "additionalProperties": False,
               "properties": {"model": _MODEL,
                              "tokens": {"type": "array",
                                         "items": {"type": "integer", "minimum": 0}}}}


def _schema(schema: dict) -> dict:
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


def tokenize_router(repository: Repository, prefix: str = "") -> APIRouter:
    """The model's tokenizer (the model is loaded first, if it is not)."""
    router = APIRouter(prefix=prefix, tags=["tokenizer"])

    @router.post("/tokenize", response_model=None, openapi_extra=_schema(_TOKENIZE),
                 responses=refusals(openai=True))
    async def tokenize(request: HTTPRequest):
        try:
            body, engine = await _body(request, repository, {
                "prompt", "messages", "add_special_tokens", "return_token_strs"})
            tokenizer = engine.tokenizer
            if "messages" in body:
                raise OpenAIError("GPT-2 has no chat template; tokenize a 'prompt'",
                                  param="messages")
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise OpenAIError("'prompt' must be a string", param="prompt")
            if len(prompt) > engine.max_prompt_chars:
                raise OpenAIError(f"prompt is {len(prompt)} characters; this server takes at "
                                  f"most {engine.max_prompt_chars}", param="prompt")
            _flag(body, "add_special_tokens")
            ids = tokenizer.encode(prompt)
            out = {"count": len(ids), "max_model_len": engine.context, "tokens": ids}
            if _flag(body, "return_token_strs"):
                out["token_strs"] = [tokenizer.id_to_token(i) for i in ids]
            return out
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's error shape
            return OpenAIError.of(e).response()

    @router.post("/detokenize", response_model=None, openapi_extra=_schema(_DETOKENIZE),
                 responses=refusals(openai=True))
    async def detokenize(request: HTTPRequest):
        try:
            body, engine = await _body(request, repository, {"tokens"})
            tokenizer = engine.tokenizer
            vocab = tokenizer.vocab_size
            ids = as_token_ids(body.get("tokens"), vocab)
            if ids is None:
                raise OpenAIError(f"'tokens' must be a list of token ids in [0, {vocab})",
                                  param="tokens")
            # Special tokens are shown, as vLLM's detokenize (HF decode's default).
            return {"prompt": tokenizer.decode(ids, skip_special_tokens=False)}
        except Exception as e:  # noqa: BLE001 - every failure in OpenAI's error shape
            return OpenAIError.of(e).response()

    return router


async def _body(request: HTTPRequest, repository: Repository, fields: set[str]):
    """The request's fields and its model's engine."""
    body = await json_object(request)
    name = model_of(body, repository)
    unknown = set(body) - fields - {"model"}
    if unknown:
        name = sorted(unknown)[0]
        raise OpenAIError(f"unknown parameter '{name}'", param=name)
    return body, await repository.engine(name)


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise OpenAIError(f"'{name}' must be true or false", param=name)
    return bool(value)
