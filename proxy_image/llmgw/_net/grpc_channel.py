"""A gRPC client channel on asyncio: the proxy's connection to a ``grpc`` provider.

A channel keeps one HTTP/2 connection to its target and multiplexes every call over it, as grpc.aio's
channel does. It connects on first use and again after the connection closes or the server sends GOAWAY,
and starts calls once the server's SETTINGS have arrived, so that its limit on concurrent streams holds
from the first call (calls over it wait for a slot). Calls in flight on a connection that goes away fail
with UNAVAILABLE, which the gateway retries; a call the server refuses unprocessed (REFUSED_STREAM) is
sent again here.

Calls take and return serialized messages (``bytes``); failures raise
:class:`~llmgw._net.grpc_wire.RpcError` with the server's status, message and trailing metadata, or
:class:`LimitExceeded` (an RpcError too) when the server's answer runs into a bound of
:class:`~llmgw_common.limits.GrpcChannelLimits` (a message over ``max_message_bytes``, a header list over
``max_header_block_bytes``, ...); ``on_limit`` is told the limit's configuration key. A call's
timeout is sent as ``grpc-timeout`` and enforced here too; a call may also bound the wait for its first
response message (``first_message_timeout``) and, on a stream, each wait for the next one
(``idle_timeout``), both with :class:`CallTimeout` (DEADLINE_EXCEEDED), so that a long stream that keeps
flowing is bounded only by its deadline. Cancelling the awaiting task, or closing a
stream's iterator early, resets the stream (RST_STREAM), so the server stops working on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncGenerator, Callable, Sequence

import grpc

from llmgw import __version__
from llmgw._net.grpc_wire import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_STREAM_ID,
    Connection,
    ErrorCode,
    RpcError,
    Stream,
    encode_headers,
    format_timeout,
    frame,
    goaway,
    message,
    status_from_http,
    status_of,
)
from llmgw_common.limits import GrpcChannelLimits

_USER_AGENT = f"llmgw/{__version__}"


class LimitExceeded(RpcError):
    """The server's answer ran into a bound of the channel's limits; ``limit`` is its configuration key."""

    def __init__(self, code: grpc.StatusCode, details: str, limit: str) -> None:
        super().__init__(code, details)
        self.limit = limit


# A server that vanishes without closing its connections (its node lost power, a network partition) must
# not hold calls until the kernel's defaults notice (hours idle, ~15 minutes of retransmits). TCP keepalive
# and TCP_USER_TIMEOUT do it in the kernel, without HTTP/2 PINGs, which grpcio servers punish when they
# come more often than every 5 minutes while no data flows (GOAWAY "too_many_pings").


class CallTimeout(RpcError):
    """A call's bound other than its deadline ran out (DEADLINE_EXCEEDED): ``which`` is ``"first"`` (no
    response message within ``first_message_timeout``) or ``"idle"`` (none for ``idle_timeout`` after one)."""

    def __init__(self, which: str, details: str) -> None:
        super().__init__(grpc.StatusCode.DEADLINE_EXCEEDED, details)
        self.which = which
        self.llmgw_timeout = which


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None or a <= b else b


class _Watch:
    """The time bounds of one call, on one timer that is moved lazily: the call's deadline, its first
    message's, and (once a message came) how long the reader has been waiting for the next one."""

    __slots__ = (
        "conn",
        "deadline",
        "first",
        "got_message",
        "idle",
        "loop",
        "stream",
        "timer",
        "waiting_since",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _ClientConnection,
        stream: Stream,
        deadline: float | None,
        first_message_timeout: float | None,
        idle_timeout: float | None,
    ) -> None:
        self.loop, self.conn, self.stream = loop, conn, stream
        self.deadline = deadline
        self.first = None if first_message_timeout is None else loop.time() + first_message_timeout
        self.idle = idle_timeout
        self.got_message = False
        self.waiting_since: float | None = None
        due = _earliest(deadline, self.first)
        self.timer = None if due is None else loop.call_at(due, self.check)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def message_taken(self) -> None:
        """The first message was taken: from now on the gaps between messages are what is bounded."""
        self.got_message = True
        if self.idle is not None and self.timer is not None:
            due = self.loop.time() + self.idle
            if due < self.timer.when():
                self.timer.cancel()
                self.timer = self.loop.call_at(due, self.check)

    def check(self) -> None:
        self.timer = None
        stream = self.stream
        if stream.error is not None or stream.trailers is not None:
            return
        now = self.loop.time()
        if self.deadline is not None and now >= self.deadline:
            self._fail(RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            return
        due = self.deadline
        if not (self.got_message or stream.messages):
            if self.first is not None:
                if now >= self.first:
                    self._fail(CallTimeout("first", "no response message in time"))
                    return
                due = _earliest(due, self.first)
        elif self.idle is not None:
            since = self.waiting_since
            if since is not None and now - since >= self.idle:
                self._fail(CallTimeout("idle", f"no response message for {self.idle:g} s"))
                return
            due = _earliest(due, (now if since is None else since) + self.idle)
        if due is not None:
            self.timer = self.loop.call_at(due, self.check)

    def _fail(self, error: RpcError) -> None:
        self.stream.error = error
        self.conn.cancel(self.stream)


def _os_reason(exc: OSError) -> str:
    """Why a connection failed, without the addresses asyncio's messages name ("Connect call failed
    ('10.0.0.5', 8000)", "Multiple exceptions: ..."): the errno's text, getaddrinfo's for a name."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno)
    if exc.errno is not None and exc.strerror:  # socket.gaierror: a negative EAI_* code
        return str(exc.strerror)
    return "the connection failed"


def _detect_dead_peers(sock: socket.socket, limits: GrpcChannelLimits) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their defaults
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, limits.keepalive_idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, limits.keepalive_interval_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, limits.keepalive_probes)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(limits.unacked_data_timeout_s * 1000)
        )


class _ClientConnection(Connection):
    is_client = True

    def __init__(self, channel: Channel) -> None:
        super().__init__(channel.limits.http2, channel.on_limit)
        self.channel = channel
        self.limit: str | None = None  # the limit the server ran into, if that ended the connection
        # stream id -> bytes of its incomplete message already given back to the server's windows
        self._early_credit: dict[int, int] = {}
        self.next_id = 1
        self._slot_freed: asyncio.Event | None = None  # set when a stream ends, for calls over the limit
        # The server's first SETTINGS arrived (or the connection ended first): until then its limits,
        # SETTINGS_MAX_CONCURRENT_STREAMS above all, are unknown.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                _detect_dead_peers(sock, self.channel.limits)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection to {self.channel.target} lost" + (f": {exc}" if exc else "")
        if self.limit is not None and self.failure:
            reason = f"connection to {self.channel.target} closed: {self.failure}"
        for stream in self.streams.values():
            if stream.error is None and stream.trailers is None:
                stream.error = (
                    RpcError(grpc.StatusCode.UNAVAILABLE, reason)
                    if self.limit is None
                    else LimitExceeded(grpc.StatusCode.UNAVAILABLE, reason, self.limit)
                )
        super().connection_lost(exc)
        self._freed()
        if not self.ready.done():
            self.ready.set_result(None)

    def limit_hit(self, limit: str) -> None:
        if limit != "maxMessageBytes":  # that one ends its call only (message_too_large); the others end
            self.limit = limit  # the connection, and every call on it fails with LimitExceeded
        super().limit_hit(limit)

    def settings_received(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def usable(self) -> bool:
        return not self.closed and self.goaway_received is None and self.next_id < MAX_STREAM_ID - 2

    async def wait_for_slot(self, deadline: float | None) -> None:
        """Wait while the server's SETTINGS_MAX_CONCURRENT_STREAMS calls are in flight."""
        while len(self.streams) >= self.peer_max_streams and self.usable():
            self._slot_freed = self._slot_freed or asyncio.Event()
            timeout = None if deadline is None else deadline - asyncio.get_running_loop().time()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout)
            except TimeoutError:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None

    def open(self, headers: bytes, body: bytes) -> tuple[Stream, bool]:
        """Start a call: its HEADERS, and its one request message if the windows allow it now.

        The second value says whether the request went out whole; if not, :meth:`send_request` sends it.
        """
        if not self.usable():
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"connection to {self.channel.target} closed")
        stream = Stream(self.next_id, self.peer_initial_window)
        self.highest_stream = stream.id
        self.next_id += 2
        self.streams[stream.id] = stream
        prefix = frame(HEADERS, END_HEADERS, stream.id, headers)
        if self.try_send(stream, body, prefix, frame(DATA, END_STREAM, stream.id)):
            return stream, True
        self.write(prefix)
        return stream, False

    async def send_request(self, stream: Stream, body: bytes) -> None:
        """The request message as flow control allows, then END_STREAM; returns early if the call ends."""
        try:
            await self.send_data(stream, body)
        except ConnectionError:
            return  # the call is over already; its outcome tells why
        if self.streams.get(stream.id) is stream:
            self.write(frame(DATA, END_STREAM, stream.id))

    def headers_received(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we already gave up on
        if stream.headers is None:
            stream.headers = headers
        if end_stream:  # trailers, or a trailers-only response
            stream.trailers = headers
            stream.ended = True
            self._end(stream)
        stream.wake()

    def stream_changed(self, stream: Stream) -> None:
        if stream.reset is not None:  # the server reset it (RST_STREAM), or the connection ended
            self._end(stream)

    def _messages(self, stream: Stream, payload: bytes) -> None:
        """Messages as the base class splits them, and the bytes of an incomplete one given back to the
        windows as they arrive: a message larger than the stream window (up to ``max_message_bytes``, which
        bounds what it holds) would otherwise never complete. Complete messages keep their window until
        taken, so that a caller that reads slowly still holds the server back."""
        before = len(stream.messages)
        early = self._early_credit.pop(stream.id, 0)
        super()._messages(stream, payload)
        if stream.error is not None or self.streams.get(stream.id) is not stream:
            return
        if early and len(stream.messages) > before:  # that message is complete: credit only the rest later
            body, wire_size = stream.messages[before]
            stream.messages[before] = (body, wire_size - early)
            early = 0
        pending = len(stream.partial)
        if pending > early:
            self.consumed(stream, pending - early)
            early = pending
        if early:
            self._early_credit[stream.id] = early

    def credited_early(self, stream: Stream) -> int:
        return self._early_credit.pop(stream.id, 0)

    def message_too_large(self, stream: Stream, length: int, decompressed: bool = False) -> None:
        size = f"more than {self.max_message_bytes} bytes decompressed" if decompressed else f"{length} bytes"
        if not decompressed:  # the inflating side counts its own hit
            self.limit_hit("maxMessageBytes")
        stream.error = LimitExceeded(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"response message of {size} is over the limit of {self.max_message_bytes} bytes",
            "maxMessageBytes",
        )
        self.cancel(stream)

    def goaway(self, last_stream_id: int) -> None:
        for stream in [s for s in self.streams.values() if s.id > last_stream_id]:
            stream.error = RpcError(grpc.StatusCode.UNAVAILABLE, f"{self.channel.target} is shutting down")
            self.cancel(stream, code=None)
        if not self.streams:
            self.close()

    def cancel(self, stream: Stream, code: ErrorCode | None = ErrorCode.CANCEL) -> None:
        """Give up on a stream: tell the server (RST_STREAM) and wake whoever waits on it."""
        if self.streams.get(stream.id) is stream:
            if code is not None:
                self.reset_stream(stream.id, code)
            self._release(stream)
            self._end(stream)
        if stream.reset is None:
            stream.reset = ErrorCode.CANCEL
        stream.wake()

    def _end(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._early_credit.pop(stream.id, None)
        self._freed()
        if self.goaway_received is not None and not self.streams:
            self.close()

    def _freed(self) -> None:
        if self._slot_freed is not None:
            self._slot_freed.set()
            self._slot_freed = None


def _finished(stream: Stream) -> bool:
    return stream.trailers is not None or stream.reset is not None or stream.error is not None


def _outcome(stream: Stream) -> RpcError | None:
    """None for OK; otherwise the error the call ends with."""
    if stream.error is not None:
        return stream.error
    if stream.trailers is not None:
        http_status = next((v for k, v in stream.headers or () if k == ":status"), "200")
        if http_status != "200":
            return RpcError(status_from_http(http_status), f"HTTP status {http_status} from the server")
        code, details = status_of(stream.trailers)
        if code == grpc.StatusCode.OK:
            return None
        metadata = [
            (k, v) for k, v in stream.trailers if not k.startswith((":", "grpc-")) and k != "content-type"
        ]
        return RpcError(code, details, metadata)
    if stream.reset == ErrorCode.REFUSED_STREAM:
        return RpcError(grpc.StatusCode.UNAVAILABLE, "the server refused the call (it may be shutting down)")
    if stream.reset == ErrorCode.CANCEL:
        return RpcError(grpc.StatusCode.CANCELLED, "the server cancelled the call")
    if stream.reset == ErrorCode.ENHANCE_YOUR_CALM:  # gRPC's mapping of HTTP/2 error codes
        return RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "the server reset the call (ENHANCE_YOUR_CALM)")
    return RpcError(grpc.StatusCode.INTERNAL, f"the server reset the call ({stream.reset!r})")


class Channel:
    """One upstream gRPC server, ``HOST:PORT``, over one multiplexed HTTP/2 connection (TLS optional).

    With ``tls``, the server's certificate is checked against the system's CAs, or as ``ssl_context``
    says if one is given. ``on_limit`` is called with the configuration key of each bound of ``limits``
    the server runs into.
    """

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        metadata: Sequence[tuple[str, str]] = (),
        limits: GrpcChannelLimits | None = None,
        connect_timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        on_limit: Callable[[str], None] | None = None,
        address: tuple[str, int] | None = None,
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = target
        self.on_limit = on_limit  # told the configuration key of each limit the server runs into
        self.host, self.port = host.strip("[]"), int(port)
        # One resolved address of the target to connect to (one worker of several behind a name); the
        # target's host stays the TLS server name and the :authority.
        self.address = address or (self.host, self.port)
        self.limits = limits or GrpcChannelLimits()
        self.connect_timeout = connect_timeout
        self._ssl: ssl.SSLContext | None = None
        if tls:  # the system's CAs, unless the caller brings a context (its ALPN is set to h2 here)
            self._ssl = ssl_context or ssl.create_default_context()
            self._ssl.set_alpn_protocols(["h2"])
        self._common = [
            (":method", "POST"),
            (":scheme", "https" if tls else "http"),
            (":authority", target),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", _USER_AGENT),
            *((k.lower(), v) for k, v in metadata),
        ]
        self._headers: dict[str, bytes] = {}  # path -> the constant part of its header block
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Future[_ClientConnection] | None = None
        self.connections = 0  # connections made so far: a new one may reach another server

    def connected(self) -> bool:
        """Whether the next call goes over the connection the last one used (no new connection first)."""
        return self._conn is not None and self._conn.usable()

    def _header_block(self, path: str, timeout: float | None) -> bytes:
        block = self._headers.get(path)
        if block is None:
            block = self._headers[path] = encode_headers([(":path", path), *self._common])
        if timeout is None:
            return block
        return block + encode_headers([("grpc-timeout", format_timeout(timeout))])

    async def _connection(self, deadline: float | None) -> _ClientConnection:
        conn = self._conn
        if conn is not None and conn.usable():
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
            self._connecting.add_done_callback(self._connected)
        timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), timeout)
        except TimeoutError:
            raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded while connecting") from None

    def _connected(self, future: asyncio.Future[_ClientConnection]) -> None:
        self._connecting = None
        if not future.cancelled() and future.exception() is None:
            self._conn = future.result()
            self.connections += 1

    async def _connect(self) -> _ClientConnection:
        """A connection whose server has sent its SETTINGS, so that its limits hold from the first call."""
        loop = asyncio.get_running_loop()
        conn: _ClientConnection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: _ClientConnection(self),
                    self.address[0],
                    self.address[1],
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                )
                protocol = transport.get_extra_info("ssl_object")
                if protocol is not None and protocol.selected_alpn_protocol() not in (None, "h2"):
                    transport.close()
                    raise RpcError(
                        grpc.StatusCode.UNAVAILABLE, f"{self.target} does not offer HTTP/2 over TLS"
                    )
                await conn.ready
        except TimeoutError:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot connect to {self.target}: no answer within {self.connect_timeout:g}s",
            ) from None
        except ssl.SSLError as exc:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.target}: {exc}") from None
        except OSError as exc:  # "Connection refused" rather than asyncio's "Connect call failed (...)"
            reason = _os_reason(exc)
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self.target}: {reason}"
            ) from None
        finally:
            if conn is not None and not conn.ready.done():
                conn.close()  # given up on before the server's SETTINGS arrived
        if conn.closed:
            raise RpcError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot connect to {self.target}: "
                + (conn.failure or "the connection closed before the server's HTTP/2 SETTINGS"),
            )
        return conn

    async def _call(
        self,
        path: str,
        request: bytes,
        timeout: float | None,
        first_message_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> tuple[_ClientConnection, Stream, _Watch]:
        """Start a call and wait for its response to begin (headers) or the call to end.

        The deadline covers every step: connecting, waiting for a stream slot, sending the request as flow
        control allows, and (with the timer returned, which the caller cancels) the rest of the call. A
        call the server refuses unprocessed (RST_STREAM REFUSED_STREAM, RFC 9113 section 8.7) is sent
        again after a short pause: grpcio, for one, counts a call that just ended against
        SETTINGS_MAX_CONCURRENT_STREAMS for a moment after its trailers went out.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        body = message(request)
        attempt = 1
        while True:
            conn = await self._connection(deadline)
            await conn.wait_for_slot(deadline)
            remaining = None if deadline is None else max(0.001, deadline - loop.time())
            stream, sent = conn.open(self._header_block(path, remaining), body)
            timer = _Watch(loop, conn, stream, deadline, first_message_timeout, idle_timeout)
            try:
                if not sent:
                    await conn.send_request(stream, body)
                while stream.headers is None and not _finished(stream):
                    stream.waiter = loop.create_future()
                    await stream.waiter
            except asyncio.CancelledError:
                timer.cancel()
                conn.cancel(stream)
                raise
            refused = stream.reset == ErrorCode.REFUSED_STREAM and stream.headers is None
            if not refused or stream.error is not None or attempt == self.limits.refused_stream_attempts:
                return conn, stream, timer
            timer.cancel()
            pause = 0.005 * 2 ** (attempt - 1)
            if deadline is not None and loop.time() + pause >= deadline:
                raise RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            await asyncio.sleep(pause)
            attempt += 1

    async def unary(
        self,
        path: str,
        request: bytes,
        timeout: float | None = None,
        *,
        first_message_timeout: float | None = None,
    ) -> bytes:
        """One request, one response (within ``first_message_timeout``, if given, and the deadline)."""
        conn, stream, timer = await self._call(path, request, timeout, first_message_timeout)
        loop = asyncio.get_running_loop()
        try:
            while not _finished(stream):
                stream.waiter = loop.create_future()
                await stream.waiter
        except asyncio.CancelledError:
            conn.cancel(stream)
            raise
        finally:
            timer.cancel()
        error = _outcome(stream)
        if error is not None:
            raise error
        if len(stream.messages) != 1:
            raise RpcError(
                grpc.StatusCode.INTERNAL, f"expected one response message, got {len(stream.messages)}"
            )
        return conn.take_message(stream)

    async def server_stream(
        self,
        path: str,
        request: bytes,
        timeout: float | None = None,
        *,
        first_message_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """One request, a stream of responses; closing the iterator early cancels the call.

        ``first_message_timeout`` bounds the wait for the first message, ``idle_timeout`` each wait for the
        next one (the time the caller spends between two messages does not count)."""
        batches = self.server_stream_batches(
            path, request, timeout, first_message_timeout=first_message_timeout, idle_timeout=idle_timeout
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                for message in batch:
                    yield message

    async def server_stream_batches(
        self,
        path: str,
        request: bytes,
        timeout: float | None = None,
        *,
        first_message_timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[list[bytes], None]:
        """As :meth:`server_stream`, but each step yields every response already received (at least one):
        a caller that falls behind a fast server catches up a batch at a time, not a message at a time.
        The stream's flow-control window bounds a batch."""
        conn, stream, timer = await self._call(path, request, timeout, first_message_timeout, idle_timeout)
        loop = asyncio.get_running_loop()
        try:
            while True:
                if stream.messages:
                    if not timer.got_message:
                        timer.message_taken()
                    yield [conn.take_message(stream) for _ in range(len(stream.messages))]
                elif _finished(stream):
                    break
                else:
                    stream.waiter = loop.create_future()
                    timer.waiting_since = loop.time()
                    await stream.waiter
                    timer.waiting_since = None
        finally:
            timer.cancel()
            if stream.trailers is None:
                conn.cancel(stream)  # we were cancelled, or stopped reading: the server should stop too
        error = _outcome(stream)
        if error is not None:
            raise error

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None and not conn.closed:
            conn.write(goaway(0, ErrorCode.NO_ERROR))
            conn.close()
