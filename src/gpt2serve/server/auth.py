"""The one API-key check, for every entry point: the REST middleware (middleware.BearerAuth)
and the gRPC server's interceptor (grpc_v2.RequestGuard) both call `authorized`.

`Authorization: Bearer <key>` (HTTP header, or gRPC metadata `authorization`): the scheme is
case-insensitive (RFC 7235: `bearer`, `BEARER`), the key is compared in constant time
(hmac.compare_digest, on bytes, so a non-ASCII header cannot raise).

Open without the key, on purpose: liveness and readiness (Kubernetes probes carry no key),
`/metrics` (Prometheus scrapes carry none either; it holds counts and latencies, no prompt or
text), and the playground page and its static files (the page has no data; it sends the key
the user types with each API call). Everything else, on both protocols, needs the key,
including the model-repository routes (control.py).

One exception: KServe's model agent, a container in the same pod, calls `load` and `unload`
(`POST /v2/repository/models/NAME/load|unload`) on localhost with no key. Those two are open
to a connection from the loopback address that carries no `X-Forwarded-For` or `Forwarded`
header: queue-proxy and the agent's own proxy also connect from localhost, but they forward
outside traffic and add those headers. Nor an `Origin` or `Sec-Fetch-Site` header, which
browsers send and the agent does not: through a port-forward, on a developer's machine, or
with its DNS name rebound to 127.0.0.1, a page on any site could post a form to localhost
and unload every model.
"""

from __future__ import annotations

import hmac
import re

PUBLIC_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/metrics", "/playground",
                          "/playground/playground.js", "/playground/playground.css"})
# gRPC's liveness and readiness, the twins of /v2/health/live and /v2/health/ready.
PUBLIC_RPCS = frozenset({"/inference.GRPCInferenceService/ServerLive",
                         "/inference.GRPCInferenceService/ServerReady"})

# How to send it too: the 401's WWW-Authenticate header says only "Bearer".
MISSING_KEY = ("missing or wrong API key: send 'Authorization: Bearer KEY' (gRPC: metadata "
               "'authorization')")
AGENT_PATH = re.compile(r"/v2/repository/models/[^/]+/(load|unload)")
LOOPBACK = frozenset({"127.0.0.1", "::1"})


# The scope's key for the address the connection came from (connection.BoundedHttp sets it):
# uvicorn's ProxyHeadersMiddleware, on by default for 127.0.0.1, replaces the scope's `client`
# with what `X-Forwarded-For` says, which anyone can write.
PEER = "gpt2serve.peer"


def forwarded(headers: dict) -> bool:
    """Whether the request says a proxy passed it on: queue-proxy, KServe's agent and an
    ingress add `X-Forwarded-For` or `Forwarded`. A page's script may set either header too,
    so this proves something only where a proxy of the pod is the one who could."""
    return b"x-forwarded-for" in headers or b"forwarded" in headers


def from_local_agent(path: str, client: tuple | None, headers: dict) -> bool:
    """A repository load or unload from a container of this pod (KServe's model agent)."""
    return (AGENT_PATH.fullmatch(path) is not None and client is not None
            and client[0] in LOOPBACK and not forwarded(headers)
            and b"origin" not in headers and b"sec-fetch-site" not in headers)


def authorized(value: str | bytes | None, api_key: str) -> bool:
    """True when `value` (an Authorization header or metadata value) is `Bearer <api_key>`,
    whatever the case of the scheme."""
    if value is None:
        return False
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    scheme, _, token = value.strip().partition(b" ")
    # Compare even when the scheme is wrong, so the time taken says nothing about the key.
    same = hmac.compare_digest(token.strip(), api_key.encode("utf-8"))
    return scheme.lower() == b"bearer" and same
