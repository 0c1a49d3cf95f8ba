"""The REST port: one router over the routes every REST front exports, and the JSON error answers.

Each REST front (today :mod:`llmgw.fronts.openai`) exports a mapping of path to (method, handler); the
router serves their union on :class:`~llmgw._net.http_server.HTTPServer`. A path that ends in a parameter
(``/v1/models/{id}``) serves every path that starts with what comes before it (its handler reads the rest
from ``request.path``). A path no front serves gets a 404 naming those that exist; a known path with
another method gets a 405 with ``Allow``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import orjson

from llmgw._net.http_server import Request, Responder
from llmgw.chat import clip_text
from llmgw.codecs import openai_chat
from llmgw.errors import GatewayError, Kind

Handler = Callable[[Request, Responder], Awaitable[None]]
Routes = Mapping[str, tuple[str, Handler]]  # path -> (method, handler)
# How a front answers a path or a method it does not serve, in its API's error shape:
# (respond, HTTP status 404 or 405, message, extra headers).
NotServed = Callable[[Responder, int, str, Mapping[str, str]], None]

JSON_HEADERS = {"Content-Type": "application/json"}


def error_json(exc: GatewayError) -> dict[str, object]:
    """OpenAI's error envelope for ``exc``, for a plain response and for an error event inside a stream."""
    return openai_chat.error_body(
        exc.message, exc.kind.error_type, code=exc.code or exc.kind.name.lower(), param=exc.param
    )


def send_error(respond: Responder, exc: GatewayError) -> None:
    headers = dict(JSON_HEADERS)
    if exc.retry_after is not None:
        headers["Retry-After"] = f"{max(1, round(exc.retry_after))}"
    elif exc.kind is Kind.RESOURCE_EXHAUSTED:
        headers["Retry-After"] = "1"
    respond.send(exc.kind.http_status, orjson.dumps(error_json(exc)), headers)


def not_served(respond: Responder, status: int, message: str, headers: Mapping[str, str]) -> None:
    """A 404 or 405 in OpenAI's error shape."""
    if status == 404:
        body = error_json(GatewayError(Kind.NOT_FOUND, message))
    else:
        body = openai_chat.error_body(message, "invalid_request_error", code="method_not_allowed")
    respond.send(status, orjson.dumps(body), {**JSON_HEADERS, **headers})


class RestRouter:
    """Dispatches each request to the handler of its path and method. ``error_shapes`` maps a path prefix
    to how paths below it answer a 404 or 405 (the OpenAI shape elsewhere): an Anthropic SDK that asks for
    a path of the Messages API the gateway does not serve gets an error it can read."""

    def __init__(self, *fronts: Routes, error_shapes: Mapping[str, NotServed] | None = None) -> None:
        self.error_shapes = dict(error_shapes or {})
        self.routes: dict[str, tuple[str, Handler]] = {}
        self.prefixed: list[tuple[str, tuple[str, Handler]]] = []  # (prefix, route) of "/v1/models/{id}"
        for routes in fronts:
            for path, route in routes.items():
                if path in self.routes:
                    raise ValueError(f"two REST fronts serve {path}")
                self.routes[path] = route
                if path.endswith("}") and "{" in path:
                    self.prefixed.append((path[: path.index("{")], route))

    async def handle(self, request: Request, respond: Responder) -> None:
        route = self.routes.get(request.path)
        if route is None:
            for prefix, candidate in self.prefixed:
                if request.path.startswith(prefix) and len(request.path) > len(prefix):
                    route = candidate
                    break
        if route is not None and request.method == route[0]:
            await route[1](request, respond)
            return
        shape = next(
            (shape for prefix, shape in self.error_shapes.items() if request.path.startswith(prefix)),
            not_served,
        )
        if route is None:
            known = ", ".join(f"{m} {p}" for p, (m, _) in self.routes.items())
            asked = clip_text(f"{request.method} {request.path}")
            shape(respond, 404, f"no route for {asked} (this gateway serves {known})", {})
        else:
            message = f"{clip_text(request.path)} accepts {route[0]}, not {clip_text(request.method)}"
            shape(respond, 405, message, {"Allow": route[0]})
