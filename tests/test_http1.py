"""llmgw._net.http_client against raw asyncio servers on 127.0.0.1 that answer byte for byte what each case needs:
framing (length, chunked, until close), keep-alive reuse and its races, timeouts, cancellation, the
connection cap, back-pressure and malformed responses."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from llmgw._net import http_client
from llmgw_common.limits import HTTPClientLimits

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """Counts connections and requests; ``handler`` serves each connection."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.disconnected = asyncio.Event()
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.disconnected.set()
            writer.close()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        self.requests.append(head + body)
        return body


@contextlib.asynccontextmanager
async def raw_server(make: Callable[[RawServer], Handler]) -> AsyncIterator[RawServer]:
    server = RawServer(lambda r, w: asyncio.sleep(0))
    server.handler = make(server)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()


def client(server: RawServer, **kwargs: float) -> http_client.HTTPClient:
    options: dict[str, float] = {"max_connections": 8, "connect_timeout": 2.0, **kwargs}
    return http_client.HTTPClient(
        f"http://127.0.0.1:{server.port}/v1/chat/completions?x=1",
        {"content-type": "application/json", "authorization": "Bearer k"},
        max_connections=int(options["max_connections"]),
        connect_timeout=options["connect_timeout"],
        limits=HTTPClientLimits(idle_timeout_s=options.get("idle_timeout", 30.0)),
    )


def answering(*responses: bytes, close_after: int | None = None) -> Callable[[RawServer], Handler]:
    """Answer the n-th request on each connection with ``responses[n]`` (the last one repeats)."""

    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            n = 0
            while close_after is None or n < close_after:
                await server.read_request(reader)
                writer.write(responses[min(n, len(responses) - 1)])
                await writer.drain()
                n += 1

        return handler

    return make


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


async def test_request_line_headers_and_body_on_the_wire() -> None:
    async with raw_server(answering(OK)) as server:
        c = client(server)
        resp = await c.post(b'{"a":1}', 5)
        assert (resp.status, resp.headers["content-type"]) == (200, "application/json")
        assert await resp.read() == b'{"ok":true}'
        await c.close()
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?x=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"authorization: Bearer k" in lines and b"Content-Length: 7" in lines
    assert body == b'{"a":1}'


async def test_keep_alive_reuses_one_connection() -> None:
    async with raw_server(answering(OK)) as server:
        c = client(server)
        for _ in range(5):
            resp = await c.post(b"{}", 5)
            assert await resp.read() == b'{"ok":true}'
        assert server.connections == 1 and len(server.requests) == 5
        await c.close()


async def test_chunked_body_and_repeated_headers() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\nX-A: 2\r\n\r\n"
        b"5\r\nhello\r\n1\r\n\n\r\n6\r\nworld\n\r\n0\r\n\r\n"
    )
    async with raw_server(answering(chunked)) as server:
        c = client(server)
        resp = await c.post(b"{}", 5)
        assert resp.headers["x-a"] == "1, 2"
        assert [line async for line in resp.lines()] == [b"hello\n", b"world\n"]
        resp = await c.post(b"{}", 5)  # the connection is reusable after a chunked body
        assert await resp.read() == b"hello\nworld\n"
        assert server.connections == 1
        await c.close()


async def test_body_delimited_by_the_end_of_the_connection() -> None:
    async with raw_server(answering(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close_after=1)) as server:
        c = client(server)
        resp = await c.post(b"{}", 5)
        assert await resp.read() == b"until the end"
        resp = await c.post(b"{}", 5)  # a new connection: the first one ended with its body
        assert await resp.read() == b"until the end"
        assert server.connections == 2
        await c.close()


async def test_connection_close_is_honoured() -> None:
    response = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    async with raw_server(answering(response)) as server:
        c = client(server)
        for _ in range(3):
            assert await (await c.post(b"{}", 5)).read() == b"ok"
        assert server.connections == 3
        await c.close()


async def test_idle_connection_closed_by_the_server_is_replaced_transparently() -> None:
    async with raw_server(answering(OK, close_after=1)) as server:
        c = client(server)
        assert (await c.post(b"{}", 5)).status == 200
        await server.disconnected.wait()
        await asyncio.sleep(0.05)
        for _ in range(3):  # each reuse races the server's close; none may surface as an error
            assert await (await c.post(b"{}", 5)).read() == b'{"ok":true}'
        assert server.connections == 4
        await c.close()


async def test_a_reused_connection_lost_before_the_response_is_retried_once() -> None:
    """The keep-alive race itself: the server reads the next request and closes without answering."""

    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()
            if server.connections == 1:
                await server.read_request(reader)  # ... and hang up

        return handler

    async with raw_server(make) as server:
        c = client(server)
        assert (await c.post(b"{}", 5)).status == 200
        assert await (await c.post(b"{}", 5)).read() == b'{"ok":true}'
        assert server.connections == 2 and len(server.requests) == 3
        await c.close()


async def test_a_fresh_connection_lost_before_the_response_is_an_error() -> None:
    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)

        return handler

    async with raw_server(make) as server:
        c = client(server)
        with pytest.raises(http_client.ConnectionLost, match="closed the connection"):
            await c.post(b"{}", 5)
        assert server.connections == 1  # not retried: nothing says the server did not act on it
        await c.close()


async def test_connection_refused_is_an_oserror() -> None:
    async with raw_server(answering(OK)) as server:
        port = server.port
    c = http_client.HTTPClient(f"http://127.0.0.1:{port}/", {}, max_connections=2, connect_timeout=2)
    with pytest.raises(OSError):
        await c.post(b"{}", 5)
    await c.close()


async def test_timeout_mid_body_closes_the_connection() -> None:
    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()
            await reader.read()  # until the client hangs up

        return handler

    async with raw_server(make) as server:
        c = client(server)
        resp = await c.post(b"{}", 0.3)
        with pytest.raises(TimeoutError, match="in time"):
            await resp.read()
        await asyncio.wait_for(server.disconnected.wait(), 5)
        assert c.open_connections == 0
        await c.close()


async def test_timeout_waiting_for_headers() -> None:
    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            await reader.read()

        return handler

    async with raw_server(make) as server:
        c = client(server)
        with pytest.raises(TimeoutError):
            await c.post(b"{}", 0.2)
        await asyncio.wait_for(server.disconnected.wait(), 5)
        await c.close()


async def test_cancelling_the_caller_or_abandoning_a_stream_closes_the_connection() -> None:
    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await reader.read()

        return handler

    async with raw_server(make) as server:
        c = client(server)
        resp = await c.post(b"{}", 5)
        chunks = resp.chunks()
        assert await anext(chunks) == b"first"
        resp.close()
        await asyncio.wait_for(server.disconnected.wait(), 5)
        server.disconnected.clear()

        task = asyncio.create_task(c.post(b"{}", 5))
        await asyncio.sleep(0.1)
        resp = task.result()
        reading = asyncio.create_task(resp.read())
        await asyncio.sleep(0.05)
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading
        resp.close()
        await asyncio.wait_for(server.disconnected.wait(), 5)
        assert c.open_connections == 0
        await c.close()


async def test_the_connection_cap_queues_requests() -> None:
    in_flight = 0
    peak = 0

    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal in_flight, peak
            while True:
                await server.read_request(reader)
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0.02)
                in_flight -= 1
                writer.write(OK)
                await writer.drain()

        return handler

    async with raw_server(make) as server:
        c = client(server, max_connections=3)

        async def one() -> bytes:
            return await (await c.post(b"{}", 5)).read()

        results = await asyncio.gather(*(one() for _ in range(12)))
        assert results == [b'{"ok":true}'] * 12
        assert peak == 3 and server.connections == 3
        await c.close()

    def hanging(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")  # a body that never ends
            await reader.read()

        return handler

    async with raw_server(hanging) as server:
        c = client(server, max_connections=2)
        held = [await c.post(b"{}", 5) for _ in range(2)]
        with pytest.raises(TimeoutError, match="no connection"):
            await c.post(b"{}", 0.1)
        held[0].close()  # frees a slot
        held.append(await c.post(b"{}", 5))
        for resp in held:
            resp.close()
        await c.close()


async def test_back_pressure_pauses_reading_a_large_stream() -> None:
    total = 8 * 1024 * 1024

    def make(server: RawServer) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await server.read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            block = b"x" * 65536
            for _ in range(total // len(block)):
                writer.write(block)
                await writer.drain()

        return handler

    async with raw_server(make) as server:
        c = client(server)
        resp = await c.post(b"{}", 20)
        await asyncio.sleep(0.3)  # a consumer that is slow to start
        assert resp._buffered <= 2 * 1024 * 1024, "the socket kept being read past the limit"
        received = 0
        async for data in resp.chunks():
            received += len(data)
        assert received == total
        resp = await c.post(b"{}", 20)
        await asyncio.sleep(0.3)  # paused past 1 MiB before read() was called: read() must resume it
        assert len(await resp.read()) == total
        with pytest.raises(http_client.MalformedResponse, match="exceeds"):
            await (await c.post(b"{}", 20)).read(limit=1024 * 1024)
        await c.close()


async def test_malformed_and_interim_responses() -> None:
    async with raw_server(answering(b"SMTP ready\r\n\r\n")) as server:
        c = client(server)
        with pytest.raises(http_client.MalformedResponse, match="malformed"):
            await c.post(b"{}", 5)
        await c.close()
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + OK
    async with raw_server(answering(interim)) as server:
        c = client(server)
        resp = await c.post(b"{}", 5)
        assert resp.status == 200 and "link" not in resp.headers
        assert await resp.read() == b'{"ok":true}'
        await c.close()


def test_bad_urls_and_header_injection_are_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        http_client.HTTPClient("ftp://x/", {}, max_connections=1, connect_timeout=1)
    with pytest.raises(ValueError, match="line breaks"):
        http_client.HTTPClient("http://x/", {"x-a": "1\r\nx-b: 2"}, max_connections=1, connect_timeout=1)
