"""llmgw's gRPC server (``llmgw._net.grpc_server``) against grpcio's client, and against raw HTTP/2 frames.

grpcio is the independent implementation: if its client gets the right statuses, messages and metadata,
the server speaks gRPC. The raw-frame tests cover what grpcio's client never sends: a header block split
over CONTINUATION frames, padding, a message split over DATA frames, a tiny flow-control window, a bad
preface, a non-POST request.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2

from llmgw._net.grpc_server import BIDI, SERVER_STREAM, UNARY, Method, Server, ServerCall
from llmgw._net.grpc_wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    PADDED,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ErrorCode,
    RpcError,
    encode_headers,
    frame,
    message,
    settings_frame,
)
from llmgw_common.limits import HTTP2Limits

Request = health_pb2.HealthCheckRequest  # a message with one string field: handy as a test payload
Response = health_pb2.HealthCheckResponse


class Handlers:
    """The test service: what each handler saw, and events to sync with."""

    def __init__(self) -> None:
        self.calls: list[ServerCall] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def echo(self, request: Any, call: ServerCall) -> Any:
        self.calls.append(call)
        if request.service == "fail":
            raise RpcError(grpc.StatusCode.FAILED_PRECONDITION, "nö: 100% wrong", (("retry-after", "30"),))
        if request.service == "crash":
            raise ValueError("a bug")
        if request.service == "big":
            return Request(service="x" * 300_000)
        if request.service.startswith("sleep"):
            self.started.set()
            try:
                await asyncio.sleep(float(request.service[5:]))
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return Request(service=request.service.upper())

    async def count(self, request: Any, call: ServerCall) -> AsyncIterator[Any]:
        self.started.set()
        try:
            for i in range(int(request.service)):
                yield Request(service=f"{i}:" + "y" * 200_000)
            if request.service == "1":
                await asyncio.sleep(30)  # the cancellation test's stream stays open
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def chat(self, requests: AsyncIterator[Any], call: ServerCall) -> AsyncIterator[Any]:
        async for request in requests:
            yield Request(service=f"re: {request.service}")


@pytest.fixture
async def served() -> AsyncIterator[tuple[Server, Handlers, int]]:
    handlers = Handlers()
    server = Server(
        {
            "/t.S/Echo": Method(UNARY, Request, handlers.echo),
            "/t.S/Count": Method(SERVER_STREAM, Request, handlers.count),
            "/t.S/Chat": Method(BIDI, Request, handlers.chat),
        },
        HTTP2Limits(max_message_bytes=100_000),
    )
    port = await server.start("127.0.0.1", 0)
    yield server, handlers, port
    await server.stop(0)


def _stubs(channel: grpc.aio.Channel) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    ser, de = Request.SerializeToString, Request.FromString
    return (
        channel.unary_unary("/t.S/Echo", request_serializer=ser, response_deserializer=de),
        channel.unary_stream("/t.S/Count", request_serializer=ser, response_deserializer=de),
        channel.stream_stream("/t.S/Chat", request_serializer=ser, response_deserializer=de),
    )


async def test_grpcio_client_unary_stream_bidi_and_metadata(served: tuple[Server, Handlers, int]) -> None:
    _, handlers, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo, count, chat = _stubs(channel)
        metadata = (("authorization", "Bearer k"), ("trace-bin", b"\x00\xff"))
        reply = await echo(Request(service="hi"), metadata=metadata, timeout=5)
        assert reply.service == "HI"
        call = handlers.calls[-1]
        assert call.value("authorization") == "Bearer k" and call.value("trace-bin") == b"\x00\xff"
        remaining = call.time_remaining()
        assert remaining is not None and 0 < remaining <= 5
        assert (await echo(Request(service="x"))).service == "X"
        assert handlers.calls[-1].time_remaining() is None, "no deadline, no time limit"

        chunks = [r.service async for r in count(Request(service="40"))]  # 8 MB: far past the windows
        assert [c.split(":")[0] for c in chunks] == [str(i) for i in range(40)]
        assert all(len(c) == len(f"{i}:") + 200_000 for i, c in enumerate(chunks))

        replies = [r.service async for r in chat(iter([Request(service="a"), Request(service="b")]))]
        assert replies == ["re: a", "re: b"]

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", compression=grpc.Compression.Gzip) as channel:
        echo, _, _ = _stubs(channel)
        assert (await echo(Request(service="zipped " * 1000))).service == "ZIPPED " * 1000


async def test_statuses_details_and_trailers(
    served: tuple[Server, Handlers, int], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo, _, _ = _stubs(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(Request(service="fail"))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert info.value.details() == "nö: 100% wrong"
        assert ("retry-after", "30") in tuple(info.value.trailing_metadata() or ())

        with caplog.at_level(logging.ERROR, "llmgw.grpc"), pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(Request(service="crash"))
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert "its logs have the details" in (info.value.details() or "")
        assert "a bug" in caplog.text

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(Request(service="x" * 200_000))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over the server's limit of 100000 bytes" in (info.value.details() or "")

        unknown = channel.unary_unary("/t.S/Nope")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unknown(b"")
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/t.S/Nope" in (
            info.value.details() or ""
        )
        assert (await echo(Request(service="still fine"))).service == "STILL FINE"


async def test_deadline_and_cancellation_cancel_the_handler(served: tuple[Server, Handlers, int]) -> None:
    _, handlers, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo, count, _ = _stubs(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo(Request(service="sleep5"), timeout=0.2)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(handlers.cancelled.wait(), 2)

        handlers.cancelled.clear()
        stream = count(Request(service="1"))
        await stream.read()
        stream.cancel()
        await asyncio.wait_for(handlers.cancelled.wait(), 2)


async def test_stop_lets_started_calls_finish_then_ends_the_rest(
    served: tuple[Server, Handlers, int],
) -> None:
    server, handlers, port = served
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo, _, _ = _stubs(channel)
        short = asyncio.ensure_future(echo(Request(service="sleep0.3")))
        long = asyncio.ensure_future(echo(Request(service="sleep30")))
        await asyncio.wait_for(handlers.started.wait(), 2)
        await asyncio.sleep(0.05)
        await server.stop(1.0)
        assert (await short).service == "SLEEP0.3"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await long
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


# --- raw HTTP/2 ----------------------------------------------------------------------------------------


class RawClient:
    """Frames in and out by hand, to send what grpcio's client never does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = hpack.Decoder()

    @classmethod
    async def connect(cls, port: int, settings: dict[int, int] | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREFACE + settings_frame(settings or {}))
        return cls(reader, writer)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), 5)
        length = int.from_bytes(head[:3], "big")
        payload = await asyncio.wait_for(self.reader.readexactly(length), 5)
        return head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    async def until(self, kind: int, stream_id: int | None = None) -> tuple[int, bytes]:
        """Skip frames (SETTINGS, WINDOW_UPDATE, ...) until one of ``kind``; returns its flags, payload."""
        for _ in range(50):
            got, flags, sid, payload = await self.frame()
            if got == kind and (stream_id is None or sid == stream_id):
                return flags, payload
        raise AssertionError(f"no frame of type {kind}")

    def headers(self, payload: bytes) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.decoder.decode(payload, raw=True)}


def _request_headers(path: str = "/t.S/Echo", method: str = "POST") -> bytes:
    return encode_headers(
        [
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


async def test_continuation_padding_and_a_message_split_over_frames(
    served: tuple[Server, Handlers, int],
) -> None:
    _, _, port = served
    client = await RawClient.connect(port)
    block = _request_headers()
    body = message(Request(service="split").SerializeToString())
    padded = bytes([4]) + body[:3] + b"\0" * 4
    client.send(
        frame(HEADERS, 0, 1, block[:5]),
        frame(CONTINUATION, 0, 1, block[5:9]),
        frame(CONTINUATION, END_HEADERS, 1, block[9:]),
        frame(DATA, PADDED, 1, padded),
        frame(DATA, END_STREAM, 1, body[3:]),
        frame(PING, 0, 0, b"12345678"),
    )
    flags, payload = await client.until(PING)
    assert flags == 1 and payload == b"12345678"
    _, payload = await client.until(HEADERS, 1)
    assert client.headers(payload)[":status"] == "200"
    _, data = await client.until(DATA, 1)
    assert Request.FromString(data[5:]).service == "SPLIT"
    flags, payload = await client.until(HEADERS, 1)
    assert flags & END_STREAM and client.headers(payload)["grpc-status"] == "0"
    client.writer.close()


async def test_tiny_window_is_respected(served: tuple[Server, Handlers, int]) -> None:
    _, _, port = served
    client = await RawClient.connect(port, {INITIAL_WINDOW_SIZE: 100})
    client.send(
        frame(HEADERS, END_HEADERS, 1, _request_headers()),
        frame(DATA, END_STREAM, 1, message(Request(service="big").SerializeToString())),
    )
    received = 0
    _, first = await client.until(DATA, 1)
    received += len(first)
    assert received == 100, "no more than the window"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.reader.readexactly(1), 0.3)
    client.send(
        frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1_000_000)),
        frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1_000_000)),  # and the connection's window
    )
    for _ in range(200):
        kind, flags, _, payload = await client.frame()
        if kind == DATA:
            received += len(payload)
        elif kind == HEADERS and flags & END_STREAM:
            assert client.headers(payload)["grpc-status"] == "0"
            break
    else:
        raise AssertionError("no trailers")
    assert received == 5 + len(Request(service="x" * 300_000).SerializeToString())
    client.writer.close()


async def test_rst_stream_cancels_the_handler(served: tuple[Server, Handlers, int]) -> None:
    _, handlers, port = served
    client = await RawClient.connect(port)
    client.send(
        frame(HEADERS, END_HEADERS, 1, _request_headers()),
        frame(DATA, END_STREAM, 1, message(Request(service="sleep30").SerializeToString())),
    )
    await asyncio.wait_for(handlers.started.wait(), 2)
    client.send(frame(RST_STREAM, 0, 1, struct.pack(">I", ErrorCode.CANCEL)))
    await asyncio.wait_for(handlers.cancelled.wait(), 2)
    client.writer.close()


async def test_not_grpc_gets_a_plain_http_answer_and_a_bad_preface_goaway(
    served: tuple[Server, Handlers, int],
) -> None:
    _, _, port = served
    client = await RawClient.connect(port)
    client.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, _request_headers(method="GET")))
    _, payload = await client.until(HEADERS, 1)
    assert client.headers(payload)[":status"] == "405"
    body = b""
    for _ in range(10):
        flags, data = await client.until(DATA, 1)
        body += data
        if flags & END_STREAM:
            break
    assert b"This port serves gRPC" in body
    client.writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    bad = RawClient(reader, writer)
    _, payload = await bad.until(GOAWAY)
    assert struct.unpack(">I", payload[4:8])[0] == ErrorCode.PROTOCOL_ERROR
    assert b"preface" in payload[8:]
    assert await asyncio.wait_for(reader.read(), 5) == b"", "then the connection closes"


async def test_settings_are_acknowledged(served: tuple[Server, Handlers, int]) -> None:
    _, _, port = served
    client = await RawClient.connect(port)
    for _ in range(5):
        kind, flags, _, _ = await client.frame()
        if kind == SETTINGS and flags & 1:
            break
    else:
        raise AssertionError("no SETTINGS ACK")
    client.writer.close()
