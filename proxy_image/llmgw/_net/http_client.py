"""A lean HTTP/1.1 client for the REST providers: pooled keep-alive connections, parsed by llhttp.

The REST providers' clients send one kind of request, a JSON ``POST`` to one URL, and read either a JSON body
or a stream of Server-Sent Events. The proxy's REST path is bound by the CPU of its one event loop, and this
client costs a fraction of aiohttp's general-purpose one on that exchange (``bench/README.md``, "Why llmgw
has its own network stacks"). What it does, bounded by one :class:`~llmgw_common.limits.HTTPClientLimits`:

- keeps up to ``max_connections`` connections to the URL's origin, reusing idle ones (newest first) and
  dropping those idle longer than ``limits.idle_timeout_s`` or closed by the server;
- bounds the whole exchange, from taking a connection to the last body byte, by one deadline, and the
  connect by its own timeout; optionally the wait for the response's head (``first_byte_timeout``:
  :class:`FirstByteTimeout`) and each wait of a reader for more body bytes (``idle_timeout``:
  :class:`IdleTimeout`), so that a long stream that keeps flowing is bounded only by the deadline; a
  timeout, a cancelled caller or a response left unread closes its connection rather than reusing it
  mid-message;
- retries once, on a new connection, a request whose reused connection was closed before any byte of the
  response arrived (the server's keep-alive timer and our reuse raced; uvicorn's default is 5 seconds);
- applies back-pressure: it stops reading from the socket while a stream's unread body exceeds 1 MiB;
- bounds what an upstream (hostile, compromised, or an attacker on an ``http://`` link) can make it hold:
  the response head's bytes and header fields (``limits.max_response_header_bytes``,
  ``max_response_headers``, counted as they arrive, interim 1xx responses and trailers included), bytes
  that are not body in a row (a trailer or chunk extension without end), a body read whole
  (``max_response_bytes``) and a line of a stream (``max_sse_event_bytes``). Over a bound the call fails
  with :class:`LimitExceeded`, naming the limit, the connection is dropped, and ``on_limit`` is told the
  limit's configuration key.

What it leaves out, because an LLM API call needs none of it: HTTP/2, redirects, cookies, compression
(no ``Accept-Encoding`` is sent), ``Expect: 100-continue`` and proxies from the environment.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import cast
from urllib.parse import urlsplit

import httptools

from llmgw_common.limits import HTTPClientLimits


class MalformedResponse(Exception):
    """The upstream sent something that is not a valid HTTP/1.1 response."""


class LimitExceeded(MalformedResponse):
    """The upstream's response ran into a bound of :class:`~llmgw_common.limits.HTTPClientLimits`;
    ``limit`` is its configuration key (``maxResponseHeaders``, ...)."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


class ConnectionLost(ConnectionError):
    """The connection closed before the response was complete."""


class FirstByteTimeout(TimeoutError):
    """No response head within the call's ``first_byte_timeout``."""


class IdleTimeout(TimeoutError):
    """A reader waited ``idle_timeout`` for more of the body and nothing came."""


class Response:
    """One response: status and headers at once, the body as it arrives."""

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Connection | None = conn
        self._read_ahead = conn.pool.limits.read_ahead_bytes  # unread bytes before the socket pauses
        self._max_line = conn.pool.limits.max_sse_event_bytes
        self._on_limit = conn.pool.on_limit
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._received_any = False
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._headers_seen = False
        self._reading_all = False  # read() buffers the whole body by design: no back-pressure then
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None  # when the reader began to wait for more (None: not waiting)

    # -- fed by the connection -------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._read_ahead and self._conn is not None and not self._reading_all:
            self._conn.pause()
        self._wake()

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        self._error = error
        self._conn = None
        self._wake()

    # -- read by the caller ------------------------------------------------------------------------

    async def _wait(self) -> None:
        loop = self._loop
        self._waiter = loop.create_future()
        self._waiting_since = loop.time()
        try:
            await self._waiter
        finally:
            self._waiter = None
            self._waiting_since = None

    async def _wait_headers(self) -> None:
        while not self._headers_seen and not self._done:
            await self._wait()
        if not self._headers_seen:
            assert self._error is not None
            raise self._error

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; raises what ended the connection early."""
        while True:
            while self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                if self._conn is not None and self._buffered <= self._read_ahead:
                    self._conn.resume()
                yield data
            if self._done:
                if self._error is not None:
                    raise self._error
                return
            await self._wait()

    async def read(self, limit: int | None = None, limit_key: str = "maxResponseBytes") -> bytes:
        """The whole body; LimitExceeded (``limit_key``) when it exceeds, or says it will exceed, ``limit``
        bytes."""
        self._reading_all = True
        if self._conn is not None:
            self._conn.resume()
        declared = self.headers.get("content-length", "")
        while True:
            if limit is not None and (
                self._buffered > limit or (declared.isdigit() and int(declared) > limit)
            ):
                self.close()
                self._limit_hit(limit_key)
                raise LimitExceeded(limit_key, f"response body exceeds {limit} bytes")
            if self._done:
                break
            await self._wait()
        if self._error is not None:
            raise self._error
        body = b"".join(self._chunks)
        self._chunks.clear()
        return body

    async def lines(self) -> AsyncIterator[bytes]:
        """The body split after each ``\\n`` (the line ending kept); a last line without one too.

        A line longer than ``limits.max_sse_event_bytes`` fails with :class:`LimitExceeded` and closes the
        connection; the pieces of a line are joined once, when its end arrives.
        """
        limit = self._max_line
        pending: list[bytes] = []
        pending_bytes = 0
        async for data in self.chunks():
            start = 0
            while (end := data.find(b"\n", start)) >= 0:
                if pending_bytes + end + 1 - start > limit:
                    break
                if pending:
                    pending.append(data[start : end + 1])
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
                else:
                    yield data[start : end + 1]
                start = end + 1
            pending.append(data[start:])
            pending_bytes += len(data) - start
            if pending_bytes > limit:
                self.close()
                self._limit_hit("maxSSEEventBytes")
                raise LimitExceeded(
                    "maxSSEEventBytes", f"a line of the streamed response exceeds {limit} bytes"
                )
        if pending_bytes:
            yield b"".join(pending)

    def _limit_hit(self, limit: str) -> None:
        if self._on_limit is not None:
            self._on_limit(limit)

    def close(self) -> None:
        """Abandon the response: unless it was read to its end, its connection is closed, never reused."""
        conn = self._conn
        if conn is not None:
            conn.abort(ConnectionLost("response abandoned by the caller"))
        self._chunks.clear()
        self._buffered = 0


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; serves one request at a time."""

    def __init__(self, pool: HTTPClient) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._paused = False
        self._headers: list[tuple[str, str]] = []
        self._timer: asyncio.TimerHandle | None = None
        # What the upstream may make this connection hold, counted per response (see send):
        self._head_bytes = 0  # bytes fed while the head was incomplete, interim 1xx heads included
        self._header_count = 0  # header fields, interim heads and trailers included
        self._since_body = 0  # bytes fed after the head without a body byte (trailers, chunk framing)
        self._body_seen = False
        self._limit: LimitExceeded | None = None  # raised inside a parser callback
        # The exchange's bounds (see send): its deadline, the head's, and a reader's longest wait.
        self._deadline = 0.0
        self._first_byte_timeout: float | None = None
        self._idle_timeout: float | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing was asked: a server that talks out of turn is not reused
            self.abort(MalformedResponse("data received while no request was in flight"))
            return
        response._received_any = True
        limits = self.pool.limits
        try:
            if not response._headers_seen:
                # The head is fed no further than its bound: what lies beyond it is never parsed.
                room = limits.max_response_header_bytes - self._head_bytes
                part = data if len(data) <= room else data[:room]
                self._head_bytes += len(part)
                self.parser.feed_data(part)
                if not response._headers_seen:
                    if len(part) < len(data):
                        self._over(
                            "maxResponseHeaderBytes",
                            f"the response head exceeds {limits.max_response_header_bytes} bytes",
                        )
                    return
                if len(part) < len(data):
                    self.data_received(data[len(part) :])
                return
            self._body_seen = False
            self.parser.feed_data(data)
            if not self._body_seen and self.response is response:
                self._since_body += len(data)
                if self._since_body > limits.max_response_header_bytes:
                    self._over(
                        "maxResponseHeaderBytes",
                        f"more than {limits.max_response_header_bytes} bytes of trailers or chunk "
                        "framing without a body byte",
                    )
        except LimitExceeded as exc:
            self._limit_exceeded(exc)
        except httptools.HttpParserError as exc:
            if self._limit is not None:  # raised by one of our callbacks
                self._limit_exceeded(self._limit)
            else:
                self.abort(MalformedResponse(f"malformed HTTP response: {exc}"))
        except httptools.HttpParserUpgrade:
            self.abort(MalformedResponse("the upstream switched protocols"))

    def _over(self, limit: str, message: str) -> None:
        self._limit = LimitExceeded(limit, message)
        raise self._limit

    def _limit_exceeded(self, exc: LimitExceeded) -> None:
        self._limit = None
        self.abort(exc)
        if self.pool.on_limit is not None:
            self.pool.on_limit(exc.limit)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        response = self.response
        self.response = None
        if response is not None:
            if response._headers_seen and self._ends_at_eof(response):
                response._finish()  # a body delimited by the connection's end (no length, not chunked)
            else:
                detail = f": {exc}" if exc else ""
                response._finish(ConnectionLost(f"the upstream closed the connection{detail}"))
            self.pool._release(self, reusable=False)
        else:
            self.pool._forget(self)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.pool.limits.max_response_headers:
            self._over(
                "maxResponseHeaders",
                f"the response has more than {self.pool.limits.max_response_headers} header fields",
            )
        response = self.response
        if response is not None and response._headers_seen:
            return  # a trailer: counted, not kept (nothing here reads trailers)
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim response (103 Early Hints): the real one follows
            self._headers = []
            return
        response.status = status
        headers: dict[str, str] = {}
        repeated: dict[str, list[str]] | None = None  # joined once at the end: linear in the fields
        for name, value in self._headers:
            if name in headers:
                repeated = repeated if repeated is not None else {}
                repeated.setdefault(name, [headers[name]]).append(value)
            else:
                headers[name] = value
        if repeated:
            for name, values in repeated.items():
                headers[name] = ", ".join(values)
        self._headers = []
        response.headers = headers
        response._headers_seen = True
        idle = self._idle_timeout
        if idle is not None and self._timer is not None:  # from now on a reader's wait is what is bounded
            loop = response._loop
            due = min(self._deadline, loop.time() + idle)
            if due < self._timer.when():
                self._timer.cancel()
                self._timer = loop.call_at(due, self._expire)
        response._wake()

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self._body_seen = True
        self._since_body = 0
        self.response._data(body)

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if not response._headers_seen:  # the end of an interim response
            return
        self.response = None
        self._cancel_timer()
        reusable = self.parser.should_keep_alive() and not self.closed
        response._finish()
        self.pool._release(self, reusable=reusable)

    # -- used by the client --------------------------------------------------------------------------

    @staticmethod
    def _ends_at_eof(response: Response) -> bool:
        headers = response.headers
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")

    def send(
        self,
        data: bytes,
        response: Response,
        deadline: float,
        first_byte_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        assert self.transport is not None
        self.response = response
        self.parser = httptools.HttpResponseParser(self)
        self._head_bytes = self._header_count = self._since_body = 0
        self._limit = None
        loop = response._loop
        self._deadline = deadline
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        due = deadline if first_byte_timeout is None else min(deadline, loop.time() + first_byte_timeout)
        self._timer = loop.call_at(due, self._expire)
        self.transport.write(data)

    def _expire(self) -> None:
        """The exchange's timer: fail it past a bound, else arm the timer for the next bound that may pass.

        One timer per exchange, moved lazily: a reader's waits are not timed one by one, the timer looks at
        how long the current wait has lasted when it fires."""
        self._timer = None
        response = self.response
        if response is None:
            return
        loop = response._loop
        now = loop.time()
        if now >= self._deadline:
            self.abort(TimeoutError("the upstream did not answer in time (the request's deadline passed)"))
            return
        if not response._headers_seen:
            self.abort(FirstByteTimeout(f"no response within {self._first_byte_timeout:g} s"))
            return
        due = self._deadline
        idle = self._idle_timeout
        if idle is not None:
            since = response._waiting_since
            if since is not None and now - since >= idle:
                self.abort(IdleTimeout(f"nothing more of the response for {idle:g} s"))
                return
            due = min(due, (now if since is None else since) + idle)
        self._timer = loop.call_at(due, self._expire)

    def abort(self, error: BaseException) -> None:
        """Close the connection and fail its response (if any) with ``error``."""
        self._cancel_timer()
        response = self.response
        self.response = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
        if response is not None:
            response._finish(error)
            self.pool._release(self, reusable=False)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class HTTPClient:
    """POSTs to one URL over a pool of keep-alive connections.

    ``headers`` are sent with every request (besides Host and Content-Length); ``https`` URLs are
    verified against the system's trust store. ``on_limit`` is called with the configuration key of each
    bound of ``limits`` a response runs into.
    """

    def __init__(
        self,
        url: str,
        headers: Mapping[str, str],
        *,
        max_connections: int,
        connect_timeout: float,
        limits: HTTPClientLimits | None = None,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host_header = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None:
            host_header += f":{parts.port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"Host: {host_header}"]
        for name, value in headers.items():
            if any(c in name or c in value for c in "\r\n\0") or not name.strip():
                raise ValueError(f"header {name!r}: names and values cannot contain line breaks")
            lines.append(f"{name}: {value}")
        self._rest_of_head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._head = f"POST {target} HTTP/1.1\r\n".encode("latin-1") + self._rest_of_head
        self._heads: dict[str, bytes] = {}
        self.connect_timeout = connect_timeout
        self.limits = limits or HTTPClientLimits()
        self.on_limit = on_limit  # told the configuration key of each limit an upstream runs into
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: collections.deque[_Connection] = collections.deque()
        self._busy: set[_Connection] = set()
        self._closed = False

    async def post(
        self,
        body: bytes,
        timeout: float,
        *,
        path: str | None = None,
        first_byte_timeout: float | None = None,
        idle_timeout: float | None = None,
        extra_headers: bytes = b"",
    ) -> Response:
        """Send ``body`` (to the client's URL, or to ``path`` on its origin, e.g. ``/v1/embeddings``); returns once the
        response's status and headers are in. The caller reads the body (``read``, ``chunks``, ``lines``) or
        calls ``close``; either way within ``timeout`` of this call. ``first_byte_timeout`` bounds the wait
        for the response's head (:class:`FirstByteTimeout`), ``idle_timeout`` each wait of the reader for
        more of the body (:class:`IdleTimeout`). ``extra_headers``: header lines of this request alone
        (``b"Name: value\r\n"`` each, checked by the caller)."""
        if self._closed:
            raise ConnectionLost("the client is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        head = self._head if path is None else self._head_for(path)
        if extra_headers:
            line_end = head.index(b"\r\n") + 2
            head = head[:line_end] + extra_headers + head[line_end:]
        data = head + b"%d\r\n\r\n" % len(body) + body
        for attempt in (1, 2):
            await self._acquire(deadline)
            try:
                conn = self._take_idle() or await self._connect(deadline)
            except BaseException:
                self._slots.release()
                raise
            response = Response(conn)
            self._busy.add(conn)
            conn.send(data, response, deadline, first_byte_timeout, idle_timeout)
            try:
                await response._wait_headers()
            except ConnectionLost:
                if attempt == 1 and conn.reused and not response._received_any:
                    continue  # the server closed the idle connection as we reused it
                raise
            except BaseException:  # cancelled, timed out, malformed: the connection is not reusable
                conn.abort(ConnectionLost("request abandoned"))
                raise
            return response
        raise AssertionError("unreachable")

    def _head_for(self, path: str) -> bytes:
        """The request head for ``path`` on the URL's origin (``/v1/embeddings``)."""
        head = self._heads.get(path)
        if head is None:
            if not path.startswith("/") or any(c in path for c in " \r\n\0?#"):
                raise ValueError(f"not a path: {path!r}")
            head = f"POST {path} HTTP/1.1\r\n".encode("latin-1") + self._rest_of_head
            if len(self._heads) < 64:
                self._heads[path] = head
        return head

    async def _acquire(self, deadline: float) -> None:
        """A slot under ``max_connections``, waiting for one until ``deadline`` at most."""
        if not self._slots.locked():
            await self._slots.acquire()  # returns at once
            return
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise TimeoutError("no connection to the upstream became free before the deadline") from None

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if conn.closed:
                continue
            if now - conn.idle_since > self.limits.idle_timeout_s:
                conn.abort(ConnectionLost("idle too long"))
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        timeout = min(self.connect_timeout, deadline - loop.time())
        if timeout <= 0:
            raise TimeoutError("the request's deadline passed before a connection was free")
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(
                lambda: _Connection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl else None,
            )
        return conn

    def _release(self, conn: _Connection, *, reusable: bool) -> None:
        """The connection's exchange ended: back to the pool (or gone), and its slot freed."""
        if conn not in self._busy:
            return
        self._busy.discard(conn)
        self._slots.release()
        if reusable and not self._closed:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        elif not conn.closed:
            conn.abort(ConnectionLost("not reusable"))

    def _forget(self, conn: _Connection) -> None:
        """An idle connection closed (by the server, or by us)."""
        with contextlib.suppress(ValueError):  # already taken out
            self._idle.remove(conn)

    @property
    def open_connections(self) -> int:
        return len(self._busy) + sum(1 for c in self._idle if not c.closed)

    async def close(self) -> None:
        """Close every connection; requests in flight fail with ConnectionLost."""
        self._closed = True
        for conn in [*self._idle, *self._busy]:
            conn.abort(ConnectionLost("the client was closed"))
        self._idle.clear()
