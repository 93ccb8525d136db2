"""`GET /playground`: a small page, shipped with the package, that streams completions from
`/openai/v1/completions` in the browser. Plain HTML, CSS and JS, no CDN and no build step.

The page is served with the server's limits and defaults in a JSON blob, so its controls match
what the engine accepts. It names no model (the picker fills from `/openai/v1/models`, which needs
the API key when one is set, with each model's context): the page and its two files load
without one, as `/` and health do.
"""

from __future__ import annotations

import json
from dataclasses import fields
from importlib import resources

from fastapi.responses import Response

from ..sampling import MAX_STOP, SamplingParams

ASSETS = {"playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}
PATHS = frozenset({"/playground", *(f"/playground/{name}" for name in ASSETS)})
PAGE_MAX_TOKENS = 200  # the page's starting value for max new tokens, below the context
HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                      "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}


def settings(repository) -> dict:
    """What the page needs to know of the server: limits as SamplingParams.validate and the
    engine check them, defaults as aitextgen's (the page sends every value, so its V1 and
    OpenAI requests are the same). The context is the first model's whose config can be
    read (not a broken folder's), until the page has the list of models."""
    d = {f.name: f.default for f in fields(SamplingParams)}
    known = (repository.context_of(name) for name in sorted(repository.entries))
    context = (next(filter(None, known), None) or repository.config.max_model_len or 1024)
    return {
        "context": context, "max_n": repository.max_n,
        "max_prompt_chars": repository.config.max_prompt_chars, "max_stop": MAX_STOP,
        "defaults": {"max_tokens": min(PAGE_MAX_TOKENS, context - 1),
                     "temperature": d["temperature"], "top_k": d["top_k"], "top_p": d["top_p"],
                     "repetition_penalty": d["repetition_penalty"], "n": d["n"]},
        # [low, high]; an open end is null. The low ends in low_open are excluded (top_p 0);
        # top_k -1 is vLLM's "off", as 0 is.
        "limits": {"max_tokens": [0, context - 1], "temperature": [0, 100],
                   "top_k": [-1, None], "top_p": [0, 1], "repetition_penalty": [0.01, 100],
                   "n": [1, repository.max_n], "seed": [-2**63, 2**63 - 1]},
        "low_open": ["top_p"],
    }


def add_routes(app, repository) -> None:
    """Register the page and its assets (kept out of /openapi.json: they are not API)."""
    folder = resources.files(__package__) / "playground"
    blob = json.dumps(settings(repository)).replace("<", "\\u003c")
    page = (folder / "index.html").read_text("utf-8").replace("{{settings}}", blob).encode()
    assets = {name: (folder / name).read_bytes() for name in ASSETS}

    @app.get("/playground", include_in_schema=False)
    async def playground() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str) -> Response:
        if name not in assets:
            return Response(b"not found", status_code=404, media_type="text/plain")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)
