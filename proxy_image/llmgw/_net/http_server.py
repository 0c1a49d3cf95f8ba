"""A lean HTTP/1.1 server for the REST front: keep-alive connections, requests parsed by llhttp.

The REST front answers small JSON bodies or a stream of Server-Sent Events, and the proxy's REST path is
bound by the CPU of its one event loop; this server costs a fraction of aiohttp's web server per request
(``bench/README.md``, "Why llmgw has its own network stacks"). The admin port (metrics, probes) stays on
aiohttp. What it does, bounded by one :class:`~llmgw_common.limits.HTTPServerLimits`:

- HTTP/1.1 keep-alive (HTTP/1.0 gets one request per connection); pipelined requests are answered in
  order, one at a time (a client more than ``max_pipelined_requests`` ahead, or with more than
  ``max_body_bytes`` of bodies waiting, is not read until the server catches up; a large read is parsed a
  slice at a time so that this holds within one read too);
- limits: the request head (``max_head_bytes``, counted as it arrives, so a header that never ends is refused
  too: 431), the body (``max_body_bytes``: the handler gets the request marked ``too_large`` and answers 413;
  the connection closes after), the bodies all connections hold at once (``max_buffered_body_bytes``, from
  their first byte until their answer is sent: a body past its first 64 KiB that would take more is
  answered 503 and its connection closed), the head's arrival (``request_header_timeout_s``, from the connection's
  opening for the first request) and the whole request's (``request_timeout_s``: a client that trickles
  gets 408), idle keep-alive connections (``keepalive_timeout_s``) and open connections (``max_connections``:
  more are answered 503 and closed at once);
- answers wait for the client: once ``max_queued_response_bytes`` are unread, the next pipelined answer and
  the next chunk of a stream wait until it reads; a client that reads nothing for ``stalled_write_timeout_s``
  has its connection aborted, which cancels its handler (and with it the admission slot and upstream call);
- ``Expect: 100-continue`` (curl sends it for bodies over 1 KiB) is answered before the body is read;
- a client that disconnects cancels its handler, so an upstream call in flight is cancelled too;
- streamed responses use chunked transfer encoding;
- draining: ``stop_accepting`` closes the listener and idle connections; a connection busy with a request
  closes after its response, which carries ``Connection: close``.

Each limit a client runs into is reported to ``on_limit`` with its configuration key (``maxHeadBytes``,
``requestHeaderTimeoutSeconds``, ``requestReadTimeoutSeconds``, ``maxQueuedResponseBytes``,
``stalledWriteTimeoutSeconds``, ``maxConnections``, ``maxBufferedBodyBytes``); the proxy counts them.

Malformed requests get 400 (after the answers to the requests before them) and a closed connection, logged
at debug level only; upgrades (``h2c``, WebSocket, CONNECT) are refused with 400.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import logging
import ssl
import time
from collections.abc import Awaitable, Callable

import httptools

from llmgw_common.limits import HTTPServerLimits

log = logging.getLogger("llmgw.rest")

_STATUS_TEXT = {
    200: "OK",
    400: "Bad Request",
    408: "Request Timeout",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


_date: tuple[int, bytes] = (0, b"")
_SLICE = 16 * 1024  # larger reads are parsed in slices of this, checking the read-ahead bound between them


def _head(status: int, headers: dict[str, str], framing: str, close: bool) -> bytes:
    """A response head: status line, Date (formatted once per second), ``headers``, the ``framing`` header
    line (Content-Length or Transfer-Encoding) and, when ``close``, ``Connection: close``."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode())
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    if close:
        lines.append("Connection: close\r\n")
    status_line = f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Unknown')}\r\n"
    return status_line.encode() + _date[1] + "".join(lines).encode("latin-1") + framing.encode() + b"\r\n"


class Request:
    """One request: method, path (without the query), lower-case headers, the body."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "too_large")

    def __init__(
        self, method: str, path: str, headers: dict[str, str], body: bytes, keep_alive: bool, too_large: bool
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.too_large = too_large  # the body exceeded max_body_bytes and was not kept


class Responder:
    """How a handler answers: one ``send``, or ``start`` + ``write``... + ``end`` for a stream."""

    def __init__(self, conn: _HTTPConnection, request: Request) -> None:
        self._conn = conn
        self._close = not request.keep_alive or request.too_large
        self.started = False
        self._deadline: float | None = None  # loop time by which the streamed answer must be written

    def limit_time(self, seconds: float) -> None:
        """Write the streamed answer within ``seconds`` from now, or the connection is aborted (its handler
        cancelled): a client that reads just fast enough never to stall a write for
        ``stalled_write_timeout_s`` is still held to the request's time limit."""
        self._deadline = asyncio.get_running_loop().time() + seconds

    def _head(self, status: int, headers: dict[str, str], framing: str) -> bytes:
        if self._conn.server.draining:
            self._close = True
        return _head(status, headers, framing, self._close)

    def send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        """The whole response at once."""
        assert not self.started
        self.started = True
        self._conn.write(self._head(status, headers, f"Content-Length: {len(body)}\r\n") + body)

    def start(self, status: int, headers: dict[str, str]) -> None:
        """The head of a streamed (chunked) response."""
        assert not self.started
        self.started = True
        self._conn.write(self._head(status, headers, "Transfer-Encoding: chunked\r\n"))

    async def write(self, data: bytes) -> None:
        """One chunk of a streamed response; waits while the client is slow to read."""
        if data:
            self._conn.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self._conn.drain(self._deadline)

    async def end(self) -> None:
        self._conn.write(b"0\r\n\r\n")
        await self._conn.drain(self._deadline)

    @property
    def closes(self) -> bool:
        return self._close


Handler = Callable[[Request, Responder], Awaitable[None]]


class _HTTPConnection(asyncio.Protocol):
    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.busy = False
        self._queue: collections.deque[Request] = collections.deque()
        self._queued_bytes = 0  # bodies of the requests in _queue
        self._worker: asyncio.Task[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_limit: str | None = None  # the limit _timer enforces (None: the keep-alive timeout)
        self._reading_paused = False  # no more data is parsed (past the read-ahead bound, or refused)
        self._transport_paused = False
        self._pending = b""  # received, not yet parsed: past the read-ahead bound within one read
        self._in_head = True  # the next bytes are a request head: idle, or a head begun and not complete
        self._in_message = False  # a request begun and not complete
        self._heads = 0  # request heads completed, to tell whether one ended in a chunk of data
        self._raw_head_bytes = 0  # bytes of the incomplete head, counted by chunk (see data_received)
        self._begun = 0.0  # when the request being received began (loop time)
        self._failure: tuple[int, str] | None = None  # an answer to send after the queued ones, then close
        self._held = 0  # body bytes of this connection counted in the server's body_bytes_held
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._body: list[bytes] = []
        self._body_bytes = 0
        self._too_large = False
        self._answered_early = False  # a 413 queued from the head alone: the rest of the message is ignored

    # -- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's
        limits = self.server.limits
        if len(self.server._connections) >= limits.max_connections:
            # Silent connections must not take every file descriptor of the process: refused at once.
            self.server.hit("maxConnections")
            self.closed = True
            body = b"too many connections\n"
            head = _head(503, {"Retry-After": "1"}, f"Content-Length: {len(body)}\r\n", close=True)
            transport.write(head + body)  # type: ignore[attr-defined]
            transport.close()
            return
        transport.set_write_buffer_limits(high=limits.max_queued_response_bytes)  # type: ignore[attr-defined]
        self.server._connections.add(self)
        self._arm(limits.request_header_timeout_s, "requestHeaderTimeoutSeconds")

    def data_received(self, data: bytes) -> None:
        if len(data) <= _SLICE:
            self._feed(data)
            return
        # Parsed a slice at a time, so that a read full of small pipelined requests (uvloop reads up to
        # 256 KiB) stops at the read-ahead bound: the rest waits, unparsed, until the server catches up.
        view = memoryview(data)
        for start in range(0, len(data), _SLICE):
            if self._reading_paused or self.closed:
                if self._failure is None and not self.closed:
                    self._pending = bytes(view[start:])
                return
            self._feed(view[start : start + _SLICE])

    def _feed(self, data: bytes | memoryview) -> None:
        in_head, heads = self._in_head, self._heads
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            last = self._queue[-1] if self._queue else None
            if last is not None and (last.method == "CONNECT" or "upgrade" in last.headers):
                self._queue.pop()  # the upgrade request itself (just parsed): refused, not served
                self._queued_bytes -= len(last.body)
            self._fail(400, "protocol upgrades are not supported")
            return
        except httptools.HttpParserError as exc:
            refused = exc.__context__ or exc.__cause__  # an exception of our callbacks, wrapped by httptools
            if isinstance(refused, _Refused):
                self._fail(refused.status, refused.message, refused.limit)
            else:
                self._fail(400, f"malformed request: {exc}")
            return
        if self._in_head and self._in_message:
            # llhttp hands a header to on_header only once it is complete: a value that never ends is counted
            # here, by the chunks received while the head is open. A head that began in this chunk after
            # another request is not counted (where it starts is unknown): at most one chunk goes uncounted.
            if in_head and heads == self._heads:
                self._raw_head_bytes += len(data)
            if self._raw_head_bytes > self.server.limits.max_head_bytes:
                limit = self.server.limits.max_head_bytes
                self._fail(431, f"request head exceeds {limit} bytes", "maxHeadBytes")
                return
        if self._in_message and not self.busy and not self._queue and not self.closed:
            # A request left incomplete by this chunk: its head's or its whole time runs. (Armed here, not in
            # the callbacks, so that a request that arrives in one chunk costs no timer.)
            self._arm_idle(keep=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        self._release(self._held)
        self.server._connections.discard(self)
        if self._worker is not None and not self._worker.done():
            self._worker.cancel()  # the client is gone: stop its handler and the upstream call
        waiter = self._writable
        if waiter is not None and not waiter.done():
            waiter.set_result(None)  # drain() sees ``closed``; no exception left unretrieved

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- httptools callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset()
        self._in_message = True
        self._raw_head_bytes = 0
        self._begun = asyncio.get_running_loop().time()

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self._headers[key] = f"{self._headers[key]}, {text}" if key in self._headers else text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._heads += 1
        length = self._headers.get("content-length")
        if (
            length is not None
            and length.isascii()
            and length.isdigit()
            and int(length) > self.server.limits.max_body_bytes
        ):
            self._too_large = True  # answered without reading the body, then the connection closes
            self._answered_early = True
            self._dispatch(keep_alive=False)
        elif self._headers.get("expect", "").lower() == "100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        kept = self._body_bytes
        self._body_bytes += len(body)
        limits = self.server.limits
        if self._body_bytes > limits.max_body_bytes:
            self._too_large = True
            self._body = []
            self._release(kept)
        elif (
            self._body_bytes > _ALWAYS_TAKEN_BODY_BYTES
            and self.server.body_bytes_held + len(body) > limits.max_buffered_body_bytes
        ):
            self._body = []
            self._release(kept)
            raise _Refused(
                503,
                "the gateway holds too many request bodies at once (limits.restServer.maxBufferedBodyBytes); "
                "retry shortly",
                "maxBufferedBodyBytes",
            )
        else:
            self._body.append(body)
            self._held += len(body)
            self.server.body_bytes_held += len(body)

    def _release(self, n: int) -> None:
        """``n`` body bytes of this connection are no longer held (its answer went out, or it was dropped;
        a connection lost releases all it held at once, so what its cancelled handler releases after is 0)."""
        n = min(n, self._held)
        self._held -= n
        self.server.body_bytes_held -= n

    def on_message_complete(self) -> None:
        self._in_head = True
        self._in_message = False
        if not self._answered_early:
            # HTTP/1.0 clients get one request per connection, which spares them a keep-alive dialect.
            keep_alive = self.parser.should_keep_alive() and self.parser.get_http_version() != "1.0"
            self._dispatch(keep_alive=keep_alive)

    def _dispatch(self, keep_alive: bool) -> None:
        url = self._url
        query = url.find(b"?")
        request = Request(
            self.parser.get_method().decode("latin-1"),
            (url[:query] if query >= 0 else url).decode("latin-1"),
            self._headers,
            b"".join(self._body),
            keep_alive,
            self._too_large,
        )
        self._queue.append(request)
        self._queued_bytes += len(request.body)
        self._disarm()
        # The socket keeps being read while a request is served, or a client that leaves would go unnoticed;
        # only a client that pipelines many requests (or large bodies) ahead is made to wait.
        if self._read_ahead_too_far():
            self._pause_reading()
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._serve())

    def _pause_reading(self) -> None:
        self._reading_paused = True
        if not self._transport_paused and self.transport is not None and not self.closed:
            self._transport_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        self._reading_paused = False
        pending, self._pending = self._pending, b""
        if pending:
            self.data_received(pending)  # may reach the bound again
        if (
            not self._reading_paused
            and self._transport_paused
            and self.transport is not None
            and not self.closed
        ):
            self._transport_paused = False
            self.transport.resume_reading()

    def _read_ahead_too_far(self) -> bool:
        limits = self.server.limits
        return len(self._queue) > limits.max_pipelined_requests or self._queued_bytes > limits.max_body_bytes

    # -- serving ---------------------------------------------------------------------------------

    async def _serve(self) -> None:
        try:
            while self._queue and not self.closed:
                request = self._queue.popleft()
                self._queued_bytes -= len(request.body)
                responder = Responder(self, request)
                self.busy = True
                try:
                    await self.server.handler(request, responder)
                    if not responder.started:
                        responder.send(500, b"no response\n", {})
                    if self._writing_paused() and not (responder.closes or self.server.draining):
                        # Back-pressure: the next answer waits until the client reads this one (or the
                        # stalled-write timeout ends the connection), and so, past the pipelining bound,
                        # does reading. A client that pipelines and never reads holds no more than this.
                        if self._queue:
                            self.server.hit("maxQueuedResponseBytes")
                        await self.drain()
                except (asyncio.CancelledError, ConnectionError):  # the client left, or stalled
                    self._close()
                    return
                except Exception:  # the handler answers its own errors; this is a bug, not a request
                    log.exception("unexpected error answering %s %s", request.method, request.path)
                    if not responder.started:
                        responder._close = True
                        responder.send(500, b"internal error in the gateway; its logs have the details\n", {})
                    self._close()
                    return
                finally:
                    self.busy = False
                    self._release(len(request.body))
                if responder.closes or self.server.draining:  # closes: too large, or not keep-alive
                    self._close()
                    return
                if self._reading_paused and self._failure is None and not self._read_ahead_too_far():
                    self._resume_reading()
            if self._failure is not None:
                self._send_failure()
            elif not self.closed:
                self._arm_idle()
        finally:
            self._worker = None

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _writing_paused(self) -> bool:
        return self._writable is not None and not self._writable.done()

    async def drain(self, deadline: float | None = None) -> None:
        """Wait while the client has more than ``max_queued_response_bytes`` unread; a client that reads
        nothing for ``stalled_write_timeout_s``, or is still behind at ``deadline`` (loop time), has its
        connection aborted (ConnectionResetError here)."""
        if self._writing_paused():
            assert self._writable is not None
            loop = asyncio.get_running_loop()
            stalled = loop.time() + self.server.limits.stalled_write_timeout_s
            try:
                async with asyncio.timeout_at(stalled if deadline is None else min(stalled, deadline)):
                    await self._writable
            except TimeoutError:
                late = deadline is not None and deadline < stalled
                self._abort("requestTimeoutSeconds" if late else "stalledWriteTimeoutSeconds")
        if self.closed:
            raise ConnectionResetError("the client closed the connection")

    def _count(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.server.limits.max_head_bytes:
            raise _Refused(
                431, f"request head exceeds {self.server.limits.max_head_bytes} bytes", "maxHeadBytes"
            )

    def _fail(self, status: int, message: str, limit: str | None = None) -> None:
        """Refuse a request the parser cannot take: answered after the requests queued before it, then the
        connection closes. Nothing more is read."""
        if self.closed or self._failure is not None:
            return
        if limit is not None:
            self.server.hit(limit)
        log.debug("refused a request with %d: %s", status, message)
        self._failure = (status, message)
        self._in_message = False
        self._pending = b""
        self._pause_reading()
        if self._worker is None:
            self._send_failure()

    def _send_failure(self) -> None:
        assert self._failure is not None
        status, message = self._failure
        if self.transport is not None and not self.closed:
            body = message.encode() + b"\n"
            headers = {"Content-Type": "text/plain"}
            if status == 503:
                headers["Retry-After"] = "1"
            self.transport.write(
                _head(status, headers, f"Content-Length: {len(body)}\r\n", close=True) + body
            )
        self._close()

    def _close(self) -> None:
        self._disarm()
        if self.transport is not None and not self.closed:
            self.closed = True
            if self.transport.get_write_buffer_size():
                # What is left is written out before the socket closes, but not for longer than a stalled write.
                self._timer = asyncio.get_running_loop().call_later(
                    self.server.limits.stalled_write_timeout_s, self._abort, "stalledWriteTimeoutSeconds"
                )
            self.transport.close()

    def _abort(self, limit: str) -> None:
        """Drop the connection and what is queued to it: the client has read nothing for too long."""
        self._timer = None
        self.server.hit(limit)
        log.debug("closing a connection whose client is too slow to read its answer (%s)", limit)
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close_if_idle(self) -> None:
        if not self.busy and not self._queue:
            self._close()

    def _arm_idle(self, keep: bool = False) -> None:
        """The timer of a connection with nothing to answer: the rest of the head's or the request's time
        when a request is on its way, else the keep-alive timeout. ``keep``: a timer already armed for the
        same limit stays (the first head's time counts from the connection's opening)."""
        limits = self.server.limits
        if not self._in_message:
            seconds, limit = limits.keepalive_timeout_s, None
        elif self._in_head and limits.request_header_timeout_s < limits.request_timeout_s:
            seconds, limit = limits.request_header_timeout_s, "requestHeaderTimeoutSeconds"
        else:
            seconds, limit = limits.request_timeout_s, "requestReadTimeoutSeconds"
        if keep and self._timer is not None and self._timer_limit == limit:
            return
        if limit is not None:
            seconds -= asyncio.get_running_loop().time() - self._begun
        self._arm(seconds, limit)

    def _arm(self, seconds: float, limit: str | None) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(max(seconds, 0.0), self._expire, limit)
        self._timer_limit = limit

    def _expire(self, limit: str | None) -> None:
        self._timer = None
        if self.busy or self._queue or self.closed:
            return
        if limit is None:  # an idle keep-alive connection
            self._close()
            return
        self.server.hit(limit)
        if self._in_message:
            self._fail(408, "the request did not arrive in time")
        else:  # a connection that never sent a request
            self._close()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


# The first bytes of any body are taken whatever the budget holds (so that small requests, a chat turn, are
# never refused for large bodies of others): at most max_connections times this on top of the budget.
_ALWAYS_TAKEN_BODY_BYTES = 64 * 1024


class _Refused(Exception):
    def __init__(self, status: int, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.limit = limit  # the limit's configuration key, when a limit refused it


class HTTPServer:
    """Serves ``handler`` on one listening socket."""

    def __init__(
        self,
        handler: Handler,
        limits: HTTPServerLimits | None = None,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or HTTPServerLimits()
        self.on_limit = on_limit  # told the configuration key of each limit a client runs into
        self.draining = False
        self.body_bytes_held = 0  # request bodies held by all connections (limits.max_buffered_body_bytes)
        self._connections: set[_HTTPConnection] = set()
        self._listener: asyncio.Server | None = None

    def hit(self, limit: str) -> None:
        if self.on_limit is not None:
            self.on_limit(limit)

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; returns the bound port (the real one when ``port`` is 0)."""
        loop = asyncio.get_running_loop()
        # A TLS client that never completes its handshake is held no longer than one that sends no head.
        handshake = self.limits.request_header_timeout_s if ssl_context is not None else None
        self._listener = await loop.create_server(
            lambda: _HTTPConnection(self),
            host,
            port,
            ssl=ssl_context,
            backlog=1024,
            ssl_handshake_timeout=handshake,
        )
        return int(self._listener.sockets[0].getsockname()[1])

    async def stop_accepting(self) -> None:
        """Drain: no new connections; idle ones close now, busy ones after their response."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            conn.close_if_idle()

    async def close(self) -> None:
        """Close every connection, busy or not (their handlers are cancelled)."""
        await self.stop_accepting()
        for conn in list(self._connections):
            conn._close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1.0)
