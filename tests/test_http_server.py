"""llmgw._net.http_server with raw sockets on 127.0.0.1: framing, keep-alive and pipelining, limits, 100-continue,
client disconnects, streaming and draining, byte for byte."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from llmgw._net.http_server import HTTPServer, Request, Responder
from llmgw_common.limits import HTTPServerLimits


class App:
    """Echoes the request; ``/slow`` waits until released; ``/stream`` streams ``n`` chunks."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, request: Request, respond: Responder) -> None:
        if request.path == "/slow":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if request.path == "/stream":
            respond.start(200, {"Content-Type": "text/event-stream"})
            for i in range(int(request.headers.get("x-chunks", "3"))):
                await respond.write(b"data: %d %s\n\n" % (i, b"x" * int(request.headers.get("x-pad", "0"))))
            await respond.end()
            return
        if request.too_large:
            respond.send(413, b"too large", {})
            return
        body = f"{request.method} {request.path} {len(request.body)}".encode()
        respond.send(200, body, {"Content-Type": "text/plain"})


@contextlib.asynccontextmanager
async def serving(**kwargs: float) -> AsyncIterator[tuple[App, HTTPServer, int]]:
    app = App()
    kwargs.setdefault("max_body_bytes", 1000)
    server = HTTPServer(app, HTTPServerLimits(**kwargs))  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    try:
        yield app, server, port
    finally:
        await server.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    else:
        body = await reader.read()
    return status, headers, body


def post(path: str, body: bytes = b"{}", extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


async def test_keep_alive_and_pipelined_requests_in_order() -> None:
    async with serving() as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/a", b"1") + post("/b?q=1", b"22") + b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = [await read_response(reader) for _ in range(3)]
        assert [a[2] for a in answers] == [b"POST /a 1", b"POST /b 2", b"GET /c 0"]
        assert all(a[0] == 200 and "connection" not in a[1] and "date" in a[1] for a in answers)
        writer.close()


async def test_http10_closes_unless_asked_to_keep_alive() -> None:
    async with serving() as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.0\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_chunked_request_body() -> None:
    async with serving() as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert (await read_response(reader))[2] == b"POST /c 5"
        writer.close()


async def test_expect_100_continue() -> None:
    async with serving() as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"body")
        assert (await read_response(reader))[2] == b"POST /e 4"
        writer.close()


async def test_body_limits_answer_413_and_close() -> None:
    async with serving(max_body_bytes=10) as (_, _, port):
        # Declared too large: answered from the head alone, with no 100 Continue.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\nExpect: 100-continue\r\n\r\n"
        )
        status, headers, body = await read_response(reader)
        assert (status, body, headers["connection"]) == (413, b"too large", "close")
        assert await asyncio.wait_for(reader.read(), 5) == b""
        # Chunked past the limit: read and dropped, then 413.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        assert (await read_response(reader))[0] == 413


@pytest.mark.parametrize(
    ("raw", "status", "text"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400, b"malformed request"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", 431, b"request head exceeds"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n", 400, b"upgrades"),
        (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400, b"malformed"),
    ],
)
async def test_bad_requests_get_400_or_431_and_a_closed_connection(
    raw: bytes, status: int, text: bytes
) -> None:
    async with serving() as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(raw)
        got, headers, body = await read_response(reader)
        assert got == status and text in body and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_client_that_leaves_cancels_its_handler() -> None:
    async with serving() as (app, _, port):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow"))
        await asyncio.wait_for(app.started.wait(), 5)
        writer.close()
        await asyncio.wait_for(app.cancelled.wait(), 5)


async def test_streamed_response_is_chunked_and_waits_for_a_slow_reader() -> None:
    async with serving() as (_, server, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**20)
        writer.write(post("/stream", extra="X-Chunks: 3\r\n"))
        status, headers, body = await read_response(reader)
        assert (status, headers["transfer-encoding"]) == (200, "chunked")
        assert body == b"data: 0 \n\ndata: 1 \n\ndata: 2 \n\n"
        # 16 MiB to a reader that does not read: the server must wait, not buffer it all, and finish later.
        writer.write(post("/stream", extra="X-Chunks: 256\r\nX-Pad: 65536\r\n"))
        await asyncio.sleep(0.5)
        (conn,) = server._connections
        assert conn.transport is not None and conn.transport.get_write_buffer_size() < 1 << 20
        status, _, body = await read_response(reader)
        assert status == 200 and body.count(b"data: ") == 256
        writer.close()


async def test_drain_closes_idle_connections_and_finishes_busy_ones() -> None:
    async with serving() as (app, server, port):
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        idle_writer.write(post("/first"))
        await read_response(idle_reader)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow"))
        await asyncio.wait_for(app.started.wait(), 5)
        await server.stop_accepting()
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # the idle keep-alive connection closed
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)  # no new connections
        app.release.set()
        status, headers, _ = await read_response(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_trickling_client_is_disconnected() -> None:
    async with serving(request_timeout_s=0.3, request_header_timeout_s=0.3, keepalive_timeout_s=0.3) as (
        _,
        _,
        port,
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        status, headers, _ = await read_response(reader)
        assert status == 408 and headers["connection"] == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # idle, nothing sent
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_bad_request_after_pipelined_ones_is_answered_after_them() -> None:
    async with serving() as (_, _, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/a") + post("/b") + b"BAD REQUEST\r\n\r\n")
        assert [(await read_response(reader))[0] for _ in range(3)] == [200, 200, 400]
        assert await asyncio.wait_for(reader.read(), 5) == b""


async def test_a_head_is_counted_while_it_is_incomplete() -> None:
    """A header value that never ends is refused once the head passes the limit, not kept until it ends."""
    async with serving(max_head_bytes=4096) as (_, server, port):
        hits: list[str] = []
        server.on_limit = hits.append
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(5):  # the fifth passes the limit; nothing is left unread (the answer is not lost)
            await asyncio.sleep(0.02)
            writer.write(b"a" * 1000)
        status, headers, body = await read_response(reader)
        assert (status, headers["connection"]) == (431, "close") and b"4096" in body
        assert hits == ["maxHeadBytes"]


async def test_silent_and_slow_heads_time_out() -> None:
    async with serving(request_header_timeout_s=0.3) as (_, server, port):
        hits: list[str] = []
        server.on_limit = hits.append
        reader, _ = await asyncio.open_connection("127.0.0.1", port)  # nothing sent: closed, no answer
        assert await asyncio.wait_for(reader.read(), 5) == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n")  # a head begun, not finished: 408
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"]) == (408, "close")
        assert hits == ["requestHeaderTimeoutSeconds"] * 2


async def test_connections_beyond_the_cap_get_503() -> None:
    async with serving(max_connections=2) as (_, server, port):
        hits: list[str] = []
        server.on_limit = hits.append
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        status, headers, _ = await read_response(reader)
        assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
        assert hits == ["maxConnections"]
        held[0][1].write(post("/a"))  # those held are served
        assert (await read_response(held[0][0]))[0] == 200


async def test_a_stream_that_is_not_read_is_aborted_and_its_handler_cancelled() -> None:
    async with serving(stalled_write_timeout_s=0.5, max_queued_response_bytes=4096) as (app, server, port):
        hits: list[str] = []
        server.on_limit = hits.append
        original = app.__call__

        async def handler(request: Request, respond: Responder) -> None:
            try:
                await original(request, respond)
            except ConnectionError:
                app.cancelled.set()
                raise

        server.handler = handler
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(post("/stream", extra="X-Chunks: 100000\r\nX-Pad: 65536\r\n"))  # ~6.5 GB, never read
        await asyncio.wait_for(app.cancelled.wait(), 20)
        assert hits == ["stalledWriteTimeoutSeconds"]
        assert not server._connections
        sock.close()


async def test_pipelined_answers_wait_for_the_client_to_read() -> None:
    """Answers are not queued without bound for a client that pipelines and does not read: once
    ``max_queued_response_bytes`` wait, answering (and past the pipelining bound, reading) stops."""
    async with serving(max_queued_response_bytes=4096, max_pipelined_requests=2) as (_, server, port):
        hits: list[str] = []
        server.on_limit = hits.append
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        request = b"GET /" + b"p" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            for _ in range(20_000):  # 40 MB at most; the server stops reading long before
                await asyncio.wait_for(loop.sock_sendall(sock, request * 16), 0.5)
        await asyncio.sleep(0.2)
        (conn,) = server._connections
        assert conn.transport is not None and conn.transport.get_write_buffer_size() < 64 * 1024
        # Parsed ahead: the pipelining bound, plus what one slice of a read held.
        assert len(conn._queue) <= 2 + 1 + 16 * 1024 // len(request)
        assert "maxQueuedResponseBytes" in hits
        sock.close()
