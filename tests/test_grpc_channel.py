"""llmgw._net.grpc_channel against real grpcio servers (grpc.aio, in the test's event loop, on 127.0.0.1).

The servers mostly serve the raw-bytes service ``t.S`` through a generic handler, so each test says
exactly what the server does: answer, abort with a status, sleep past the deadline, stream many or large
messages, or notice that the client went away. Covered: metadata and ``grpc-timeout``, statuses with
their details (percent-encoded) and trailing metadata, deadlines and cancellation reaching the server,
HTTP/2 flow control both ways, the message size limit, reconnecting after a refused connection and after
a server's graceful stop, many concurrent calls and SETTINGS_MAX_CONCURRENT_STREAMS, UNIMPLEMENTED, TLS,
and a server that accepts the connection but never speaks.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import random
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeAlias

import grpc
import pytest

from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw._net.grpc_channel import Channel
from llmgw._net.grpc_wire import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    ErrorCode,
    RpcError,
    encode_headers,
    frame,
    message,
    metadata_value,
    rst_stream,
)
from llmgw_common.limits import GrpcChannelLimits, HTTP2Limits

Context: TypeAlias = grpc.aio.ServicerContext  # a server handler's context (grpc has no type hints)
Methods: TypeAlias = dict[str, grpc.RpcMethodHandler]
KIB = 1024


def unary(fn: Callable[[bytes, Context], Awaitable[bytes]]) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(fn)


def streaming(fn: Callable[[bytes, Context], Any]) -> grpc.RpcMethodHandler:
    return grpc.unary_stream_rpc_method_handler(fn)


async def echo(request: bytes, context: Context) -> bytes:
    return request


def blob(seed: int, size: int) -> bytes:
    """``size`` bytes that differ from seed to seed."""
    return random.Random(seed).randbytes(size)


class Served:
    def __init__(self, server: grpc.aio.Server, port: int) -> None:
        self.server, self.port = server, port
        self.target = f"127.0.0.1:{port}"


@contextlib.asynccontextmanager
async def serving(
    methods: Methods,
    *,
    port: int = 0,
    options: Sequence[tuple[str, Any]] = (),
    credentials: grpc.ServerCredentials | None = None,
    extra: Callable[[grpc.aio.Server], None] | None = None,
) -> AsyncIterator[Served]:
    """A grpc.aio server for ``t.S`` (``methods``) on 127.0.0.1, stopped at the end."""
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", methods),))
    if extra is not None:
        extra(server)
    address = f"127.0.0.1:{port}"
    bound = (
        server.add_secure_port(address, credentials)
        if credentials is not None
        else server.add_insecure_port(address)
    )
    assert bound, f"cannot listen on {address}"
    await server.start()
    try:
        yield Served(server, bound)
    finally:
        await server.stop(0)


@pytest.fixture
async def open_channel() -> AsyncIterator[Callable[..., Channel]]:
    """Make channels; all are closed after the test."""
    channels: list[Channel] = []

    def make(target: str, **kwargs: Any) -> Channel:
        channel = Channel(target, **kwargs)
        channels.append(channel)
        return channel

    yield make
    for channel in channels:
        await channel.close()


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (for now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def rpc_error(call: Awaitable[Any]) -> RpcError:
    with pytest.raises(RpcError) as caught:
        await call
    return caught.value


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [item async for item in stream]


# --- unary calls, metadata, deadlines ------------------------------------------------------------------


async def test_unary_ok_with_metadata_and_deadline(open_channel: Callable[..., Channel]) -> None:
    seen: list[tuple[dict[str, Any], float | None]] = []

    async def handler(request: bytes, context: Context) -> bytes:
        seen.append((dict(context.invocation_metadata() or ()), context.time_remaining()))
        return b"reply to " + request

    async with serving({"M": unary(handler)}) as served:
        channel = open_channel(
            served.target, metadata=(("Authorization", "Bearer sk-test"), ("x-tenant", "acme"))
        )
        assert await channel.unary("/t.S/M", b"hello", timeout=5.0) == b"reply to hello"
        assert await channel.unary("/t.S/M", b"", timeout=None) == b"reply to "
        assert await channel.unary("/t.S/M", b"\x00\xff" * 10, timeout=0.5) == b"reply to " + b"\x00\xff" * 10
    (first, remaining), (second, no_deadline), (_, short) = seen
    for metadata in (first, second):
        assert metadata["authorization"] == "Bearer sk-test"  # keys are sent in lower case
        assert metadata["x-tenant"] == "acme"
    assert remaining is not None and 3.0 < remaining <= 5.0
    assert no_deadline is None
    assert short is not None and 0.0 < short <= 0.5


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux socket options")
async def test_a_vanished_server_is_noticed_by_the_kernel(open_channel: Callable[..., Channel]) -> None:
    async with serving({"M": unary(echo)}) as served:
        limits = GrpcChannelLimits(keepalive_idle_s=17, keepalive_probes=4, unacked_data_timeout_s=12.5)
        channel = open_channel(served.target, limits=limits)
        await channel.unary("/t.S/M", b"x", timeout=2.0)
        assert channel._conn is not None and channel._conn.transport is not None
        sock = channel._conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 17
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12_500


async def test_an_http1_server_is_named_as_not_grpc(open_channel: Callable[..., Channel]) -> None:
    async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(http1, "127.0.0.1", 0)
    async with server:
        channel = open_channel(f"127.0.0.1:{server.sockets[0].getsockname()[1]}")
        error = await rpc_error(channel.unary("/t.S/M", b"", timeout=2.0))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert "did not start with HTTP/2 SETTINGS (is the other end a gRPC endpoint" in error.details


async def test_project_protobuf_messages(open_channel: Callable[..., Channel]) -> None:
    class Servicer(pb_grpc.LLMServiceServicer):
        async def ChatCompletion(self, request: pb.ChatRequest, context: Context) -> pb.ChatResponse:
            return pb.ChatResponse(id="r1", model=request.model, content=request.messages[-1].content.upper())

        async def StreamingChat(
            self, request: pb.ChatRequest, context: Context
        ) -> AsyncIterator[pb.ChatChunk]:
            for word in request.messages[-1].content.split():
                yield pb.ChatChunk(id="r2", model=request.model, delta=word)

    request = pb.ChatRequest(model="demo", messages=[pb.ChatMessage(role="ROLE_USER", content="héllo wörld")])
    async with serving({}, extra=lambda s: pb_grpc.add_LLMServiceServicer_to_server(Servicer(), s)) as served:
        channel = open_channel(served.target)
        raw = await channel.unary(
            "/llmgateway.v1.LLMService/ChatCompletion", request.SerializeToString(), 2.0
        )
        reply = pb.ChatResponse.FromString(raw)
        assert (reply.id, reply.model, reply.content) == ("r1", "demo", "HÉLLO WÖRLD")
        chunks = await collect(
            channel.server_stream("/llmgateway.v1.LLMService/StreamingChat", request.SerializeToString(), 2.0)
        )
        assert [pb.ChatChunk.FromString(c).delta for c in chunks] == ["héllo", "wörld"]


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.NOT_FOUND, "no such model: demo"),
        (grpc.StatusCode.INVALID_ARGUMENT, "100% sure: temperature must be in [0, 2]"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "überlastet — 请稍后再试 🙂"),
        (grpc.StatusCode.PERMISSION_DENIED, "line one\nline two\ttab"),
        (grpc.StatusCode.UNAVAILABLE, ""),
    ],
    ids=["ascii", "percent-sign", "non-ascii", "control-characters", "no-details"],
)
async def test_abort_status_details_and_trailers(
    open_channel: Callable[..., Channel], code: grpc.StatusCode, details: str
) -> None:
    async def handler(request: bytes, context: Context) -> bytes:
        context.set_trailing_metadata((("retry-after", "30"), ("detail-bin", b"\x00\x01\xfe")))
        await context.abort(code, details)
        raise AssertionError("abort returned")

    async with serving({"M": unary(handler)}) as served:
        channel = open_channel(served.target)
        error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=2.0))
    assert error.code == code
    assert error.details == details
    trailers = dict(error.trailers)
    assert trailers["retry-after"] == "30"
    assert metadata_value("detail-bin", trailers["detail-bin"]) == b"\x00\x01\xfe"
    assert not any(key.startswith(("grpc-", ":")) for key, _ in error.trailers)


async def test_status_set_without_abort(open_channel: Callable[..., Channel]) -> None:
    async def handler(request: bytes, context: Context) -> bytes:
        context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
        context.set_details("précondition")
        return b""

    async def raises(request: bytes, context: Context) -> bytes:
        raise RuntimeError("boom")

    async with serving({"M": unary(handler), "Raise": unary(raises)}) as served:
        channel = open_channel(served.target)
        error = await rpc_error(channel.unary("/t.S/M", b"", timeout=2.0))
        assert (error.code, error.details) == (grpc.StatusCode.FAILED_PRECONDITION, "précondition")
        error = await rpc_error(channel.unary("/t.S/Raise", b"", timeout=2.0))
        assert error.code == grpc.StatusCode.UNKNOWN
        error = await rpc_error(channel.unary("/t.S/M", b"", timeout=2.0))  # the channel still works
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_unimplemented(open_channel: Callable[..., Channel]) -> None:
    async with serving({"M": unary(echo)}) as served:
        channel = open_channel(served.target)
        for path in ("/t.S/Nope", "/other.Service/M"):
            error = await rpc_error(channel.unary(path, b"x", timeout=2.0))
            assert error.code == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(RpcError) as caught:
            await collect(channel.server_stream("/t.S/Nope", b"x", timeout=2.0))
        assert caught.value.code == grpc.StatusCode.UNIMPLEMENTED
        assert await channel.unary("/t.S/M", b"ok", timeout=2.0) == b"ok"


async def test_unary_call_needs_exactly_one_response(open_channel: Callable[..., Channel]) -> None:
    async def two(request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield b"one"
        yield b"two"

    async def none(request: bytes, context: Context) -> AsyncIterator[bytes]:
        return
        yield b""

    async with serving({"Two": streaming(two), "None": streaming(none)}) as served:
        channel = open_channel(served.target)
        error = await rpc_error(channel.unary("/t.S/Two", b"", timeout=2.0))
        assert error.code == grpc.StatusCode.INTERNAL and "got 2" in error.details
        error = await rpc_error(channel.unary("/t.S/None", b"", timeout=2.0))
        assert error.code == grpc.StatusCode.INTERNAL and "got 0" in error.details


async def test_deadline_exceeded_cancels_the_handler(open_channel: Callable[..., Channel]) -> None:
    cancelled = asyncio.Event()

    async def slow(request: bytes, context: Context) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"too late"

    async with serving({"Slow": unary(slow), "M": unary(echo)}) as served:
        channel = open_channel(served.target)
        loop = asyncio.get_running_loop()
        started = loop.time()
        error = await rpc_error(channel.unary("/t.S/Slow", b"", timeout=0.2))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0.15 < loop.time() - started < 1.0
        await asyncio.wait_for(cancelled.wait(), 2.0)
        assert await channel.unary("/t.S/M", b"after", timeout=2.0) == b"after"


async def test_stream_deadline_after_some_messages(open_channel: Callable[..., Channel]) -> None:
    cancelled = asyncio.Event()

    async def trickle(request: bytes, context: Context) -> None:
        try:
            for i in range(3):
                await context.write(b"m%d" % i)
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving({"S": streaming(trickle)}) as served:
        channel = open_channel(served.target)
        received: list[bytes] = []
        with pytest.raises(RpcError) as caught:
            async for item in channel.server_stream("/t.S/S", b"", timeout=0.3):
                received.append(item)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert received == [b"m0", b"m1", b"m2"]
        await asyncio.wait_for(cancelled.wait(), 2.0)


# --- cancellation -------------------------------------------------------------------------------------


async def test_cancelling_the_awaiting_task_cancels_the_handler(open_channel: Callable[..., Channel]) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(request: bytes, context: Context) -> bytes:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"too late"

    async with serving({"Slow": unary(slow), "M": unary(echo)}) as served:
        channel = open_channel(served.target)
        task = asyncio.create_task(channel.unary("/t.S/Slow", b"", timeout=None))  # no deadline to help
        await asyncio.wait_for(started.wait(), 2.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(cancelled.wait(), 2.0)
        assert await channel.unary("/t.S/M", b"still here", timeout=2.0) == b"still here"


async def test_closing_a_stream_early_cancels_the_handler(open_channel: Callable[..., Channel]) -> None:
    cancelled = asyncio.Event()
    sent: list[int] = []

    async def endless(request: bytes, context: Context) -> None:
        try:
            for i in range(1000):  # bounded: 10 s at most
                await context.write(b"%d" % i)
                sent.append(i)
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with serving({"S": streaming(endless), "M": unary(echo)}) as served:
        channel = open_channel(served.target)
        stream = channel.server_stream("/t.S/S", b"", timeout=None)
        assert [await anext(stream) for _ in range(3)] == [b"0", b"1", b"2"]
        await stream.aclose()
        await asyncio.wait_for(cancelled.wait(), 2.0)
        assert len(sent) < 100
        # Cancelling a task that iterates a stream reaches the server too.
        cancelled.clear()
        got: list[bytes] = []

        async def reader() -> None:
            async for item in channel.server_stream("/t.S/S", b"", timeout=None):
                got.append(item)

        task = asyncio.create_task(reader())
        for _ in range(200):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(cancelled.wait(), 2.0)
        assert await channel.unary("/t.S/M", b"ok", timeout=2.0) == b"ok"


async def test_stream_ends_with_the_servers_error(open_channel: Callable[..., Channel]) -> None:
    async def failing(request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield b"first"
        yield b"second"
        await context.abort(grpc.StatusCode.ABORTED, "upstream went away — désolé")

    async with serving({"S": streaming(failing)}) as served:
        channel = open_channel(served.target)
        received: list[bytes] = []
        with pytest.raises(RpcError) as caught:
            async for item in channel.server_stream("/t.S/S", b"", timeout=2.0):
                received.append(item)
    assert received == [b"first", b"second"]
    assert caught.value.code == grpc.StatusCode.ABORTED
    assert caught.value.details == "upstream went away — désolé"


# --- streaming, flow control, message sizes -----------------------------------------------------------


async def test_server_stream_many_small_messages(open_channel: Callable[..., Channel]) -> None:
    async def numbers(request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    async with serving({"S": streaming(numbers)}) as served:
        channel = open_channel(served.target)
        received = await collect(channel.server_stream("/t.S/S", b"3000", timeout=5.0))
        assert received == [b"%d" % i for i in range(3000)]
        assert await collect(channel.server_stream("/t.S/S", b"0", timeout=2.0)) == []


async def test_server_stream_large_messages_beyond_the_windows(open_channel: Callable[..., Channel]) -> None:
    """40 messages of 200 KiB: 8 MB, beyond the server's 64 KiB windows and the channel's 4 MiB stream window."""
    count, size = 40, 200 * KIB

    async def large(request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(count):
            yield blob(i, size)

    async with serving({"S": streaming(large)}) as served:
        channel = open_channel(served.target)
        received: list[bytes] = []
        async for item in channel.server_stream("/t.S/S", b"", timeout=10.0):
            received.append(item)
            if len(received) % 10 == 0:
                await asyncio.sleep(0.02)  # a reader that pauses: the server must wait for the window
        assert len(received) == count
        for i, item in enumerate(received):
            assert item == blob(i, size), f"message {i} differs"
        # Two such streams at once share the connection's window.
        both = await asyncio.gather(
            collect(channel.server_stream("/t.S/S", b"", timeout=10.0)),
            collect(channel.server_stream("/t.S/S", b"", timeout=10.0)),
        )
        for stream in both:
            assert [len(m) for m in stream] == [size] * count
            assert stream[count - 1] == blob(count - 1, size)


async def test_large_unary_request_and_response(open_channel: Callable[..., Channel]) -> None:
    async def digest(request: bytes, context: Context) -> bytes:
        return request[::-1]

    request = blob(7, 1024 * KIB)
    async with serving({"M": unary(digest)}) as served:
        channel = open_channel(served.target)
        assert await channel.unary("/t.S/M", request, timeout=5.0) == request[::-1]
        requests = [blob(i, 300 * KIB) for i in range(5)]
        replies = await asyncio.gather(*(channel.unary("/t.S/M", r, timeout=5.0) for r in requests))
        assert replies == [r[::-1] for r in requests]


async def test_response_over_max_message_bytes(open_channel: Callable[..., Channel]) -> None:
    async def sized(request: bytes, context: Context) -> bytes:
        return b"x" * int(request)

    async def stream_sized(request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield b"small"
        yield b"y" * int(request)

    async with serving({"M": unary(sized), "S": streaming(stream_sized)}) as served:
        channel = open_channel(
            served.target, limits=GrpcChannelLimits(http2=HTTP2Limits(max_message_bytes=100 * KIB))
        )
        assert len(await channel.unary("/t.S/M", b"102400", timeout=2.0)) == 100 * KIB  # at the limit
        error = await rpc_error(channel.unary("/t.S/M", b"300000", timeout=2.0))
        assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "300000" in error.details and "102400" in error.details
        assert await channel.unary("/t.S/M", b"10", timeout=2.0) == b"x" * 10
        received: list[bytes] = []
        with pytest.raises(RpcError) as caught:
            async for item in channel.server_stream("/t.S/S", b"200000", timeout=2.0):
                received.append(item)
        assert received == [b"small"]
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "200000" in caught.value.details
        for _ in range(3):  # the connection's window got those bytes back
            assert len(await channel.unary("/t.S/M", b"100000", timeout=2.0)) == 100000


# --- connections: refused, reconnect, graceful stop, close ---------------------------------------------


async def test_connection_refused_then_reconnect(open_channel: Callable[..., Channel]) -> None:
    port = free_port()
    channel = open_channel(f"127.0.0.1:{port}", connect_timeout=1.0)
    error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=1.0))
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert f"cannot connect to 127.0.0.1:{port}" in error.details
    assert error.details.endswith("Connection refused")
    with pytest.raises(RpcError) as caught:
        await collect(channel.server_stream("/t.S/M", b"x", timeout=1.0))
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    async with serving({"M": unary(echo)}, port=port):
        assert await channel.unary("/t.S/M", b"now", timeout=2.0) == b"now"


async def test_graceful_stop_then_restart_on_the_same_port(open_channel: Callable[..., Channel]) -> None:
    started = asyncio.Event()

    async def slow(request: bytes, context: Context) -> bytes:
        started.set()
        await asyncio.sleep(0.3)
        return b"finished " + request

    methods = {"Slow": unary(slow), "M": unary(echo)}
    async with serving(methods) as served:
        channel = open_channel(served.target, connect_timeout=1.0)
        assert await channel.unary("/t.S/M", b"warm", timeout=2.0) == b"warm"
        call = asyncio.create_task(channel.unary("/t.S/Slow", b"in flight", timeout=3.0))
        await asyncio.wait_for(started.wait(), 2.0)
        await served.server.stop(2.0)  # GOAWAY; the call in flight finishes within the grace
        assert await call == b"finished in flight"
        error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=1.0))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        port = served.port
    async with serving(methods, port=port):
        for i in range(3):
            assert await channel.unary("/t.S/M", b"again %d" % i, timeout=2.0) == b"again %d" % i
        started.clear()
        call = asyncio.create_task(channel.unary("/t.S/Slow", b"second", timeout=3.0))
        await asyncio.wait_for(started.wait(), 2.0)
    # That server stopped with no grace: the call in flight fails, it does not hang.
    error = await rpc_error(asyncio.wait_for(call, 2.0))
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_close_fails_calls_in_flight_and_the_channel_reconnects(
    open_channel: Callable[..., Channel],
) -> None:
    started = asyncio.Event()

    async def slow(request: bytes, context: Context) -> bytes:
        started.set()
        await asyncio.sleep(10)
        return b""

    async with serving({"Slow": unary(slow), "M": unary(echo)}) as served:
        channel = open_channel(served.target)
        call = asyncio.create_task(channel.unary("/t.S/Slow", b"", timeout=5.0))
        await asyncio.wait_for(started.wait(), 2.0)
        await channel.close()
        error = await rpc_error(asyncio.wait_for(call, 2.0))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert await channel.unary("/t.S/M", b"reopened", timeout=2.0) == b"reopened"


@contextlib.asynccontextmanager
async def mute_server(greeting: bytes) -> AsyncIterator[int]:
    """Accepts connections, sends ``greeting``, then reads everything and answers nothing; yields the port."""
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        writer.write(greeting)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
        writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[1]
    finally:
        for writer in writers:
            writer.close()
        listener.close()
        await listener.wait_closed()


async def test_a_server_that_never_sends_its_settings(open_channel: Callable[..., Channel]) -> None:
    async with mute_server(b"") as port:
        loop = asyncio.get_running_loop()
        channel = open_channel(f"127.0.0.1:{port}", connect_timeout=0.5)
        started = loop.time()
        error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=0.2))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - started < 0.5
        error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=None))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.details == f"cannot connect to 127.0.0.1:{port}: no answer within 0.5s"
        assert loop.time() - started < 1.5


async def test_a_server_that_never_answers_nor_opens_its_windows(
    open_channel: Callable[..., Channel],
) -> None:
    """An HTTP/2 server (empty SETTINGS) that says nothing more: deadlines and cancellation still apply,
    while waiting for the response and while a large request waits for flow control."""
    async with mute_server(frame(SETTINGS, 0, 0)) as port:
        loop = asyncio.get_running_loop()
        channel = open_channel(f"127.0.0.1:{port}", connect_timeout=1.0)
        for request in (b"small", blob(1, 1024 * KIB)):
            started = loop.time()
            error = await rpc_error(channel.unary("/t.S/M", request, timeout=0.3))
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert loop.time() - started < 1.0
        started = loop.time()
        with pytest.raises(RpcError) as caught:
            await collect(channel.server_stream("/t.S/S", blob(2, 512 * KIB), timeout=0.3))
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert loop.time() - started < 1.0
        # Without a deadline, cancelling still ends a call stuck behind flow control.
        task = asyncio.create_task(channel.unary("/t.S/M", blob(3, 1024 * KIB), timeout=None))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 2.0)


# --- concurrency ----------------------------------------------------------------------------------------


async def test_many_concurrent_calls(open_channel: Callable[..., Channel]) -> None:
    async def echo_later(request: bytes, context: Context) -> bytes:
        await asyncio.sleep(0.001 * (int(request) % 5))
        return b"#" + request

    async def twice(request: bytes, context: Context) -> AsyncIterator[bytes]:
        yield request
        yield request

    async with serving({"M": unary(echo_later), "S": streaming(twice)}) as served:
        channel = open_channel(served.target)
        replies = await asyncio.gather(*(channel.unary("/t.S/M", b"%d" % i, timeout=5.0) for i in range(200)))
        assert replies == [b"#%d" % i for i in range(200)]
        streams = await asyncio.gather(
            *(collect(channel.server_stream("/t.S/S", b"%d" % i, timeout=5.0)) for i in range(50))
        )
        assert streams == [[b"%d" % i] * 2 for i in range(50)]


@pytest.mark.parametrize("warm", [False, True], ids=["fresh-channel", "warm-channel"])
async def test_max_concurrent_streams_is_honoured(open_channel: Callable[..., Channel], warm: bool) -> None:
    active, peak = 0, 0
    release = asyncio.Event()

    async def counted(request: bytes, context: Context) -> bytes:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            if request == b"hold":
                await asyncio.wait_for(release.wait(), 2.0)
            else:
                await asyncio.sleep(0.05)
        finally:
            active -= 1
        return b"done " + request

    async with serving({"M": unary(counted)}, options=[("grpc.max_concurrent_streams", 2)]) as served:
        channel = open_channel(served.target)
        if warm:
            assert await channel.unary("/t.S/M", b"warm", timeout=2.0) == b"done warm"
        replies = await asyncio.gather(*(channel.unary("/t.S/M", b"%d" % i, timeout=5.0) for i in range(10)))
        assert replies == [b"done %d" % i for i in range(10)]
        assert peak <= 2
        # A call that cannot get a stream slot within its deadline fails with DEADLINE_EXCEEDED.
        calls = [asyncio.create_task(channel.unary("/t.S/M", b"hold", timeout=5.0)) for _ in range(2)]
        for _ in range(200):
            if active == 2:
                break
            await asyncio.sleep(0.01)
        error = await rpc_error(channel.unary("/t.S/M", b"late", timeout=0.05))
        assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
        release.set()
        assert await asyncio.gather(*calls) == [b"done hold"] * 2


class RefusingServer:
    """A minimal HTTP/2 server: refuses the first ``refusals`` streams (RST_STREAM REFUSED_STREAM), then
    answers each call with one message, ``ok``. Counts the streams it saw."""

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.streams = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        writer.write(frame(SETTINGS, 0, 0))
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readexactly(len(PREFACE))
            while True:
                head = await reader.readexactly(9)
                await reader.readexactly(int.from_bytes(head[:3], "big"))
                kind, stream_id = head[3], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
                if kind != HEADERS:
                    continue
                self.streams += 1
                if self.streams <= self.refusals:
                    writer.write(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
                    continue
                writer.write(
                    frame(HEADERS, END_HEADERS, stream_id, encode_headers([(":status", "200")]))
                    + frame(DATA, 0, stream_id, message(b"ok"))
                    + frame(
                        HEADERS, END_HEADERS | END_STREAM, stream_id, encode_headers([("grpc-status", "0")])
                    )
                )
        writer.close()


@pytest.mark.parametrize("refusals", [0, 1, 4, 5])
async def test_refused_calls_are_sent_again(open_channel: Callable[..., Channel], refusals: int) -> None:
    """REFUSED_STREAM means the server did not process the call: the channel sends it again, 5 times at most."""
    refusing = RefusingServer(refusals)
    listener = await asyncio.start_server(refusing.serve, "127.0.0.1", 0)
    try:
        channel = open_channel(f"127.0.0.1:{listener.sockets[0].getsockname()[1]}")
        if refusals < 5:
            assert await channel.unary("/t.S/M", b"x", timeout=2.0) == b"ok"
            assert refusing.streams == refusals + 1
        else:
            error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=2.0))
            assert error.code == grpc.StatusCode.UNAVAILABLE and "refused" in error.details
            assert refusing.streams == 5
            refusing.refusals = refusing.streams + 100  # a deadline ends the retries too
            error = await rpc_error(channel.unary("/t.S/M", b"x", timeout=0.02))
            assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        for writer in refusing.writers:
            writer.close()
        listener.close()
        await listener.wait_closed()


# --- TLS ------------------------------------------------------------------------------------------------


async def test_tls(
    open_channel: Callable[..., Channel], certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    cert, key = certificate
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])

    async def stream_large(request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(10):
            yield blob(i, 100 * KIB)

    async with serving({"M": unary(echo), "S": streaming(stream_large)}, credentials=credentials) as served:
        # grpcio's TLS server wants ALPN h2, which the channel sets on the context it is given.
        trusting = open_channel(
            served.target, tls=True, ssl_context=ssl.create_default_context(cafile=str(cert))
        )
        assert await trusting.unary("/t.S/M", b"secret", timeout=2.0) == b"secret"
        assert await trusting.unary("/t.S/M", blob(5, 300 * KIB), timeout=2.0) == blob(5, 300 * KIB)
        received = await collect(trusting.server_stream("/t.S/S", b"", timeout=5.0))
        assert received == [blob(i, 100 * KIB) for i in range(10)]
        # The system's CAs do not know this certificate.
        untrusting = open_channel(served.target, tls=True, connect_timeout=2.0)
        error = await rpc_error(untrusting.unary("/t.S/M", b"x", timeout=2.0))
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert "certificate" in error.details.lower()
        # Plain HTTP/2 to a TLS port is not a gRPC answer.
        plain = open_channel(served.target, connect_timeout=1.0)
        error = await rpc_error(plain.unary("/t.S/M", b"x", timeout=1.0))
        assert error.code == grpc.StatusCode.UNAVAILABLE
