"""The gRPC front against hostile clients: each attack of the adversarial review, bounded in count and time.

Every test sends raw HTTP/2 frames (what grpcio's client never sends) and checks the refusal or the
GOAWAY with the code the limit promises, the limit counted through the server's ``on_limit``, the memory
the attack was about (RSS from /proc), and that an honest grpcio client served at the same time keeps
getting answers. The tests about admission slots, connections, descriptors and CPU run against a real
``llmgw proxy`` process and read its metrics (``llmgw_limit_hits_total``) and /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import pathlib
import random
import socket
import ssl
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import hpack
import pytest
from adversary import MEMORY_BOUND, HonestClient, cpu_seconds, limit_hits, open_fds, rss
from grpc_health.v1 import health_pb2

from conftest import Fakes, proxy_config
from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net.grpc_server import BIDI, SERVER_STREAM, UNARY, Method, Server, ServerCall
from llmgw._net.grpc_wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_CONCURRENT_STREAMS,
    MAX_WINDOW,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ErrorCode,
    encode_headers,
    frame,
    message,
    settings_frame,
    status_of,
    window_update,
)
from llmgw_common.limits import HTTP2Limits, MiB, parse_grpc_server
from llmgw_common.reader import ConfigError, Reader

Request = health_pb2.HealthCheckRequest
ECHO = "/t.S/Echo"
FLOOD = "/t.S/Flood"  # server streaming: 64 KiB messages for as long as the client reads them
LIMITED_FLOOD = "/t.S/LimitedFlood"  # the same, within a time limit of 1 s set by the handler
SERVICE = "/llmgateway.v1.LLMService"


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _indexed_literal(name: bytes, value: bytes) -> bytes:
    """A literal header added to the HPACK dynamic table (it becomes index 62)."""
    return b"\x40" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


def request_block(path: str = ECHO) -> bytes:
    return encode_headers(
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "127.0.0.1"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
    )


class Raw:
    """One attacking connection: raw frames out, frames in until a GOAWAY or the end."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(
        cls,
        port: int,
        preface: bool = True,
        rcvbuf: int | None = None,
        settings: dict[int, int] | None = None,
    ) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a client that does not read: the smaller its buffer, the sooner it shows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        if preface:
            writer.write(PREFACE + settings_frame(settings or {}))
        return cls(reader, writer)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def frames(self, timeout: float = 10.0) -> AsyncIterator[tuple[int, int, int, bytes]]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                head = await asyncio.wait_for(self.reader.readexactly(9), remaining)
                length = int.from_bytes(head[:3], "big")
                payload = await asyncio.wait_for(self.reader.readexactly(length), remaining)
            except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                return
            yield head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload

    async def goaway(self, timeout: float = 10.0) -> tuple[ErrorCode | None, bool]:
        """The code of the GOAWAY that arrives (None if none), and whether the connection then closed."""
        code = None
        async for kind, _, _, payload in self.frames(timeout):
            if kind == GOAWAY:
                code = ErrorCode(struct.unpack(">I", payload[4:8])[0])
                break
        try:
            await asyncio.wait_for(self.reader.read(), timeout)  # returns at the end of the connection
            closed = True
        except ConnectionError:
            closed = True
        except TimeoutError:
            closed = False
        return code, closed

    def close(self) -> None:
        self.writer.close()


class Honest(HonestClient):
    """A grpcio client calling Echo (or ``path`` with ``request``) all along: the attacks must not stop its
    answers."""

    latency_bound = None

    def __init__(self, port: int, path: str = ECHO, request: bytes | None = None) -> None:
        super().__init__()
        self.path = path
        self.request = request if request is not None else Request(service="hi").SerializeToString()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = self.channel.unary_unary(path)

    async def teardown(self) -> None:
        await self.channel.close()

    async def ask(self) -> str | None:
        try:
            reply = await self.call(self.request, timeout=5)
        except grpc.aio.AioRpcError as exc:
            return f"{exc.code()}: {exc.details()}"
        assert self.path != ECHO or Request.FromString(reply).service == "hi"
        return None


ServerFactory = Callable[..., Awaitable[tuple[int, list[str]]]]


@pytest.fixture
async def serve() -> AsyncIterator[ServerFactory]:
    """An in-process Server with Echo (unary) and Chat (bidi), made with the given limits; (port, hits)."""
    servers: list[Server] = []

    async def echo(request: Any, call: ServerCall) -> Any:
        return Request(service=request.service[:100])

    async def chat(requests: AsyncIterator[Any], call: ServerCall) -> AsyncIterator[Any]:
        async for request in requests:
            yield Request(service=str(len(request.service)))

    async def flood(request: Any, call: ServerCall) -> AsyncIterator[Any]:
        big = Request(service="x" * 65_536)
        while True:
            yield big

    async def limited_flood(request: Any, call: ServerCall) -> AsyncIterator[Any]:
        call.limit_time(1.0)  # as the LLMService front does with the request's time limit
        async for item in flood(request, call):
            yield item

    async def start(**limits: Any) -> tuple[int, list[str]]:
        hits: list[str] = []
        server = Server(
            {
                ECHO: Method(UNARY, Request, echo),
                "/t.S/Chat": Method(BIDI, Request, chat),
                FLOOD: Method(SERVER_STREAM, Request, flood),
                LIMITED_FLOOD: Method(SERVER_STREAM, Request, limited_flood),
            },
            HTTP2Limits(**{"max_message_bytes": MiB, **limits}),
            hits.append,
        )
        servers.append(server)
        return await server.start("127.0.0.1", 0), hits

    yield start
    for server in servers:
        await server.stop(0)


# --- 1. streams and headers -------------------------------------------------------------------------


async def test_hpack_amplified_streams_beyond_the_limit_are_refused_by_a_proxy_process(
    fakes: Fakes, proxy_process: Any
) -> None:
    """A 4 KB header in the HPACK table, then 4,000 streams that each name it 15 times and never end:
    SETTINGS_MAX_CONCURRENT_STREAMS is 100, the rest get REFUSED_STREAM, the proxy holds little."""
    proxy = proxy_process(proxy_config(fakes))
    await asyncio.to_thread(proxy.wait_ready)
    port, pid = proxy.grpc_port, proxy.proc.pid
    check = "/grpc.health.v1.Health/Check"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = channel.unary_unary(
            check,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        await health(health_pb2.HealthCheckRequest(), timeout=5)
        before = rss(pid)
        attacker = await Raw.connect(port)
        big = _indexed_literal(b"x-big", b"v" * 4000)
        block = request_block(check)
        attacker.send(frame(HEADERS, END_HEADERS, 1, block + big))
        streams = 4000
        for first in range(3, 2 * streams, 400):
            attacker.send(
                *(
                    frame(HEADERS, END_HEADERS, sid, block + b"\xbe" * 15)
                    for sid in range(first, first + 400, 2)
                )
            )
            await attacker.writer.drain()
        advertised, refused = None, 0
        async for kind, flags, _, payload in attacker.frames(20):
            if kind == SETTINGS and not flags & 1:
                advertised = dict(struct.iter_unpack(">HI", payload)).get(MAX_CONCURRENT_STREAMS)
            elif kind == RST_STREAM and struct.unpack(">I", payload)[0] == ErrorCode.REFUSED_STREAM:
                refused += 1
                if refused == streams + 1 - 100:  # stream 1 and 4,000 more, 100 of them held
                    break
            elif kind == GOAWAY:
                raise AssertionError(f"GOAWAY {payload!r}")
        assert advertised == 100 and refused == streams + 1 - 100
        answer = await health(health_pb2.HealthCheckRequest(), timeout=5)  # an honest client, meanwhile
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        grown = rss(pid) - before
        attacker.close()
    async with aiohttp.ClientSession() as session:
        metrics = await (await session.get(f"http://127.0.0.1:{proxy.admin_port}/metrics")).text()
    print(f"proxy RSS growth with 4000 amplified streams: {grown / MiB:.1f} MiB")
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"
    hit = [line for line in metrics.splitlines() if line.startswith("llmgw_limit_hits_total{")]
    assert hit == ['llmgw_limit_hits_total{limit="grpcServer.maxConcurrentStreams"} 3901.0'], hit


async def test_a_decoded_header_list_over_the_limit_ends_the_connection(serve: ServerFactory) -> None:
    """HPACK's amplification within one block: 20 references to a 4 KB entry decode to 80 KB > 64 KiB."""
    port, hits = await serve()
    async with Honest(port):
        attacker = await Raw.connect(port)
        block = request_block()
        attacker.send(
            frame(HEADERS, END_HEADERS, 1, block + _indexed_literal(b"x-big", b"v" * 4000)),
            frame(HEADERS, END_HEADERS, 3, block + b"\xbe" * 20),
        )
        code, closed = await attacker.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits == ["maxHeaderBlockBytes"]


# --- 2. compressed messages -------------------------------------------------------------------------


def _gzip_bomb(inflated: int) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"\0" * MiB
    out = [packer.compress(chunk) for _ in range(inflated // MiB)]
    return b"".join(out) + packer.flush()


async def test_a_gzip_bomb_is_refused_after_inflating_no_more_than_the_limit(serve: ServerFactory) -> None:
    port, hits = await serve()
    bomb = _gzip_bomb(100 * MiB)
    assert len(bomb) < 200_000
    async with Honest(port):
        before = rss()
        attacker = await Raw.connect(port)
        headers = request_block() + encode_headers([("grpc-encoding", "gzip")])
        for sid in range(1, 21, 2):  # ten of them
            attacker.send(
                frame(HEADERS, END_HEADERS, sid, headers),
                *(
                    frame(DATA, END_STREAM if end >= len(bomb) + 5 else 0, sid, chunk)
                    for end, chunk in _chunks(b"\x01" + struct.pack(">I", len(bomb)) + bomb)
                ),
            )
        statuses = []
        decoder = hpack.Decoder()
        async for kind, _, _, payload in attacker.frames():
            if kind == HEADERS:
                fields = dict(decoder.decode(payload))
                statuses.append((fields.get("grpc-status"), fields.get("grpc-message", "")))
                if len(statuses) == 10:
                    break
        grown = rss() - before
        attacker.close()
    print(f"RSS growth with ten 100 MiB gzip bombs: {grown / MiB:.1f} MiB")
    assert all(s == "8" and "decompressed" in m for s, m in statuses), statuses
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"
    assert hits.count("maxMessageBytes") == 10


def _chunks(data: bytes, size: int = 16_384) -> list[tuple[int, bytes]]:
    return [(i + size, data[i : i + size]) for i in range(0, len(data), size)]


async def test_window_credit_is_the_bytes_received_not_what_they_inflate_to(serve: ServerFactory) -> None:
    port, _ = await serve(connection_window_bytes=65_535, stream_window_bytes=65_535)
    attacker = await Raw.connect(port)
    attacker.send(
        frame(
            HEADERS, END_HEADERS, 1, request_block("/t.S/Chat") + encode_headers([("grpc-encoding", "gzip")])
        )
    )
    sent = 0
    for _ in range(60):
        body = gzip.compress(Request(service="a" * 400_000).SerializeToString())
        msg = b"\x01" + struct.pack(">I", len(body)) + body
        attacker.send(frame(DATA, 0, 1, msg))
        sent += len(msg)
    attacker.send(frame(DATA, END_STREAM, 1))
    credited, answers, initial = 0, 0, True
    async for kind, flags, sid, payload in attacker.frames():
        if kind == WINDOW_UPDATE and sid == 0:
            if initial:  # the server's preface: its window grows to hold its largest message
                initial = False
                continue
            credited += struct.unpack(">I", payload)[0]
        elif kind == DATA:
            answers += 1
        elif kind == HEADERS and flags & END_STREAM:
            break
    attacker.close()
    assert answers == 60
    assert credited <= sent, f"{credited} bytes credited for {sent} received"


# --- 3. floods ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["PING", "SETTINGS", "GOAWAY", "unknown"])
async def test_a_control_frame_flood_hits_the_rate_limit(serve: ServerFactory, kind: str) -> None:
    port, hits = await serve()
    flood = {
        "PING": frame(PING, 0, 0, b"12345678"),
        "SETTINGS": settings_frame({}),
        "GOAWAY": frame(GOAWAY, 0, 0, struct.pack(">II", 0, ErrorCode.PROTOCOL_ERROR)),  # logged, each one
        "unknown": frame(0xFA, 0, 0),
    }[kind]
    async with Honest(port):
        attacker = await Raw.connect(port)
        attacker.send(flood * 5000)
        code, closed = await attacker.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits == ["maxControlFramesPerSecond"]


async def test_a_client_that_never_reads_its_ping_acks_is_dropped(serve: ServerFactory) -> None:
    """With the rate limit out of the way, what is queued for a client that does not read stays bounded:
    the server stops reading from it once its answers back up, and drops it after the stall timeout (or
    sooner, past maxQueuedControlBytes)."""
    port, hits = await serve(max_control_frames_per_second=10**9, stalled_write_timeout_s=1)
    attacker = await Raw.connect(port, rcvbuf=4096)
    ping = frame(PING, 0, 0, b"12345678") * 10_000
    async with Honest(port):
        before = rss()
        started = time.monotonic()
        with contextlib.suppress(ConnectionError, TimeoutError):
            for _ in range(200):  # up to 34 MB of PINGs, and as many ACKs for the server to queue
                attacker.send(ping)
                await asyncio.wait_for(attacker.writer.drain(), 5)  # stuck once the server stops reading
                if hits:
                    break
        while not hits and time.monotonic() - started < 10:
            await asyncio.sleep(0.05)
        grown = rss() - before
    attacker.close()
    print(f"RSS growth with a PING flood that is never read: {grown / MiB:.1f} MiB")
    assert hits in (["maxQueuedControlBytes"], ["stalledWriteTimeoutSeconds"]), hits
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"


async def test_rapid_reset_ends_the_connection(serve: ServerFactory) -> None:
    port, hits = await serve()
    block = request_block()
    cancel = struct.pack(">I", ErrorCode.CANCEL)
    async with Honest(port):
        attacker = await Raw.connect(port)
        attacker.send(
            *(
                frame(HEADERS, END_HEADERS, s, block) + frame(RST_STREAM, 0, s, cancel)
                for s in range(1, 2001, 2)
            )
        )
        code, closed = await attacker.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits == ["maxResetsPerSecond"]


async def test_streams_opened_beyond_the_acknowledged_limit_count_as_resets(serve: ServerFactory) -> None:
    """A client that acknowledged SETTINGS_MAX_CONCURRENT_STREAMS and opens streams beyond it anyway makes
    the server refuse (reset) each: a rapid reset by other means, bounded by maxResetsPerSecond."""
    port, hits = await serve(max_concurrent_streams=10)
    async with Honest(port):
        attacker = await Raw.connect(port)
        attacker.send(
            frame(SETTINGS, 1, 0),
            *(frame(HEADERS, END_HEADERS, s, request_block()) for s in range(1, 2001, 2)),
        )
        code, closed = await attacker.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits[-1] == "maxResetsPerSecond" and 200 <= hits.count("maxConcurrentStreams") < 990, hits[-3:]


@pytest.mark.parametrize("kind", ["CONTINUATION", "DATA"])
async def test_endless_empty_frames_end_the_connection(serve: ServerFactory, kind: str) -> None:
    port, hits = await serve()
    attacker = await Raw.connect(port)
    if kind == "CONTINUATION":
        attacker.send(frame(HEADERS, 0, 1, request_block()), frame(CONTINUATION, 0, 1) * 10_000)
    else:
        attacker.send(frame(HEADERS, END_HEADERS, 1, request_block("/t.S/Chat")), frame(DATA, 0, 1) * 10_000)
    code, closed = await attacker.goaway()
    assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits == ["maxEmptyFrames"]


# --- 4. timeouts --------------------------------------------------------------------------------------


async def test_a_silent_connection_is_closed_after_the_preface_timeout(serve: ServerFactory) -> None:
    port, hits = await serve(preface_timeout_s=0.3)
    silent = await Raw.connect(port, preface=False)
    started = time.monotonic()
    code, closed = await silent.goaway(5)
    assert code == ErrorCode.PROTOCOL_ERROR and closed
    assert 0.25 < time.monotonic() - started < 3
    assert hits == ["prefaceTimeoutSeconds"]


async def test_a_silent_tls_connection_is_closed_after_the_preface_timeout(
    certificate: tuple[pathlib.Path, pathlib.Path],
) -> None:
    """No ClientHello: the TLS handshake gets the preface's time, not asyncio's 60 s."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = Server({}, HTTP2Limits(preface_timeout_s=0.3))
    port = await server.start("127.0.0.1", 0, context)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.25 < time.monotonic() - started < 3
        writer.close()
    finally:
        await server.stop(0)


async def test_an_idle_connection_gets_goaway_and_the_honest_client_reconnects(serve: ServerFactory) -> None:
    port, hits = await serve(idle_timeout_s=0.4)
    idle = await Raw.connect(port)
    started = time.monotonic()
    code, closed = await idle.goaway(5)
    assert code == ErrorCode.NO_ERROR and closed
    assert 0.35 < time.monotonic() - started < 3
    async with Honest(port):
        await asyncio.sleep(1.0)  # its connection goes idle between calls only briefly: it is not closed
    assert hits == ["idleTimeoutSeconds"]


def test_the_limits_are_read_from_the_proxy_configuration() -> None:
    keys = {
        "maxConcurrentStreams": 50,
        "maxQueuedControlBytes": 65_536,
        "maxControlFramesPerSecond": 100,
        "maxEmptyFrames": 3,
        "maxResetsPerSecond": 20,
        "prefaceTimeoutSeconds": 2.5,
        "idleTimeoutSeconds": 60,
        "maxWindowUpdatesPerSecond": 500,
        "stalledWriteTimeoutSeconds": 5,
        "maxConnections": 100,
        "requestReceiveTimeoutSeconds": 20,
    }
    parsed = parse_grpc_server(Reader(keys, "limits.grpcServer"), MiB)
    assert (
        parsed.max_concurrent_streams,
        parsed.max_queued_control_bytes,
        parsed.max_control_frames_per_second,
        parsed.max_empty_frames,
        parsed.max_resets_per_second,
        parsed.preface_timeout_s,
        parsed.idle_timeout_s,
        parsed.max_window_updates_per_second,
        parsed.stalled_write_timeout_s,
        parsed.max_connections,
        parsed.request_receive_timeout_s,
    ) == (50, 65_536, 100, 3, 20, 2.5, 60.0, 500, 5.0, 100, 20.0)
    assert parse_grpc_server(Reader({}, "limits.grpcServer"), MiB) == HTTP2Limits(max_message_bytes=MiB)
    for key, bad in [
        ("maxConcurrentStreams", 0),
        ("maxWindowUpdatesPerSecond", 5),
        ("stalledWriteTimeoutSeconds", 0),
        ("maxConnections", 0),
        ("requestReceiveTimeoutSeconds", -1),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_grpc_server(Reader({key: bad}, "limits.grpcServer"), MiB)


# --- 5. the rest of the review: stalled writes and requests, connections, floods, malformed input ------


def chat_request(model: str = "rest-only") -> bytes:
    return pb.ChatRequest(
        model=model, messages=[pb.ChatMessage(role=pb.ROLE_USER, content="hello")]
    ).SerializeToString()


async def statuses(raw: Raw, count: int, timeout: float = 10.0) -> dict[int, tuple[str, str]]:
    """(grpc-status, grpc-message) of the first ``count`` streams that end with one."""
    decoder = hpack.Decoder()
    out: dict[int, tuple[str, str]] = {}
    async for kind, _, sid, payload in raw.frames(timeout):
        if kind == HEADERS:
            fields = dict(decoder.decode(payload))
            if "grpc-status" in fields:
                out[sid] = (fields["grpc-status"], fields.get("grpc-message", ""))
                if len(out) == count:
                    break
        elif kind == GOAWAY:
            raise AssertionError(f"GOAWAY {payload!r}")
    return out


async def start(proxy_process: Any, fakes: Fakes, **limits: Any) -> Any:
    proxy = proxy_process(proxy_config(fakes, limits=limits))
    await asyncio.to_thread(proxy.wait_ready)
    return proxy


async def test_a_client_that_stops_reading_gives_back_its_calls_and_admission_slots(
    fakes: Fakes, proxy_process: Any
) -> None:
    """Streams whose client opens no window (SETTINGS_INITIAL_WINDOW_SIZE 0) hold every admission slot
    only until stalledWriteTimeoutSeconds: then they end with RESOURCE_EXHAUSTED and an honest call is
    answered again."""
    proxy = await start(
        proxy_process, fakes, maxConcurrentRequests=4, grpcServer={"stalledWriteTimeoutSeconds": 2}
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        chat = channel.unary_unary(f"{SERVICE}/ChatCompletion")
        await chat(chat_request(), timeout=5)
        before = rss(proxy.proc.pid)
        attacker = await Raw.connect(proxy.grpc_port, settings={INITIAL_WINDOW_SIZE: 0})
        started = time.monotonic()
        attacker.send(
            *(
                frame(HEADERS, END_HEADERS, sid, request_block(f"{SERVICE}/StreamingChat"))
                + frame(DATA, END_STREAM, sid, message(chat_request()))
                for sid in (1, 3, 5, 7)
            )
        )
        answering = set()  # the response headers of a stream: its handler has its slot and a chunk
        async for kind, _, sid, _ in attacker.frames(5):
            answering |= {sid} if kind == HEADERS else set()
            if len(answering) == 4:
                break
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the four stalled streams hold the slots
            await chat(chat_request(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        ended = await statuses(attacker, 4)
        released = time.monotonic() - started
        assert sorted(ended) == [1, 3, 5, 7]
        assert all(code == "8" and "read none of the response" in text for code, text in ended.values()), (
            ended
        )
        await chat(chat_request(), timeout=5)  # the slots are back
        grown = rss(proxy.proc.pid) - before
        attacker.close()
    print(f"stalled streams released after {released:.2f} s (timeout 2 s), RSS growth {grown / MiB:.1f} MiB")
    assert 1.9 < released < 5
    assert grown < MEMORY_BOUND
    assert (await limit_hits(proxy.admin_port, "grpcServer")).get("stalledWriteTimeoutSeconds") == 4


async def test_a_stream_read_just_fast_enough_ends_at_the_servers_time_limit(serve: ServerFactory) -> None:
    """A client that reads a message every 0.2 s never stalls a write, yet the stream is endless: the
    handler's time limit (``ServerCall.limit_time``, which the LLMService front sets to the request's time
    limit) ends it with DEADLINE_EXCEEDED, the writes blocked on flow control included; a caller's earlier
    deadline is kept."""
    port, _ = await serve()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        started = time.monotonic()
        stream = channel.unary_stream(LIMITED_FLOOD)(Request(service="hi").SerializeToString())
        read = 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stream:
                read += 1
                assert time.monotonic() - started < 20, "the stream did not end"
                if time.monotonic() - started < 3:
                    await asyncio.sleep(0.2)  # slowly past the limit; then what grpcio had buffered, at once
        took = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and 0.9 < took < 10, (info.value, took)
        assert read < 400, read  # about 1 s of writing and grpcio's buffer: the stream ended
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in channel.unary_stream(LIMITED_FLOOD)(b"", timeout=0.4):
                await asyncio.sleep(0.1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 0.9


async def test_a_client_that_trickles_its_window_is_reset(serve: ServerFactory) -> None:
    """100 bytes of window every 0.1 s: a stream must get a frame's worth (16 KiB) per stall timeout."""
    port, hits = await serve(stalled_write_timeout_s=0.5)
    attacker = await Raw.connect(port, settings={INITIAL_WINDOW_SIZE: 0})
    attacker.send(
        frame(HEADERS, END_HEADERS, 1, request_block(FLOOD)), frame(DATA, END_STREAM, 1, message(b""))
    )
    started = time.monotonic()
    reset = None
    async with Honest(port):
        while reset is None and time.monotonic() - started < 10:
            attacker.send(window_update(1, 100))
            async for kind, _, sid, payload in attacker.frames(0.1):
                if kind == RST_STREAM and sid == 1:
                    reset = ErrorCode(struct.unpack(">I", payload)[0])
                    break
        elapsed = time.monotonic() - started
    attacker.close()
    assert reset == ErrorCode.CANCEL  # within a message: no status can follow
    assert 0.4 < elapsed < 3, elapsed
    assert hits == ["stalledWriteTimeoutSeconds"]


async def test_a_client_that_reads_nothing_at_all_is_disconnected(serve: ServerFactory) -> None:
    """Windows wide open, but the socket is never read: the write buffer stays full, the connection goes."""
    port, hits = await serve(stalled_write_timeout_s=0.5)
    attacker = await Raw.connect(port, rcvbuf=4096, settings={INITIAL_WINDOW_SIZE: MAX_WINDOW})
    attacker.send(
        window_update(0, MAX_WINDOW - 65_535),
        frame(HEADERS, END_HEADERS, 1, request_block(FLOOD)),
        frame(DATA, END_STREAM, 1, message(b"")),
    )
    started = time.monotonic()
    async with Honest(port):
        before = rss()
        while not hits and time.monotonic() - started < 10:
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        grown = rss() - before
    attacker.close()
    assert hits == ["stalledWriteTimeoutSeconds"]
    assert 0.4 < elapsed < 3, elapsed
    assert grown < MEMORY_BOUND


async def test_a_client_that_opens_no_connection_window_is_disconnected(serve: ServerFactory) -> None:
    """Stream windows open, the connection's never refilled: nothing can be sent on it any more."""
    port, hits = await serve(stalled_write_timeout_s=0.5)
    attacker = await Raw.connect(port, settings={INITIAL_WINDOW_SIZE: MAX_WINDOW})
    attacker.send(
        frame(HEADERS, END_HEADERS, 1, request_block(FLOOD)), frame(DATA, END_STREAM, 1, message(b""))
    )
    started = time.monotonic()
    async with Honest(port):
        code, closed = await attacker.goaway()
        elapsed = time.monotonic() - started
    assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert 0.4 < elapsed < 3, elapsed
    assert hits == ["stalledWriteTimeoutSeconds"]


async def test_connections_beyond_max_connections_are_closed_at_once(
    fakes: Fakes, proxy_process: Any
) -> None:
    """100 silent connections against a cap of 16: the ones beyond it get GOAWAY and are closed, the
    process's file descriptors stay bounded, and a connection is accepted again once others went."""
    proxy = await start(proxy_process, fakes, grpcServer={"maxConnections": 16})
    pid = proxy.proc.pid
    async with Honest(proxy.grpc_port, f"{SERVICE}/ChatCompletion", chat_request()) as honest:
        while not honest.answers:  # its connection is one of the 16
            await asyncio.sleep(0.02)
        fds = open_fds(pid)
        attackers = [await Raw.connect(proxy.grpc_port, preface=False) for _ in range(100)]
        outcomes = await asyncio.gather(*(a.goaway(1.5) for a in attackers))
        held = open_fds(pid) - fds
        refused = sum(1 for code, closed in outcomes if code == ErrorCode.ENHANCE_YOUR_CALM and closed)
        for attacker in attackers:
            attacker.close()
        await asyncio.sleep(0.3)
    assert 84 <= refused <= 85, refused  # 16 less the honest client's connection (grpcio may open one)
    assert held <= 16, held
    assert (await limit_hits(proxy.admin_port, "grpcServer")).get("maxConnections") == refused
    again = await Raw.connect(proxy.grpc_port)
    again.send(frame(PING, 0, 0, b"12345678"))
    answer = None
    async for kind, flags, _, _ in again.frames(5):
        if kind == GOAWAY or (kind == PING and flags & 1):
            answer = kind
            break
    again.close()
    assert answer == PING


async def test_a_request_that_never_completes_is_ended_and_its_data_released(
    fakes: Fakes, proxy_process: Any
) -> None:
    """Ten calls that send 1 MiB of a 2 MiB message and stop: DEADLINE_EXCEEDED after
    requestReceiveTimeoutSeconds, and the 10 MiB they held return to the connection's window."""
    proxy = await start(proxy_process, fakes, grpcServer={"requestReceiveTimeoutSeconds": 0.5})
    pid = proxy.proc.pid
    async with Honest(proxy.grpc_port, f"{SERVICE}/ChatCompletion", chat_request()):
        before = rss(pid)
        attacker = await Raw.connect(proxy.grpc_port)
        part = b"\x00" + struct.pack(">I", 2 * MiB) + b"x" * (MiB - 5)
        for sid in range(1, 21, 2):
            attacker.send(
                frame(HEADERS, END_HEADERS, sid, request_block(f"{SERVICE}/ChatCompletion")),
                *(frame(DATA, 0, sid, chunk) for _, chunk in _chunks(part)),
            )
            await attacker.writer.drain()
        started = time.monotonic()
        grown = rss(pid) - before
        decoder = hpack.Decoder()
        ended: dict[int, str] = {}
        credited, initial = 0, True
        async for kind, _, sid, payload in attacker.frames(10):
            if kind == HEADERS:
                ended[sid] = dict(decoder.decode(payload)).get("grpc-status", "")
            elif kind == WINDOW_UPDATE and sid == 0:
                if initial:
                    initial = False
                    continue
                credited += struct.unpack(">I", payload)[0]
            if len(ended) == 10 and credited >= 8 * MiB:
                break
        elapsed = time.monotonic() - started
        attacker.close()
    print(
        f"RSS growth with 10 MiB of unfinished requests: {grown / MiB:.1f} MiB; ended after {elapsed:.2f} s"
    )
    assert ended == {sid: "4" for sid in range(1, 21, 2)}, ended
    assert credited >= 8 * MiB, credited  # back in quarter-window batches: 8 of the 10 MiB so far
    assert elapsed < 3
    assert grown < MEMORY_BOUND
    assert (await limit_hits(proxy.admin_port, "grpcServer")).get("requestReceiveTimeoutSeconds") == 10


async def test_a_bidirectional_message_that_never_completes_ends_the_call(serve: ServerFactory) -> None:
    """Between messages a bidirectional call may wait; a message begun must end within the timeout."""
    port, hits = await serve(request_receive_timeout_s=0.3)
    attacker = await Raw.connect(port)
    attacker.send(
        frame(HEADERS, END_HEADERS, 1, request_block("/t.S/Chat")),
        frame(DATA, 0, 1, message(Request(service="abc").SerializeToString())),
    )
    async for kind, _, _, _ in attacker.frames(5):
        if kind == DATA:  # the first message's answer
            break
    await asyncio.sleep(0.5)  # idle between messages: allowed
    assert hits == []
    started = time.monotonic()
    attacker.send(frame(DATA, 0, 1, b"\x00" + struct.pack(">I", 1000) + b"x" * 10))
    ended = await statuses(attacker, 1)
    elapsed = time.monotonic() - started
    attacker.close()
    assert ended[1][0] == "4" and "a request message did not arrive" in ended[1][1], ended
    assert 0.25 < elapsed < 3, elapsed
    assert hits == ["requestReceiveTimeoutSeconds"]


async def test_window_update_floods_end_the_connection(serve: ServerFactory) -> None:
    port, hits = await serve()
    async with Honest(port):
        attacker = await Raw.connect(port)
        attacker.send(window_update(0, 1) * 5000)
        code, closed = await attacker.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
        # zero increments on streams make the server reset them: counted as the client's own resets
        zero = await Raw.connect(port)
        zero.send(
            *(
                frame(HEADERS, END_HEADERS, s, request_block("/t.S/Chat")) + window_update(s, 0)
                for s in range(1, 1001, 2)
            )
        )
        code, closed = await zero.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits == ["maxWindowUpdatesPerSecond", "maxResetsPerSecond"]


async def test_a_reader_that_opens_windows_as_it_reads_is_not_a_window_update_flood(
    serve: ServerFactory,
) -> None:
    """A WINDOW_UPDATE for every DATA frame, far beyond maxWindowUpdatesPerSecond: the stream goes on."""
    port, hits = await serve(max_window_updates_per_second=10)
    reader = await Raw.connect(port)
    reader.send(
        frame(HEADERS, END_HEADERS, 1, request_block(FLOOD)), frame(DATA, END_STREAM, 1, message(b""))
    )
    frames = 0
    async for kind, _, sid, payload in reader.frames(10):
        if kind == DATA:
            frames += 1
            reader.send(window_update(0, len(payload)), window_update(sid, len(payload)))
            if frames == 500:
                break
        elif kind == GOAWAY:
            raise AssertionError(f"GOAWAY {payload!r}")
    reader.close()
    assert frames == 500 and hits == [], (frames, hits)


async def test_settings_do_not_wake_every_open_stream(fakes: Fakes, proxy_process: Any) -> None:
    """20,000 empty SETTINGS with 4,000 streams open (limits raised for it) cost the proxy little CPU."""
    proxy = await start(
        proxy_process,
        fakes,
        grpcServer={"maxConcurrentStreams": 5000, "maxControlFramesPerSecond": 1_000_000},
    )
    pid = proxy.proc.pid
    attacker = await Raw.connect(proxy.grpc_port)
    block = request_block(f"{SERVICE}/ChatCompletion")
    for first in range(1, 8001, 800):
        attacker.send(*(frame(HEADERS, END_HEADERS, s, block) for s in range(first, first + 800, 2)))
        await attacker.writer.drain()
    attacker.send(frame(PING, 0, 0, b"opened!!"))
    async for kind, _, _, payload in attacker.frames(10):
        if kind == PING and payload == b"opened!!":
            break
    cpu = cpu_seconds(pid)
    attacker.send(settings_frame({}) * 20_000, frame(PING, 0, 0, b"settled!"))
    acks = 0
    async for kind, flags, _, payload in attacker.frames(20):
        acks += kind == SETTINGS and flags & 1
        if kind == PING and payload == b"settled!":
            break
    spent = cpu_seconds(pid) - cpu
    attacker.close()
    print(f"proxy CPU for 20,000 SETTINGS with 4,000 streams open: {spent:.2f} s")
    assert acks >= 20_000
    assert spent < 1.0, spent


async def test_corrupt_compressed_messages_fail_the_call_only(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    port, hits = await serve()
    good = Request(service="hi").SerializeToString()
    truncated = gzip.compress(good)[:-6]
    gz = encode_headers([("grpc-encoding", "gzip")])
    attacker = await Raw.connect(port)
    attacker.send(
        frame(HEADERS, END_HEADERS, 1, request_block() + gz),
        frame(DATA, END_STREAM, 1, b"\x01" + struct.pack(">I", 11) + b"not gzip!!!"),
        frame(HEADERS, END_HEADERS, 3, request_block() + gz),
        frame(DATA, END_STREAM, 3, b"\x01" + struct.pack(">I", len(truncated)) + truncated),
        frame(HEADERS, END_HEADERS, 5, request_block()),  # no grpc-encoding
        frame(DATA, END_STREAM, 5, b"\x01" + struct.pack(">I", 2) + b"xx"),
        frame(HEADERS, END_HEADERS, 7, request_block() + encode_headers([("grpc-encoding", "br")])),
        frame(DATA, END_STREAM, 7, message(good)),
        frame(HEADERS, END_HEADERS, 9, request_block() + gz),
        frame(
            DATA, END_STREAM, 9, b"\x01" + struct.pack(">I", len(gzip.compress(good))) + gzip.compress(good)
        ),
    )
    ended = await statuses(attacker, 5)
    attacker.close()
    assert ended[1][0] == "13" and "not valid gzip" in ended[1][1], ended
    assert ended[3][0] == "13" and "gzip" in ended[3][1], ended
    assert ended[5][0] == "13" and "without grpc-encoding" in ended[5][1], ended
    assert ended[7][0] == "12" and "'br'" in ended[7][1], ended
    assert ended[9] == ("0", "")  # the same connection goes on
    assert hits == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_malformed_frames_never_raise_an_unhandled_exception(
    serve: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Seeded random frames, mutated from valid ones, on 30 connections: connection and stream errors
    only, never a traceback, and the honest client keeps its answers."""
    port, _ = await serve(max_control_frames_per_second=10**6, max_resets_per_second=10**6)
    rng = random.Random(11)
    good = message(Request(service="hi").SerializeToString())
    blocks = [request_block(), request_block("/t.S/Chat"), request_block(FLOOD), b"\x82\x86\x84", b"\xff" * 8]

    def payload() -> bytes:
        choice = rng.randrange(6)
        if choice == 0:
            return rng.choice(blocks)
        if choice == 1:
            return good
        if choice == 2:
            return b"\x01" + struct.pack(">I", 20) + rng.randbytes(20)
        if choice == 3:
            return bytes([rng.randrange(256)]) + rng.choice(blocks)  # a pad length or priority in front
        return rng.randbytes(rng.randrange(0, 40))

    async with Honest(port):
        for _ in range(30):
            attacker = await Raw.connect(port, settings={INITIAL_WINDOW_SIZE: rng.randrange(0, 70_000)})
            for _ in range(100):
                attacker.send(
                    frame(
                        rng.randrange(11),
                        rng.randrange(256),
                        rng.choice((0, 1, 3, 5, 7, 2**31 - 1)),
                        payload(),
                    )
                )
            attacker.send(frame(PING, 0, 0, b"finished"))
            async for kind, _, _, data in attacker.frames(2):
                if kind == PING and data == b"finished":
                    break
            attacker.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, "\n".join(r.getMessage() for r in errors)


async def test_a_message_larger_than_4_mib_is_received_when_the_limit_allows_it(
    fakes: Fakes, proxy_process: Any
) -> None:
    """maxRequestBytes 8 MiB: a 6 MiB request message arrives (the windows hold a whole message)."""
    proxy = await start(proxy_process, fakes, maxRequestBytes=8 * MiB)
    field = 6 * MiB
    # ListModelsRequest with a 6 MiB unknown field 15 (length-delimited): parsed and ignored
    body = bytes([15 << 3 | 2]) + _varint(field) + b"m" * field
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        models = await channel.unary_unary(f"{SERVICE}/ListModels")(body, timeout=10)
    assert pb.ListModelsResponse.FromString(models).models


async def test_the_largest_allowed_message_is_received_with_the_default_windows(serve: ServerFactory) -> None:
    port, _ = await serve(max_message_bytes=4 * MiB)
    request = Request(service="a" * (4 * MiB - 10))
    assert len(request.SerializeToString()) <= 4 * MiB
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(ECHO, Request.SerializeToString, Request.FromString)
        assert (await echo(request, timeout=10)).service == "a" * 100


async def test_a_client_that_ignores_flow_control_cannot_fill_memory(serve: ServerFactory) -> None:
    """60 MiB on one stream whose window is 4 MiB: RST_STREAM FLOW_CONTROL_ERROR; complete messages that
    are never consumed beyond the connection's window: GOAWAY FLOW_CONTROL_ERROR."""
    port, hits = await serve(max_message_bytes=4 * MiB)
    async with Honest(port):
        before = rss()
        attacker = await Raw.connect(port)
        attacker.send(frame(HEADERS, END_HEADERS, 1, request_block()))
        chunk = message(b"y" * (MiB - 100))
        for _ in range(60):
            attacker.send(*(frame(DATA, 0, 1, c) for _, c in _chunks(chunk)))
            await attacker.writer.drain()
        reset = None
        async for kind, _, sid, payload in attacker.frames(5):
            if kind == RST_STREAM and sid == 1:
                reset = ErrorCode(struct.unpack(">I", payload)[0])
                break
        grown = rss() - before
        attacker.close()
        assert reset == ErrorCode.FLOW_CONTROL_ERROR
        # five calls, each one whole 3.9 MiB message and no end: nothing consumes them, 16 MiB is the end
        attacker = await Raw.connect(port)
        whole = message(b"z" * (4 * MiB - 100_000))
        for sid in range(1, 11, 2):
            attacker.send(
                frame(HEADERS, END_HEADERS, sid, request_block()),
                *(frame(DATA, 0, sid, c) for _, c in _chunks(whole)),
            )
        with contextlib.suppress(ConnectionError):
            await attacker.writer.drain()
        # the GOAWAY FLOW_CONTROL_ERROR may be lost to the reset of a connection closed with data unread
        code, closed = await attacker.goaway()
    print(f"RSS growth with 60 MiB sent beyond a stream's window: {grown / MiB:.1f} MiB")
    assert code in (ErrorCode.FLOW_CONTROL_ERROR, None) and closed
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"
    assert hits == ["streamWindowBytes", "connectionWindowBytes"]


async def test_large_messages_of_concurrent_calls_do_not_jam_the_connection(serve: ServerFactory) -> None:
    """grpcio interleaves the messages of concurrent calls: six of 3.5 MiB fit in the 16 MiB window, twelve
    fill it with unfinished messages, and the largest are ended (RESOURCE_EXHAUSTED) instead of waiting
    for their deadline."""
    port, hits = await serve(max_message_bytes=4 * MiB)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(ECHO, Request.SerializeToString, Request.FromString)
        big = Request(service="a" * (7 * MiB // 2))
        assert all(
            r.service == "a" * 100 for r in await asyncio.gather(*(echo(big, timeout=20) for _ in range(6)))
        )
        started = time.monotonic()
        results = await asyncio.gather(*(echo(big, timeout=20) for _ in range(12)), return_exceptions=True)
        elapsed = time.monotonic() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    assert all(
        isinstance(f, grpc.aio.AioRpcError)
        and f.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and "filled the connection's window" in (f.details() or "")
        for f in failures
    ), failures
    assert len(failures) < 12 and elapsed < 10, (len(failures), elapsed)
    assert hits == ["connectionWindowBytes"] * len(failures)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def test_a_grpc_status_that_is_not_a_number_reads_as_unknown() -> None:
    assert status_of([("grpc-status", "ok"), ("grpc-message", "fine")]) == (
        grpc.StatusCode.UNKNOWN,
        "the server sent grpc-status 'ok', which is not a gRPC status code: fine",
    )
    assert status_of([("grpc-status", "99")])[0] == grpc.StatusCode.UNKNOWN
    assert status_of([("grpc-status", "²")])[0] == grpc.StatusCode.UNKNOWN  # a digit to str.isdigit only
    assert status_of([("grpc-status", "5"), ("grpc-message", "gone")]) == (grpc.StatusCode.NOT_FOUND, "gone")
