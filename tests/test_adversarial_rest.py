"""The REST front against hostile clients: each attack of the adversarial review, bounded in count and time.

Every test runs a real ``llmgw proxy`` process on 127.0.0.1 in front of the fake providers, attacks its REST
port with raw sockets, and checks the refusal the limit promises, the limit counted in
``llmgw_limit_hits_total{limit="restServer.<key>"}`` on the admin port, the proxy's memory (RSS from /proc),
that the slot or connection comes back within its timeout, and that an honest client served at the same time
keeps getting answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import re
import resource
import socket
import ssl
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from adversary import MEMORY_BOUND, HonestClient, limit_hits, open_fds, rss

from conftest import Fakes, proxy_config
from llmgw_common.limits import HTTPServerLimits, MiB, parse_http_server
from llmgw_common.reader import ConfigError, Reader
from llmgw_dev.fakes import FakeProvider

USER = [{"role": "user", "content": "hello"}]


async def connect(port: int, rcvbuf: int | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # a client that does not read: the smaller its buffer, the sooner it shows
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def flood(writer: asyncio.StreamWriter, chunk: bytes, total: int, stall: float = 0.5) -> int:
    """Send ``chunk`` until ``total`` bytes went out, the peer stops reading (a drain waits ``stall``
    seconds) or the connection ends; the bytes sent."""
    sent = 0
    with contextlib.suppress(ConnectionError, TimeoutError):
        while sent < total:
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), stall)
    return sent


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes | None:
    """What arrives before the end of the connection, or None if it is still open after ``seconds``."""
    data = b""
    deadline = time.monotonic() + seconds
    with contextlib.suppress(ConnectionError):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                more = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                return None
            if not more:
                break
            data += more
    return data


class Honest(HonestClient):
    """An honest client all along: ``GET /v1/models`` (or a chat completion) on a keep-alive connection, each
    answer timed. The attacks must not stop its answers nor make them slow."""

    def __init__(self, port: int, chat: bool = False) -> None:
        super().__init__()
        self.url = f"http://127.0.0.1:{port}/v1/" + ("chat/completions" if chat else "models")
        self.chat = chat

    async def setup(self) -> None:
        self.session = aiohttp.ClientSession()
        await self._once()  # its connection is open before the attack

    async def teardown(self) -> None:
        await self.session.close()

    async def ask(self) -> str | None:
        try:
            if self.chat:
                resp = await self.session.post(self.url, json={"model": "rest-only", "messages": USER})
            else:
                resp = await self.session.get(self.url)
            await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return repr(exc)
        return None if resp.status == 200 else f"{resp.status}"


@pytest.fixture
def rest_proxy(fakes: Fakes, proxy_process: Any) -> Iterator[Any]:
    """Starts a proxy in front of the fakes with ``limits``; returns the ProxyProcess once it serves."""

    def start(limits: dict[str, Any], env: dict[str, str] | None = None) -> Any:
        proxy = proxy_process(proxy_config(fakes, limits=limits), env)
        proxy.wait_ready()
        return proxy

    yield start


# --- 1. pipelined requests whose answers are never read ------------------------------------------------


async def test_a_client_that_pipelines_and_never_reads_is_held_to_a_bound(rest_proxy: Any) -> None:
    """16 MiB of pipelined ``GET /``, no answer read: the proxy stops answering once 64 KiB wait unread,
    stops reading past the pipelining bound, and drops the connection after the stalled-write timeout
    (before: every answer was queued, +327 MiB)."""
    proxy = await asyncio.to_thread(
        rest_proxy, {"restServer": {"stalledWriteTimeoutSeconds": 1.5, "maxQueuedResponseBytes": 65536}}
    )
    pid = proxy.proc.pid
    async with Honest(proxy.rest_port):
        before = rss(pid)
        reader, writer = await connect(proxy.rest_port, rcvbuf=4096)
        started = time.monotonic()
        sent = await flood(writer, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 9362, 16 * MiB)  # 256 KiB a write
        grown = rss(pid) - before
        stalled_after = time.monotonic() - started
        # The proxy aborts the connection after 1.5 s without progress (reading would be progress: the
        # client reads nothing, the counter tells).
        hits: dict[str, float] = {}
        for _ in range(100):
            hits = await limit_hits(proxy.admin_port)
            if hits.get("restServer.stalledWriteTimeoutSeconds"):
                break
            await asyncio.sleep(0.1)
        closed_after = time.monotonic() - started
        assert await closed_within(reader, 5) is not None, "the connection is still open"
        writer.close()
    print(
        f"pipelining, answers unread: {sent / MiB:.1f} MiB sent before the proxy stopped reading "
        f"({stalled_after:.1f}s), RSS growth {grown / MiB:.1f} MiB, connection dropped after {closed_after:.1f}s"
    )
    assert sent < 16 * MiB, "the proxy kept reading"
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"
    assert closed_after < stalled_after + 1.5 + 5
    assert hits.get("restServer.maxQueuedResponseBytes", 0) >= 1, hits
    assert hits.get("restServer.stalledWriteTimeoutSeconds") == 1, hits


# --- 2. streams whose client never reads ----------------------------------------------------------------


async def test_streams_that_are_never_read_give_their_slots_back(fakes: Fakes, proxy_process: Any) -> None:
    """A stream of 5 MB (more than the kernel's buffers and the proxy's read-ahead take) to a client that never
    reads holds the admission slot (``maxConcurrentRequests: 1``: an honest client gets 429) until the
    stalled-write timeout aborts it; then the honest client gets 200 (before: such streams held their slots
    past requestTimeoutSeconds, and with 16 of them every other client got 429)."""
    async with FakeProvider("openai", response_tokens=530) as big:
        config = proxy_config(
            fakes,
            limits={
                "maxConcurrentRequests": 1,
                "maxRequestBytes": 8 * MiB,
                "restServer": {"stalledWriteTimeoutSeconds": 1.5},
            },
        )
        config["providers"][0]["openai"] = {"baseURL": big.base_url}
        proxy = proxy_process(config)
        await asyncio.to_thread(proxy.wait_ready)
        pid = proxy.proc.pid
        url = f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions"
        prompt = " ".join(f"{i}{'w' * 10_000}" for i in range(520))  # the reply streams these words back
        body = f'{{"model": "rest-only", "stream": true, "messages": [{{"role": "user", "content": "{prompt}"}}]}}'
        request = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        async with aiohttp.ClientSession() as session:
            # Once read by a client that reads, so that the memory of two such calls is counted from there.
            warm = await session.post(url, data=body, headers={"Content-Type": "application/json"})
            assert warm.status == 200 and len(await warm.read()) > 5_000_000
            before = rss(pid)
            _, writer = await connect(proxy.rest_port, rcvbuf=4096)
            writer.write(request)
            for _ in range(400):  # the stream started (its 5 MB request read, on a loaded machine too): 20 s
                await asyncio.sleep(0.05)
                if big.stats.get("requests", 0) >= 2:
                    break
            assert big.stats.get("requests", 0) >= 2, "the stream that is never read did not start"
            await asyncio.sleep(0.3)  # and filled what buffers there are
            started = time.monotonic()
            refused = 0
            statuses: list[int] = []
            for _ in range(200):  # bounded: the slots come back after 1.5 s, give or take the machine
                resp = await session.post(url, json={"model": "rest-only", "messages": USER})
                await resp.read()
                statuses.append(resp.status)
                if resp.status == 200:
                    break
                refused += 1
                await asyncio.sleep(0.05)
            released_after = time.monotonic() - started
            grown = rss(pid) - before
            # And again, at once: the slots stay free.
            again = await session.post(url, json={"model": "rest-only", "messages": USER})
            assert again.status == 200
        writer.close()
    hits = await limit_hits(proxy.admin_port)
    print(
        f"a stream never read: an honest client refused {refused} times, served after {released_after:.1f}s; "
        f"RSS growth {grown / MiB:.1f} MiB"
    )
    assert statuses[-1] == 200, statuses
    assert refused >= 1 and set(statuses[:-1]) == {429}, "the stalled streams did not hold the slots"
    assert released_after < 1.5 + 5
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"
    assert hits.get("restServer.stalledWriteTimeoutSeconds") == 1, hits


async def test_a_stream_read_just_fast_enough_ends_at_the_request_deadline(
    fakes: Fakes, proxy_process: Any
) -> None:
    """A client that reads 64 KiB every half second never stalls a write for stalledWriteTimeoutSeconds, yet
    its 5 MB stream would take 40 s: at requestTimeoutSeconds (2 s, and 1 s of grace) the proxy aborts its
    connection, which frees its admission slot (``maxConcurrentRequests: 1``: another client is served while
    the slow one still reads what the kernel had buffered)."""
    async with FakeProvider("openai", response_tokens=530) as big:
        config = proxy_config(
            fakes,
            limits={"requestTimeoutSeconds": 2, "maxRequestBytes": 8 * MiB, "maxConcurrentRequests": 1},
        )
        config["providers"][0]["openai"] = {"baseURL": big.base_url}
        proxy = proxy_process(config)
        await asyncio.to_thread(proxy.wait_ready)
        url = f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions"
        prompt = " ".join(f"{i}{'w' * 10_000}" for i in range(520))
        body = f'{{"model": "rest-only", "stream": true, "messages": [{{"role": "user", "content": "{prompt}"}}]}}'
        reader, writer = await connect(proxy.rest_port, rcvbuf=4096)
        writer.write(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        slow_reads = 0

        async def read_slowly() -> None:
            nonlocal slow_reads
            for _ in range(60):  # bounded: 30 s
                try:
                    if not await reader.read(65536):
                        return
                except ConnectionError:
                    return
                slow_reads += 1
                await asyncio.sleep(0.5)

        slow = asyncio.get_running_loop().create_task(read_slowly())
        statuses: list[int] = []
        served_at = 0.0
        for _ in range(400):  # its 5 MB request read and sent on (a loaded machine too): 20 s at most
            if big.stats.get("requests", 0) >= 1:
                break
            await asyncio.sleep(0.05)
        assert big.stats.get("requests", 0) >= 1, "the slow client's stream did not start"
        started = time.monotonic()  # about when its time limit began
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(0.3)
            for _ in range(40):  # bounded: 8 s
                resp = await session.post(url, json={"model": "rest-only", "messages": USER})
                await resp.read()
                statuses.append(resp.status)
                if resp.status == 200:
                    served_at = time.monotonic() - started
                    break
                await asyncio.sleep(0.2)
        still_reading = not slow.done()
        slow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await slow
        writer.close()
    print(
        f"slot free after {served_at:.1f}s; the slow client had read {slow_reads} times, statuses {statuses}"
    )
    assert statuses[0] == 429 and statuses[-1] == 200, statuses
    assert 2 <= served_at < 6 and still_reading, (served_at, still_reading)
    assert (await limit_hits(proxy.admin_port)).get("restServer.requestTimeoutSeconds") == 1


# --- 3. a header that never ends ------------------------------------------------------------------------


async def test_a_header_value_that_never_ends_is_refused_at_the_head_limit(rest_proxy: Any) -> None:
    """8 connections each sending one header value of up to 32 MiB: each is answered 431 (or reset) once
    the head passes 16 KiB and what arrives after is not read (before: buffered until the 60 s request
    timer, +320 MiB)."""
    proxy = await asyncio.to_thread(rest_proxy, {})
    pid = proxy.proc.pid
    async with Honest(proxy.rest_port):
        before = rss(pid)
        attackers = [await connect(proxy.rest_port) for _ in range(8)]
        started = time.monotonic()
        for _, writer in attackers:
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = await asyncio.gather(*(flood(w, b"a" * 262144, 32 * MiB) for _, w in attackers))
        answers = await asyncio.gather(*(closed_within(r, 10) for r, _ in attackers))
        elapsed = time.monotonic() - started
        grown = rss(pid) - before
        for _, writer in attackers:
            writer.close()
    hits = await limit_hits(proxy.admin_port)
    print(
        f"8 endless headers: at most {max(sent) / MiB:.1f} MiB sent each before the proxy stopped reading, "
        f"all closed after {elapsed:.1f}s, RSS growth {grown / MiB:.1f} MiB"
    )
    assert all(a is not None for a in answers), "a connection was left open"
    assert all(a == b"" or a.startswith(b"HTTP/1.1 431 ") for a in answers if a is not None), answers
    assert max(sent) < 32 * MiB
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"
    assert hits.get("restServer.maxHeadBytes") == 8, hits


async def test_a_head_that_trickles_gets_408_after_the_header_timeout(rest_proxy: Any) -> None:
    proxy = await asyncio.to_thread(rest_proxy, {"restServer": {"requestHeaderTimeoutSeconds": 0.5}})
    reader, writer = await connect(proxy.rest_port)
    started = time.monotonic()
    answered = asyncio.get_running_loop().create_task(closed_within(reader, 5))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    for _ in range(30):  # a header every 0.1 s: well under the head limit, past the head's time
        await asyncio.sleep(0.1)
        if answered.done():
            break
        with contextlib.suppress(ConnectionError):
            writer.write(b"X-Slow: 1\r\n")
    answer = await answered
    elapsed = time.monotonic() - started
    writer.close()
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.4 < elapsed < 3
    assert (await limit_hits(proxy.admin_port)).get("restServer.requestHeaderTimeoutSeconds") == 1


# --- 4. connections -----------------------------------------------------------------------------------


async def test_silent_connections_are_capped_and_time_out(rest_proxy: Any) -> None:
    """200 connections that send nothing, against ``maxConnections: 50``: 150 are answered 503 and closed at
    once, the 50 others are closed after the header timeout (1 s); the proxy's file descriptors stay bounded
    and an honest client's open keep-alive connection is served all along."""
    proxy = await asyncio.to_thread(
        rest_proxy, {"restServer": {"maxConnections": 50, "requestHeaderTimeoutSeconds": 1}}
    )
    pid = proxy.proc.pid
    async with Honest(proxy.rest_port):  # its connection is one of the 50
        fds, before = open_fds(pid), rss(pid)
        started = time.monotonic()
        silent = []
        for _ in range(200):
            with contextlib.suppress(ConnectionError):
                silent.append(await connect(proxy.rest_port))
        await asyncio.sleep(0.3)
        most_fds = open_fds(pid)
        ends = await asyncio.gather(*(closed_within(r, 10) for r, _ in silent))
        elapsed = time.monotonic() - started
        grown = rss(pid) - before
        for _, writer in silent:
            writer.close()
        # A new connection is served again once the silent ones are gone.
        async with aiohttp.ClientSession() as session:
            assert (await session.get(f"http://127.0.0.1:{proxy.rest_port}/v1/models")).status == 200
    hits = await limit_hits(proxy.admin_port)
    refused = sum(1 for end in ends if end is not None and end.startswith(b"HTTP/1.1 503 "))
    print(
        f"200 silent connections, cap 50: {refused} refused with 503, all closed after {elapsed:.1f}s; "
        f"proxy fds {fds} -> {most_fds}, RSS growth {grown / MiB:.1f} MiB"
    )
    assert all(end is not None for end in ends), "a silent connection was left open"
    # 50 held (the honest client's among them), the others refused; the silent held ones timed out.
    assert refused >= 140 and hits.get("restServer.maxConnections") == refused, hits
    assert hits.get("restServer.requestHeaderTimeoutSeconds") == len(silent) - refused, hits
    assert most_fds < fds + 60
    assert elapsed < 1 + 5
    assert grown < MEMORY_BOUND, f"{grown / MiB:.0f} MiB"


async def test_a_tls_client_that_never_finishes_its_handshake_is_closed(
    fakes: Fakes, proxy_process: Any, certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    """Over TLS a connection is the server's only after the handshake: one that never sends a ClientHello (or
    stops halfway) is closed after ``requestHeaderTimeoutSeconds`` too, not asyncio's 60 s."""
    cert, key = certificate
    config = proxy_config(
        fakes,
        tls={"certFile": str(cert), "keyFile": str(key)},
        limits={"restServer": {"requestHeaderTimeoutSeconds": 0.5}},
    )
    proxy = proxy_process(config)
    await asyncio.to_thread(proxy.wait_ready)
    silent = await connect(proxy.rest_port)
    halfway = await connect(proxy.rest_port)
    halfway[1].write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    started = time.monotonic()
    ends = await asyncio.gather(closed_within(silent[0], 10), closed_within(halfway[0], 10))
    elapsed = time.monotonic() - started
    assert all(end is not None for end in ends) and 0.3 < elapsed < 5, (ends, elapsed)
    context = ssl.create_default_context(cafile=str(cert))
    async with aiohttp.ClientSession() as session:  # an honest TLS client is served
        resp = await session.get(f"https://127.0.0.1:{proxy.rest_port}/v1/models", ssl=context)
        assert resp.status == 200


async def test_bodies_held_at_once_are_held_to_the_listener_budget(rest_proxy: Any) -> None:
    """Clients that start large bodies and never finish them: beyond ``maxBufferedBodyBytes`` the next is
    answered 503 with Retry-After and closed, small requests keep being served, and the budget comes back
    when the holders leave."""
    proxy = rest_proxy({"maxRequestBytes": MiB, "restServer": {"maxBufferedBodyBytes": 2 * MiB}})
    pid = proxy.proc.pid
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MiB
    part = b"x" * (900 * 1024)
    holders: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    answers: list[bytes | None] = []
    async with Honest(proxy.rest_port, chat=True):
        before = rss(pid)
        for _ in range(4):  # 2 x 900 KiB fit in 2 MiB, the third does not
            reader, writer = await connect(proxy.rest_port)
            writer.write(head + part)
            await writer.drain()
            holders.append((reader, writer))
            answers.append(await closed_within(reader, 1.0))
        grown = rss(pid) - before
    refused = [a for a in answers if a is not None]
    assert answers[:2] == [None, None] and len(refused) == 2, answers
    assert all(a.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in a for a in refused), refused
    assert b"limits.restServer.maxBufferedBodyBytes" in refused[0]
    assert grown < MEMORY_BOUND
    assert (await limit_hits(proxy.admin_port)).get("restServer.maxBufferedBodyBytes") == 2
    for _, writer in holders:
        writer.close()
    await asyncio.sleep(0.3)
    # What the holders held is free again: a large body is taken whole.
    body = orjson.dumps({"model": "rest-only", "messages": [{"role": "user", "content": "y" * (900 * 1024)}]})
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        assert resp.status == 200, await resp.text()


# --- 5. malformed input ---------------------------------------------------------------------------------

MALFORMED = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}",
    b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffffff\r\n",
    b"GET /v1/models HTTP/9.9\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"\xff\xfe\xfd\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: \x01\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\n: empty name\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nContent-Length: x\r\n\r\n",
]

BAD_BODIES = [
    b"",
    b"[]",
    b"null",
    b'"text"',
    b"{",
    b'{"model": 1, "messages": []}',
    b'{"model": "rest-only", "messages": "hello"}',
    b'{"model": "rest-only", "messages": [1, null, "x"]}',
    b'{"model": "rest-only", "messages": [{"role": 5, "content": {"a": [1]}}]}',
    b'{"model": "rest-only", "messages": [{"role": "user", "content": [{"type": 7}]}]}',
    b'{"model": "rest-only", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}',
    b'{"model": "rest-only", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}',
    b'{"model": "rest-only", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}',
    b'{"model": "rest-only", "messages": [{"role": "user", "content": "hi"}], "stop": [1, 2]}',
    b'{"model": "rest-only", "messages": [{"role": "user", "content": "hi"}], "n": 1e400}',
    b'{"model": "\\ud800", "messages": [{"role": "user", "content": "\\udfff"}]}',
    b"\xff\xfe{}",
]


async def test_malformed_requests_get_400_and_no_traceback(rest_proxy: Any) -> None:
    """Bad framing (Content-Length, chunk sizes, versions, bytes) gets 400 and a closed connection; bad JSON
    bodies get a 4xx answer; nothing is logged as an error, no traceback."""
    proxy = await asyncio.to_thread(rest_proxy, {})
    async with Honest(proxy.rest_port):
        for raw in MALFORMED:
            reader, writer = await connect(proxy.rest_port)
            writer.write(raw)
            answer = await closed_within(reader, 5)
            writer.close()
            assert answer is not None, f"left open after {raw!r}"
            statuses = re.findall(rb"HTTP/1.1 (\d{3}) ", answer)
            assert statuses and statuses[-1] == b"400", (raw, answer)
            assert answer.count(b"Connection: close") == 1, (raw, answer)
        async with aiohttp.ClientSession() as session:
            for body in BAD_BODIES:
                resp = await session.post(
                    f"http://127.0.0.1:{proxy.rest_port}/v1/chat/completions",
                    data=body,
                    headers={"Content-Type": "application/json"},
                )
                text = await resp.text()
                assert 400 <= resp.status < 500, (body, resp.status, text)
    output = proxy.output()
    assert "Traceback" not in output and "ERROR" not in output, output[-3000:]


# --- 6. the limits in the configuration -------------------------------------------------------------------


def test_the_rest_server_limits_are_read_from_the_proxy_configuration() -> None:
    keys = {
        "maxHeadBytes": 8192,
        "maxPipelinedRequests": 4,
        "requestReadTimeoutSeconds": 30,
        "keepAliveTimeoutSeconds": 20,
        "requestHeaderTimeoutSeconds": 2.5,
        "maxQueuedResponseBytes": 32768,
        "stalledWriteTimeoutSeconds": 12,
        "maxConnections": 100,
        "maxBufferedBodyBytes": 64 * MiB,
    }
    parsed = parse_http_server(Reader(keys, "limits.restServer"), MiB)
    assert parsed == HTTPServerLimits(
        max_head_bytes=8192,
        max_body_bytes=MiB,
        max_pipelined_requests=4,
        request_timeout_s=30.0,
        keepalive_timeout_s=20.0,
        request_header_timeout_s=2.5,
        max_queued_response_bytes=32768,
        stalled_write_timeout_s=12.0,
        max_connections=100,
        max_buffered_body_bytes=64 * MiB,
    )
    defaults = parse_http_server(Reader({}, "limits.restServer"), MiB)
    assert defaults == HTTPServerLimits(max_body_bytes=MiB)
    assert (
        defaults.request_header_timeout_s,
        defaults.max_queued_response_bytes,
        defaults.stalled_write_timeout_s,
        defaults.max_connections,
    ) == (10.0, 64 * 1024, 30.0, 4096)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("requestHeaderTimeoutSeconds", 0, "must be > 0"),
        ("requestHeaderTimeoutSeconds", "1s", "must be a number"),
        ("stalledWriteTimeoutSeconds", -1, "must be > 0"),
        ("maxQueuedResponseBytes", 1024, "must be an integer from 4096 to 67108864"),
        ("maxQueuedResponseBytes", 128 * MiB, "must be an integer from 4096 to 67108864"),
        ("maxConnections", 0, "must be an integer from 1 to 1000000"),
        ("maxConnections", 2.5, "must be an integer"),
        ("maxPipelinedRequests", 2000, "must be an integer from 1 to 1024"),
        ("maxBufferedBodyBytes", 1000, "must be an integer from 1048576 or more"),
    ],
)
def test_bad_rest_server_limits_are_refused_naming_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=f"limits.restServer.{key}: {message}"):
        parse_http_server(Reader({key: value}, "limits.restServer"), MiB)


def test_the_proxy_raises_its_open_file_limit_and_warns_when_connections_could_exceed_it(
    fakes: Fakes, proxy_process: Any
) -> None:
    """Started with a soft limit of 256 open files, the proxy raises it to the hard limit; with more
    connections allowed than even that, it says which limits to lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1_000_000:
        pytest.skip(f"needs a finite hard open-file limit, this one is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        proxy = proxy_process(proxy_config(fakes, limits={"restServer": {"maxConnections": 1_000_000}}))
        proxy.wait_ready()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = pathlib.Path(f"/proc/{proxy.proc.pid}/limits").read_text()
    assert re.search(rf"Max open files\s+{hard}\s+{hard}", limits), limits
    assert (
        f"the open-file limit ({hard}) is below what the configuration allows: 1000000 REST" in proxy.output()
    )
    assert "limits.restServer.maxConnections" in proxy.output()
