#!/usr/bin/env python3
"""A server that answers every call with one fixed reply, for comparing HTTP servers and gRPC servers.

``python bench/static_server.py KIND`` listens on 127.0.0.1 (a free port, printed as "listening on port
N") on uvloop until SIGTERM, as one of:

- ``llmgw``: ``llmgw._net.http_server`` (the REST front's server), a fixed chat.completion body for every POST;
- ``aiohttp``: aiohttp's web server (as the REST front ran before), the same;
- ``grpc-llmgw``: ``llmgw._net.grpc_server`` (the gRPC front's server), a fixed ``ChatResponse`` to
  ``llmgateway.v1.LLMService/ChatCompletion``;
- ``grpc-aio``: grpc.aio's server (as the gRPC front ran before), the same.

``proxy_latency.py`` starts them in pairs and measures their CPU per request side by side; nothing else
runs in the process, so its CPU time is the server's.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop
from aiohttp import web

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw import grpc_env

grpc_env.apply()

import grpc  # noqa: E402  (after grpc_env, which grpcio reads on import)

from llmgw._net.grpc_server import UNARY, Method, Server, ServerCall  # noqa: E402
from llmgw._net.http_server import HTTPServer, Request, Responder  # noqa: E402
from llmgw_common.limits import HTTP2Limits, HTTPServerLimits  # noqa: E402

REPLY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"bench-rest","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"a fixed reply of a few words"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}}'
)


async def _llmgw() -> int:
    async def handle(request: Request, respond: Responder) -> None:
        respond.send(200, REPLY, {"Content-Type": "application/json"})

    return await HTTPServer(handle, HTTPServerLimits(max_body_bytes=1 << 20)).start("127.0.0.1", 0)


async def _aiohttp() -> int:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(runner.addresses[0][1])


GRPC_REPLY = pb.ChatResponse(
    id="chatcmpl-1",
    model="bench-grpc",
    content="a fixed reply of a few words",
    finish_reason=pb.FINISH_REASON_STOP,
    usage=pb.Usage(prompt_tokens=9, completion_tokens=6, total_tokens=15),
)
CHAT_COMPLETION = "/llmgateway.v1.LLMService/ChatCompletion"


async def _grpc_llmgw() -> int:
    async def handle(request: pb.ChatRequest, call: ServerCall) -> pb.ChatResponse:
        return GRPC_REPLY

    return await Server(
        {CHAT_COMPLETION: Method(UNARY, pb.ChatRequest, handle)}, HTTP2Limits(max_message_bytes=1 << 20)
    ).start("127.0.0.1", 0)


async def _grpc_aio() -> int:
    async def handle(request: pb.ChatRequest, context: Any) -> pb.ChatResponse:
        return GRPC_REPLY

    handler = grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=pb.ChatRequest.FromString,
        response_serializer=pb.ChatResponse.SerializeToString,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("llmgateway.v1.LLMService", {"ChatCompletion": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _keep.append(server)
    return port


_keep: list[Any] = []  # the grpc.aio server lives as long as the process
SERVERS = {"llmgw": _llmgw, "aiohttp": _aiohttp, "grpc-llmgw": _grpc_llmgw, "grpc-aio": _grpc_aio}


async def _serve(kind: str) -> None:
    port = await SERVERS[kind]()
    print(f"listening on port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SERVERS:
        sys.exit(f"usage: static_server.py {'|'.join(SERVERS)}")
    uvloop.run(_serve(sys.argv[1]))
