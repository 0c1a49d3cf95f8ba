"""The gRPC front against hostile clients: each attack of the adversarial review, bounded in count and time.

Every test sends raw HTTP/2 frames (what grpcio's client never sends) and checks the refusal or the
GOAWAY with the code the limit promises, the limit counted through the server's ``on_limit``, the memory
the attack was about (RSS from /proc), and that an honest grpcio client served at the same time keeps
getting answers. One test runs against a real ``llmgw proxy`` process and reads its metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2

from conftest import Fakes, proxy_config
from llmgw._net.grpc_server import BIDI, UNARY, Method, Server, ServerCall
from llmgw._net.grpc_wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_CONCURRENT_STREAMS,
    PING,
    PREFACE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ErrorCode,
    encode_headers,
    frame,
    settings_frame,
)
from llmgw_common.limits import HTTP2Limits, MiB, parse_grpc_server
from llmgw_common.reader import ConfigError, Reader

Request = health_pb2.HealthCheckRequest
MEMORY_BOUND = 64 * MiB
ECHO = "/t.S/Echo"


def rss(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


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
    async def connect(cls, port: int, preface: bool = True, rcvbuf: int | None = None) -> Raw:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a client that does not read: the smaller its buffer, the sooner it shows
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        if preface:
            writer.write(PREFACE + settings_frame({}))
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
            except (asyncio.IncompleteReadError, ConnectionError):
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


class Honest:
    """A grpcio client calling Echo all along: the attacks must not stop its answers."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers = 0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Honest:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            echo = channel.unary_unary(
                ECHO, request_serializer=Request.SerializeToString, response_deserializer=Request.FromString
            )
            while True:
                try:
                    reply = await echo(Request(service="hi"), timeout=5)
                    assert reply.service == "hi"
                    self.answers += 1
                except grpc.aio.AioRpcError as exc:
                    self.failures.append(f"{exc.code()}: {exc.details()}")
                await asyncio.sleep(0.02)

    async def __aexit__(self, *exc: object) -> None:
        before = self.answers
        for _ in range(200):  # one more answer, after the attack
            if self.answers > before:
                break
            await asyncio.sleep(0.025)
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        assert self.answers > before, f"the honest client got no answer after the attack: {self.failures}"
        assert not self.failures, self.failures


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

    async def start(**limits: Any) -> tuple[int, list[str]]:
        hits: list[str] = []
        server = Server(
            {ECHO: Method(UNARY, Request, echo), "/t.S/Chat": Method(BIDI, Request, chat)},
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
    hit = [line for line in metrics.splitlines() if line.startswith('llmgw_limit_hits_total{limit="max')]
    assert hit == ['llmgw_limit_hits_total{limit="maxConcurrentStreams"} 3901.0'], hit


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


@pytest.mark.parametrize("kind", ["PING", "SETTINGS"])
async def test_a_control_frame_flood_hits_the_rate_limit(serve: ServerFactory, kind: str) -> None:
    port, hits = await serve()
    flood = frame(PING, 0, 0, b"12345678") if kind == "PING" else settings_frame({})
    async with Honest(port):
        attacker = await Raw.connect(port)
        attacker.send(flood * 5000)
        code, closed = await attacker.goaway()
        assert code == ErrorCode.ENHANCE_YOUR_CALM and closed
    assert hits == ["maxControlFramesPerSecond"]


async def test_a_client_that_never_reads_its_ping_acks_is_dropped(serve: ServerFactory) -> None:
    """With the rate limit out of the way, what is queued for a client that does not read stays bounded."""
    port, hits = await serve(max_control_frames_per_second=10**9)
    attacker = await Raw.connect(port, rcvbuf=4096)
    ping = frame(PING, 0, 0, b"12345678") * 10_000
    async with Honest(port):
        before = rss()
        with contextlib.suppress(ConnectionError):
            for _ in range(200):  # up to 34 MB of PINGs, and as many ACKs for the server to queue
                attacker.send(ping)
                await asyncio.wait_for(attacker.writer.drain(), 5)
                if hits:
                    break
        grown = rss() - before
    attacker.close()
    print(f"RSS growth with a PING flood that is never read: {grown / MiB:.1f} MiB")
    assert hits == ["maxQueuedControlBytes"]
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
    ) == (50, 65_536, 100, 3, 20, 2.5, 60.0)
    assert parse_grpc_server(Reader({}, "limits.grpcServer"), MiB) == HTTP2Limits(max_message_bytes=MiB)
    with pytest.raises(ConfigError, match="maxConcurrentStreams"):
        parse_grpc_server(Reader({"maxConcurrentStreams": 0}, "limits.grpcServer"), MiB)
