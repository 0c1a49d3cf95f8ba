"""The proxy against hostile upstreams, and its secrets kept out of what it says.

Small malicious upstreams of the tests' own on 127.0.0.1 (raw asyncio servers for REST, a raw HTTP/2
server for gRPC) answer what no honest provider would: 60,000 header fields, a 64 MiB SSE line without a
newline, error bodies and gRPC statuses echoing the provider key, ``Retry-After: inf``, a grpc-status that
is not a number, a malformed or enormous Content-Length, a message over ``maxMessageBytes``. One real
``llmgw proxy`` process at ``--log-level debug`` sits in front of them and of an honest fake provider; each
hostile call must fail promptly with a clear error naming the provider (never its address, never a key,
never a traceback), the proxy's memory must stay bounded, the limit must be counted in
``llmgw_limit_hits_total``, and the honest provider's requests must keep being answered meanwhile.
In-process tests hold the HTTP/1.1 client, the SSE reader, Retry-After, the redaction and the new
configuration keys to their contracts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import hpack
import orjson
import pytest
from adversary import MEMORY_BOUND, HonestClient, limit_hits, rss

from conftest import ProxyProcess
from llmgateway.v1 import llm_service_pb2 as pb
from llmgateway.v1 import llm_service_pb2_grpc as pb_grpc
from llmgw import redact
from llmgw._net import grpc_channel, http_client
from llmgw._net.grpc_wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PING,
    PREFACE,
    SETTINGS,
    encode_headers,
    frame,
    message,
    settings_frame,
)
from llmgw.codecs import retry_after, sse
from llmgw.errors import GatewayError, Kind
from llmgw_common.limits import (
    GrpcChannelLimits,
    HTTPClientLimits,
    MiB,
    parse_grpc_channel,
    parse_http_client,
)
from llmgw_common.reader import ConfigError, Reader
from llmgw_dev.fakes import FakeProvider

PROVIDER_KEY = "sk-hostile-provider-key-5b2f8e0a91c4"
CLIENT_KEY = "llmgw-client-key-7c1e93b2d4aa"
ROUNDS = 5  # of the attacks on the REST client's bounds
USER = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- the hostile REST upstream -------------------------------------------------------------------------

Writer = asyncio.StreamWriter


async def _flood(writer: Writer, piece: bytes, count: int) -> None:
    """Write ``piece`` ``count`` times, stopping when the proxy hangs up."""
    for _ in range(count):
        writer.write(piece)
        await writer.drain()


def _sse_chunk(content: str) -> bytes:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _response(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _answer_rest(model: str, key: str, reader: asyncio.StreamReader, writer: Writer) -> None:
    """What the hostile REST upstream answers, by the model the proxy asked for."""
    if model == "rest-many-headers":  # 60,000 header fields, repeated names (the quadratic merge)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        await _flood(writer, b"".join(b"X-Repeated: %d\r\n" % i for i in range(1000)), 60)
        writer.write(b"Content-Length: 2\r\n\r\n{}")
    elif model == "rest-huge-header":  # one header value that never ends
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        await _flood(writer, b"a" * 65536, 256)
    elif model == "rest-sse-line":  # 64 MiB of one SSE line without a newline
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: ")
        await _flood(writer, b"a" * 65536, 1024)
        writer.close()
    elif model == "rest-echo-400":
        body = {"error": {"message": f"Incorrect API key provided: {key}", "type": "invalid_request_error"}}
        writer.write(_response("400 Bad Request", orjson.dumps(body), "Content-Type: application/json"))
    elif model == "rest-echo-500":  # not JSON; the key straddles the 200th character
        writer.write(_response("500 Oops", ("x" * 185 + f" saw {key}").encode(), "Content-Type: text/plain"))
    elif model == "rest-echo-stream":  # a token, then an error event echoing the key
        body = (
            _sse_chunk("hi") + b"data: " + orjson.dumps({"error": {"message": f"key {key} failed"}}) + b"\n\n"
        )
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body
        )
        writer.close()
    elif model == "claude-echo-stream":
        error = {"type": "error", "error": {"type": "api_error", "message": f"bad x-api-key {key}"}}
        body = b"event: error\ndata: " + orjson.dumps(error) + b"\n\n"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body
        )
        writer.close()
    elif model == "rest-retry-inf":
        body = orjson.dumps({"error": {"message": "slow down"}})
        writer.write(_response("429 Too Many Requests", body, "Retry-After: inf", "Retry-After-Ms: 1e400"))
    elif model == "rest-bad-length":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: abc\r\n\r\n{}")
    elif model == "rest-huge-length":  # says 100 GB, sends one byte, holds the connection
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{"
        )
        await asyncio.wait_for(reader.read(), 10)
    else:
        writer.write(_response("404 Not Found", b"{}"))


async def _serve_rest(reader: asyncio.StreamReader, writer: Writer) -> None:
    try:
        while not writer.is_closing():
            head = await reader.readuntil(b"\r\n\r\n")
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                fields[name.strip().lower().decode()] = value.strip().decode()
            body = await reader.readexactly(int(fields.get("content-length", "0")))
            key = fields.get("authorization") or fields.get("x-api-key", "")
            await _answer_rest(orjson.loads(body)["model"], key, reader, writer)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError):
        pass
    finally:
        writer.close()


# --- the hostile gRPC upstream (raw HTTP/2: grpcio would refuse to send a bad grpc-status) --------------

_RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]


def _answer_grpc(model: str, key: str, sid: int) -> bytes:
    if model == "grpc-bad-status":
        return frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            sid,
            encode_headers([*_RESPONSE_HEADERS, ("grpc-status", "abc")]),
        )
    if model == "grpc-echo":
        trailers = [*_RESPONSE_HEADERS, ("grpc-status", "3"), ("grpc-message", f"invalid key {key}")]
        return frame(HEADERS, END_HEADERS | END_STREAM, sid, encode_headers(trailers))
    if model == "grpc-retry-inf":
        trailers = [
            *_RESPONSE_HEADERS,
            ("grpc-status", "8"),
            ("grpc-message", "slow"),
            ("retry-after", "inf"),
        ]
        return frame(HEADERS, END_HEADERS | END_STREAM, sid, encode_headers(trailers))
    if model == "grpc-stream-echo":  # a token, then UNAVAILABLE echoing the key
        chunk = message(pb.ChatChunk(delta="hi").SerializeToString())
        trailers = [("grpc-status", "14"), ("grpc-message", f"lost after {key}")]
        return (
            frame(HEADERS, END_HEADERS, sid, encode_headers(_RESPONSE_HEADERS))
            + frame(DATA, 0, sid, chunk)
            + frame(HEADERS, END_HEADERS | END_STREAM, sid, encode_headers(trailers))
        )
    if model == "grpc-big":  # announces an 80 MiB message, over maxMessageBytes (64 MiB)
        announced = b"\x00" + (80 * MiB).to_bytes(4, "big") + b"x" * 1000
        return frame(HEADERS, END_HEADERS, sid, encode_headers(_RESPONSE_HEADERS)) + frame(
            DATA, 0, sid, announced
        )
    if model == "grpc-huge-headers":  # a 200 KiB header block in CONTINUATION frames
        block = encode_headers([*_RESPONSE_HEADERS, ("x-big", "a" * 200_000)])
        pieces = [block[i : i + 16384] for i in range(0, len(block), 16384)]
        frames = [frame(HEADERS if i == 0 else CONTINUATION, 0, sid, piece) for i, piece in enumerate(pieces)]
        return b"".join(frames[:-1]) + frame(CONTINUATION, END_HEADERS, sid, pieces[-1])
    return frame(
        HEADERS, END_HEADERS | END_STREAM, sid, encode_headers([*_RESPONSE_HEADERS, ("grpc-status", "12")])
    )


async def _serve_grpc(reader: asyncio.StreamReader, writer: Writer) -> None:
    decoder = hpack.Decoder()
    writer.write(settings_frame({}))
    calls: dict[int, tuple[dict[str, str], bytearray]] = {}
    try:
        await reader.readexactly(len(PREFACE))
        while True:
            head = await reader.readexactly(9)
            kind, flags = head[3], head[4]
            sid = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
            if kind == SETTINGS and not flags & ACK:
                writer.write(frame(SETTINGS, ACK, 0))
            elif kind == PING and not flags & ACK:
                writer.write(frame(PING, ACK, 0, payload))
            elif kind == HEADERS:
                calls[sid] = ({str(k): str(v) for k, v in decoder.decode(payload)}, bytearray())
            elif kind == DATA and sid in calls:
                calls[sid][1].extend(payload)
                if flags & END_STREAM:
                    headers, body = calls.pop(sid)
                    request = pb.ChatRequest.FromString(bytes(body[5:]))
                    writer.write(_answer_grpc(request.model, headers.get("authorization", ""), sid))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def listening(handler: Callable[[asyncio.StreamReader, Writer], Awaitable[None]]) -> AsyncIterator[int]:
    """A server on 127.0.0.1 (its port); connections still open at the end are cancelled."""
    tasks: set[asyncio.Task[Any]] = set()

    async def serve(reader: asyncio.StreamReader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            writer.close()
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- the proxy process in front of them ----------------------------------------------------------------


def _hostile_config(honest: str, rest_port: int, grpc_port: int, closed_port: int) -> dict[str, Any]:
    once = {"maxAttempts": 1, "initialBackoffSeconds": 0.01, "maxBackoffSeconds": 0.05}
    key = {"env": "HOSTILE_KEY"}
    return {
        "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "auth": {"apiKeysEnv": "CLIENT_KEYS"},
        "shutdown": {"drainSeconds": 1},
        "providers": [
            {"name": "honest", "openai": {"baseURL": honest}},
            {"name": "evil-rest", "openai": {"baseURL": f"http://127.0.0.1:{rest_port}/v1"}, "apiKey": key,
             "retries": once, "timeoutSeconds": 15},
            {"name": "evil-claude", "anthropic": {"baseURL": f"http://127.0.0.1:{rest_port}"}, "apiKey": key,
             "retries": once},
            {"name": "evil-grpc", "llmgateway": {"target": f"127.0.0.1:{grpc_port}"}, "apiKey": key,
             "retries": once},
            {"name": "down-rest", "openai": {"baseURL": f"http://127.0.0.1:{closed_port}/v1"}, "retries": once},
            {"name": "down-grpc", "llmgateway": {"target": f"127.0.0.1:{closed_port}"}, "retries": once},
        ],
        "routes": [
            {"model": "honest", "rest": "honest", "upstreamModel": "demo-model"},
            {"model": "rest-*", "rest": "evil-rest"},
            {"model": "claude-*", "rest": "evil-claude"},
            {"model": "grpc-*", "grpc": "evil-grpc"},
            {"model": "down-rest", "rest": "down-rest"},
            {"model": "down-grpc", "grpc": "down-grpc"},
        ],
    }  # fmt: skip


class Honest(HonestClient):
    """Requests to the honest provider all along; the slowest answer is what the attacks cost it."""

    pause = 0.05
    latency_bound = None  # the test bounds it

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        super().__init__()
        self.session, self.url = session, url

    async def ask(self) -> str | None:
        resp = await self.session.post(
            self.url,
            json={"model": "honest", "messages": USER},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
        await resp.read()
        return None if resp.status == 200 else str(resp.status)


async def test_hostile_upstreams_against_a_proxy_process(proxy_process: Callable[..., ProxyProcess]) -> None:
    closed_port = free_port()
    async with (
        FakeProvider("openai") as honest_fake,
        listening(_serve_rest) as rest_port,
        listening(_serve_grpc) as grpc_port,
        aiohttp.ClientSession() as session,
    ):
        proxy = proxy_process(
            _hostile_config(honest_fake.base_url, rest_port, grpc_port, closed_port),
            env={"HOSTILE_KEY": PROVIDER_KEY, "CLIENT_KEYS": CLIENT_KEY, "LLMGW_LOG_LEVEL": "debug"},
        )
        await asyncio.to_thread(proxy.wait_ready)
        url = f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions"
        auth = {"Authorization": f"Bearer {CLIENT_KEY}"}
        answers: list[str] = []

        async def call(model: str, stream: bool = False) -> tuple[int, str, float]:
            start = time.monotonic()
            resp = await session.post(
                url, json={"model": model, "messages": USER, "stream": stream}, headers=auth
            )
            text = (await resp.read()).decode("utf-8", "replace")
            answers.append(text)
            return resp.status, text, time.monotonic() - start

        for _ in range(5):  # warm up: the allocations of the first requests are no attack's doing
            assert (await call("honest"))[0] == 200
        before = rss(proxy.proc.pid)

        async with Honest(session, url) as honest:
            heavy = [("rest-many-headers", False), ("rest-huge-header", False), ("rest-sse-line", True)]
            for _ in range(ROUNDS):  # each round: the three at once, beside the honest requests
                results = await asyncio.gather(*(call(model, stream) for model, stream in heavy))
                for (model, _), (status, text, took) in zip(heavy, results, strict=True):
                    assert (
                        status == 502
                        and "provider 'evil-rest' sent a response over the gateway's limit" in text
                    ), text
                    assert took < 5, (model, took)
            answered_during_attacks = honest.answers
            grown = rss(proxy.proc.pid) - before

            status, text, _ = await call("rest-echo-400")
            assert status == 400 and "Incorrect API key provided: Bearer [redacted]" in text, text
            status, text, _ = await call("rest-echo-500")
            assert status == 502 and "provider 'evil-rest' answered HTTP 500" in text, text
            status, text, _ = await call("rest-echo-stream", stream=True)
            assert status == 200 and '"content":"hi"' in text and "key Bearer [redacted] failed" in text, text
            status, text, _ = await call("claude-echo-stream", stream=True)
            assert status == 502 and "bad x-api-key [redacted]" in text, text
            status, text, _ = await call("grpc-echo")
            assert status == 400 and "invalid key Bearer [redacted]" in text, text
            status, text, _ = await call("grpc-stream-echo", stream=True)
            assert '"content":"hi"' in text and "lost after Bearer [redacted]" in text, text

            status, text, _ = await call("rest-retry-inf")
            assert status == 429 and "slow down" in text, text
            status, text, _ = await call("grpc-retry-inf")
            assert status == 429, text
            status, text, _ = await call("grpc-bad-status")
            assert status == 502 and "grpc-status 'abc', which is not a gRPC status code" in text, text
            status, text, _ = await call("rest-bad-length")
            assert status == 502 and "provider 'evil-rest' sent a malformed response" in text, text
            status, text, took = await call("rest-huge-length")
            assert status == 502 and "limits.restClient.maxResponseBytes" in text and took < 5, text
            status, text, _ = await call("grpc-big")
            assert status == 502 and "limits.grpcClient.maxMessageBytes" in text, text
            status, text, _ = await call("grpc-huge-headers")
            assert status == 502 and "limits.grpcClient.maxHeaderBlockBytes" in text, text
            assert "the provider" in text and f"127.0.0.1:{grpc_port}" not in text, text

            status, text, _ = await call("down-rest")
            assert status == 503 and "provider 'down-rest' is unreachable: Connection refused" in text, text
            status, text, _ = await call("down-grpc")
            assert (
                status == 502
                and "'down-grpc' failed with UNAVAILABLE: cannot connect to the provider" in text
            )

            # the gRPC front: the client's key goes through HPACK, which logs every header at DEBUG
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
                stub = pb_grpc.LLMServiceStub(channel)
                request = pb.ChatRequest(
                    model="grpc-echo", messages=[pb.ChatMessage(role=pb.ROLE_USER, content="x")]
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.ChatCompletion(request, metadata=(("authorization", f"Bearer {CLIENT_KEY}"),))
                assert (
                    caught.value.details()
                    == "provider 'evil-grpc' failed with INVALID_ARGUMENT: invalid key Bearer [redacted]"
                )
            for _ in range(100):  # and one more answer after them
                if honest.answers > answered_during_attacks:
                    break
                await asyncio.sleep(0.02)
            answered_after = honest.answers - answered_during_attacks

        hits = await limit_hits(proxy.admin_port)
        proxy.terminate()
        await asyncio.to_thread(proxy.proc.wait, 15)

    output = proxy.output()
    print(
        f"RSS growth {grown / MiB:.1f} MiB; honest answers {answered_during_attacks}, slowest {honest.slowest:.3f}s"
    )
    assert grown < MEMORY_BOUND, grown
    assert answered_during_attacks >= 1 and answered_after >= 1 and not honest.failures, honest.failures
    assert honest.slowest < 2.0, honest.slowest
    assert hits.get("restClient.maxResponseHeaders") == ROUNDS, hits
    assert hits.get("restClient.maxResponseHeaderBytes") == ROUNDS, hits
    assert hits.get("restClient.maxSSEEventBytes") == ROUNDS, hits
    assert hits.get("restClient.maxResponseBytes") == 1, hits
    assert hits.get("grpcClient.maxMessageBytes") == 1, hits
    assert hits.get("grpcClient.maxHeaderBlockBytes") == 1, hits
    for text in [*answers, output]:
        for secret in (PROVIDER_KEY, CLIENT_KEY):
            assert secret not in text and secret[6:] not in text
    for text in answers:
        assert f"127.0.0.1:{closed_port}" not in text and f"127.0.0.1:{rest_port}" not in text
    assert f"127.0.0.1:{closed_port}" in output  # the log keeps the address
    assert (
        "'evil-rest' sent an unreadable Retry-After (retry-after-ms='1e400' retry-after='inf')" in output
    ), [line for line in output.splitlines() if "llmgw.providers" in line]
    assert "'evil-grpc' sent an unreadable Retry-After (retry-after='inf')" in output
    assert "Traceback" not in output, output[-3000:]


# --- the HTTP/1.1 client against hostile servers, in process -------------------------------------------


def _client(port: int, hits: list[str], **limits: Any) -> http_client.HTTPClient:
    return http_client.HTTPClient(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        {},
        max_connections=4,
        connect_timeout=2.0,
        limits=HTTPClientLimits(**limits),
        on_limit=hits.append,
    )


def _serving(answer: bytes, then: Callable[[Writer], Awaitable[None]] | None = None) -> Any:
    async def handler(reader: asyncio.StreamReader, writer: Writer) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer)
            await writer.drain()
            if then is not None:
                await then(writer)
            await asyncio.wait_for(reader.read(), 5)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return listening(handler)


@pytest.mark.parametrize(
    ("answer", "then", "limit"),
    [
        (b"HTTP/1.1 200 OK\r\n", lambda w: _flood(w, b"X-A: 1\r\n" * 1000, 60), "maxResponseHeaders"),
        (b"HTTP/1.1 200 OK\r\nX-Big: ", lambda w: _flood(w, b"a" * 65536, 64), "maxResponseHeaderBytes"),
        (b"", lambda w: _flood(w, b"HTTP/1.1 103 Early Hints\r\n\r\n" * 1000, 100), "maxResponseHeaderBytes"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: ",
            lambda w: _flood(w, b"a" * 65536, 64),
            "maxResponseHeaderBytes",
        ),
    ],
    ids=["60000-headers", "endless-header", "endless-interim-responses", "endless-trailer"],
)
async def test_response_heads_are_bounded_as_they_arrive(
    answer: bytes, then: Callable[[Writer], Awaitable[None]], limit: str
) -> None:
    hits: list[str] = []
    async with _serving(answer, then) as port:
        client = _client(port, hits)
        start = time.monotonic()
        with pytest.raises(http_client.LimitExceeded) as caught:
            resp = await client.post(b"{}", 10)
            await resp.read(MiB)
        assert time.monotonic() - start < 2
        assert caught.value.limit == limit and hits == [limit]
        assert client.open_connections == 0  # dropped, never reused
        await client.close()


async def test_repeated_headers_merge_in_linear_time() -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Repeated: v\r\n" * 20_000 + b"Content-Length: 2\r\n\r\n{}"
    async with _serving(head) as port:
        client = _client(port, [], max_response_headers=30_000, max_response_header_bytes=2 * MiB)
        start = time.monotonic()
        resp = await client.post(b"{}", 10)
        assert await resp.read() == b"{}"
        assert time.monotonic() - start < 1.0
        assert resp.headers["x-repeated"] == ", ".join(["v"] * 20_000)
        await client.close()


async def test_a_line_without_end_is_bounded_in_memory_and_time() -> None:
    hits: list[str] = []

    async def long_line(writer: Writer) -> None:
        await _flood(writer, b"a" * 65536, 1024)  # 64 MiB

    async with _serving(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndata: ", long_line) as port:
        client = _client(port, hits, max_sse_event_bytes=MiB)
        start = time.monotonic()
        resp = await client.post(b"{}", 10)
        with pytest.raises(http_client.LimitExceeded, match="exceeds 1048576 bytes"):
            async for _ in resp.lines():
                pass
        assert time.monotonic() - start < 2 and hits == ["maxSSEEventBytes"]
        await client.close()


async def test_a_declared_length_over_the_limit_fails_at_once() -> None:
    hits: list[str] = []
    async with _serving(b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n{") as port:
        client = _client(port, hits)
        resp = await client.post(b"{}", 10)
        with pytest.raises(http_client.LimitExceeded):
            await asyncio.wait_for(resp.read(1024, "maxErrorBodyBytes"), 2)
        assert hits == ["maxErrorBodyBytes"]
        await client.close()


async def test_sse_events_are_bounded() -> None:
    async def lines(*items: bytes) -> AsyncIterator[bytes]:
        for item in items:
            yield item

    events = [e async for e in sse.sse_events(lines(b"event: a\n", b"data: 1\n", b"data: 2\n", b"\n"), 10)]
    assert events == [("a", b"1\n2")]
    with pytest.raises(sse.EventTooLarge, match="exceeds 10 bytes"):
        async for _ in sse.sse_events(lines(*[b"data: 12345\n"] * 3), 10):
            pass


# --- the gRPC channel: maxMessageBytes on the receive side -----------------------------------------------


async def test_channel_receives_messages_up_to_max_message_bytes_beyond_the_window() -> None:
    big = b"x" * (5 * MiB)  # more than the 4 MiB stream window

    async def handler(request: bytes, context: Any) -> bytes:
        return big if request == b"big" else b"x" * (3 * MiB)

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for size in (5 * MiB, 100, 6 * MiB, 5 * MiB):
            yield b"y" * size

    server = grpc.aio.server()
    generic = grpc.method_handlers_generic_handler(
        "t.S",
        {
            "M": grpc.unary_unary_rpc_method_handler(handler),
            "S": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    hits: list[str] = []
    try:
        channel = grpc_channel.Channel(f"127.0.0.1:{port}", on_limit=hits.append)
        for _ in range(3):  # the windows stay right: no double credit, no stall
            assert await channel.unary("/t.S/M", b"big", timeout=5) == big
            sizes = [len(m) async for m in channel.server_stream("/t.S/S", b"", timeout=5)]
            assert sizes == [5 * MiB, 100, 6 * MiB, 5 * MiB]
        await channel.close()
        limits = parse_grpc_channel(Reader({"maxMessageBytes": 4 * MiB}, "limits.grpcClient"))
        channel = grpc_channel.Channel(f"127.0.0.1:{port}", limits=limits, on_limit=hits.append)
        with pytest.raises(grpc_channel.LimitExceeded) as caught:
            await channel.unary("/t.S/M", b"big", timeout=5)
        assert (
            caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and caught.value.limit == "maxMessageBytes"
        )
        assert await channel.unary("/t.S/M", b"small", timeout=5) == b"x" * (3 * MiB)  # the connection lives
        assert hits == ["maxMessageBytes"]
        await channel.close()
    finally:
        await server.stop(None)


async def test_a_cancelled_stream_gives_back_its_bytes_once() -> None:
    """Bytes of a message still arriving are given back to the windows early; when the call is cancelled
    with that message incomplete, only the rest is given back (a second credit would let the server send
    more than the connection window allows)."""

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"y" * (5 * MiB)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.S", {"S": grpc.unary_stream_rpc_method_handler(stream)}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc_channel.Channel(f"127.0.0.1:{port}")
    try:
        for _ in range(6):  # whether a message is partly received when the call ends varies with timing
            replies = channel.server_stream("/t.S/S", b"", timeout=5)
            assert len(await anext(replies)) == 5 * MiB
            await asyncio.sleep(0.05)  # the next message is on its way, partly credited
            await replies.aclose()
            conn = channel._conn
            assert conn is not None
            assert 0 <= conn._held <= conn.connection_window, conn._held
    finally:
        await channel.close()
        await server.stop(None)


# --- values that do not parse, redaction, configuration keys -----------------------------------------------


def test_retry_after_values_that_do_not_parse_are_absent() -> None:
    for value in (
        "inf",
        "-inf",
        "nan",
        "1e400",
        "1e3",
        "-5",
        "garbage",
        "0x10",
        "1_000",
        "\u0661",
        "9" * 400,
        "864000",
    ):
        assert retry_after.seconds(value) is None, value
    assert retry_after.seconds(" 30 ") == 30.0 and retry_after.seconds("0.5") == 0.5
    assert retry_after.from_headers({"retry-after-ms": "inf", "retry-after": "2"}) == 2.0
    assert retry_after.from_headers({"retry-after-ms": "1500"}) == 1.5
    assert retry_after.seconds("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0


def test_configured_keys_are_redacted_from_messages_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-redact-test/5d1f9a0b7c3e"
    redact.add_secrets([key, ""])
    assert redact.redact(f"Bearer {key}!") == "Bearer [redacted]!"
    assert redact.redact('{"k": "sk-redact-test\\/5d1f9a0b7c3e"}') == '{"k": "[redacted]"}'  # JSON-escaped
    assert GatewayError(Kind.BAD_GATEWAY, f"upstream said {key}").message == "upstream said [redacted]"
    assert (
        redact.redact_log_text("(b'authorization', b'Bearer unknown-key-1')")
        == "(b'authorization', b'[redacted]')"
    )
    assert redact.redact_log_text("x-api-key: other-key-2") == "x-api-key: [redacted]"
    assert (
        redact.redact_log_text("malformed Authorization header: expected")
        == "malformed Authorization header: expected"
    )

    logger = logging.getLogger("test.redact")
    handler = logging.StreamHandler()
    records: list[str] = []
    handler.emit = lambda record: records.append(handler.format(record))  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        redact.install_log_filter(logger)
        try:
            raise RuntimeError(f"failed with {key}")
        except RuntimeError:
            logger.error("upstream %s said %r", "p", key, exc_info=True)
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1 and key not in records[0] and "[redacted]" in records[0]
    assert "RuntimeError: failed with [redacted]" in records[0]
    assert logging.getLogger("hpack").getEffectiveLevel() == logging.WARNING


def test_rest_client_limit_keys() -> None:
    assert parse_http_client(Reader({}, "")) == HTTPClientLimits()
    d = HTTPClientLimits()
    assert (d.max_response_header_bytes, d.max_response_headers, d.max_sse_event_bytes) == (
        64 * 1024,
        100,
        MiB,
    )
    parsed = parse_http_client(
        Reader({"maxResponseHeaderBytes": 8192, "maxResponseHeaders": 50, "maxSSEEventBytes": 4096}, "")
    )
    assert (parsed.max_response_header_bytes, parsed.max_response_headers, parsed.max_sse_event_bytes) == (
        8192,
        50,
        4096,
    )
    for key, value, expected in (
        (
            "maxResponseHeaderBytes",
            100,
            "limits.restClient.maxResponseHeaderBytes: must be an integer from 1024",
        ),
        ("maxResponseHeaders", 0, "limits.restClient.maxResponseHeaders: must be an integer from 8 to 10000"),
        ("maxSSEEventBytes", 2**40, "limits.restClient.maxSSEEventBytes: must be an integer from 1024"),
        ("maxResponseHeaders", "many", "limits.restClient.maxResponseHeaders: must be an integer"),
    ):
        with pytest.raises(ConfigError, match=expected):
            parse_http_client(Reader({key: value}, "limits.restClient"))
    assert parse_grpc_channel(Reader({}, "")) == GrpcChannelLimits()
