#!/usr/bin/env python3
"""A server that answers every POST with one fixed chat.completion body, for comparing HTTP servers.

``python bench/static_server.py llmgw|aiohttp`` listens on 127.0.0.1 (a free port, printed as
"listening on port N") with ``llmgw.http_server`` (the REST front's server) or aiohttp's web server (as
the REST front ran before), on uvloop, until SIGTERM. ``proxy_latency.py`` starts both and measures
their CPU per request side by side; nothing else runs in the process, so its CPU time is the server's.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web

from llmgw.http_server import HTTPServer, Request, Responder

REPLY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"bench-rest","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"a fixed reply of a few words"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":6,"total_tokens":15}}'
)


async def _llmgw() -> int:
    async def handle(request: Request, respond: Responder) -> None:
        respond.send(200, REPLY, {"Content-Type": "application/json"})

    return await HTTPServer(handle, max_body_bytes=1 << 20).start("127.0.0.1", 0)


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


async def _serve(kind: str) -> None:
    port = await (_llmgw() if kind == "llmgw" else _aiohttp())
    print(f"listening on port {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("llmgw", "aiohttp"):
        sys.exit("usage: static_server.py llmgw|aiohttp")
    uvloop.run(_serve(sys.argv[1]))
