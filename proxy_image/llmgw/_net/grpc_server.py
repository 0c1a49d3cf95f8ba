"""A gRPC server on asyncio, for the proxy's gRPC front: unary, server-streaming and bidirectional methods.

Each call runs as one asyncio task. A handler receives the decoded request and a :class:`ServerCall`
(the caller's metadata and deadline) and returns the response, or, for a streaming method, is an async
generator of responses. It reports a failure by raising :class:`~llmgw._net.grpc_wire.RpcError`; any other
exception becomes INTERNAL and is logged. The caller's deadline (``grpc-timeout``) and its cancellation
(RST_STREAM, or the connection closing) cancel the handler's task, and with it whatever it awaits, such
as an upstream call.

A client cannot hold a call, or the admission slot its handler holds, by not reading or not sending: a
response that waits for a window (or a socket) longer than ``stalled_write_timeout_s`` ends the call
(RESOURCE_EXHAUSTED, or RST_STREAM mid-message; the connection, if nothing at all can be sent on it), a
request not received in full within ``request_receive_timeout_s`` ends with DEADLINE_EXCEEDED, and a
listener serves at most ``max_connections`` connections (:class:`~llmgw_common.limits.HTTP2Limits`).

:meth:`Server.stop` drains like grpcio's ``stop(grace)``: it stops accepting connections, tells every
client with GOAWAY which calls will still be served (those already started), lets them finish within the
grace period, and then ends the rest with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from llmgw._net.grpc_wire import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    MAX_STREAM_ID,
    Connection,
    ErrorCode,
    H2ProtocolError,
    RpcError,
    Stream,
    encode_headers,
    frame,
    goaway,
    message,
    metadata_value,
    parse_timeout,
    percent_encode,
)
from llmgw_common.limits import HTTP2Limits

log = logging.getLogger("llmgw.grpc")

UNARY, SERVER_STREAM, BIDI = "unary", "server_stream", "bidi"


@dataclasses.dataclass(frozen=True)
class Method:
    """A method's shape, its request type (anything with ``FromString``) and its handler."""

    kind: str
    request_type: Any
    handler: Callable[..., Any]


class ServerCall:
    """What a handler knows of its call: the caller's metadata, deadline and address."""

    __slots__ = (
        "_expire",
        "_task",
        "deadline",
        "deadline_exceeded",
        "headers_sent",
        "metadata",
        "method",
        "peer",
        "stream",
        "timer",
    )

    def __init__(
        self, stream: Stream, method: Method, metadata: tuple[tuple[str, str | bytes], ...], peer: str
    ) -> None:
        self.stream = stream
        self.method = method
        self.metadata = metadata
        self.peer = peer
        self.deadline: float | None = None  # loop time
        self.deadline_exceeded = False
        self.timer: asyncio.TimerHandle | None = None
        self.headers_sent = False
        self._task: asyncio.Task[None] | None = None
        self._expire: Callable[[], None] | None = None  # ends the call with DEADLINE_EXCEEDED

    def value(self, key: str) -> str | bytes | None:
        """The first metadata value under ``key`` (lower case), if any."""
        for name, value in self.metadata:
            if name == key:
                return value
        return None

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - asyncio.get_running_loop().time())

    def limit_time(self, seconds: float) -> None:
        """End the call (DEADLINE_EXCEEDED) ``seconds`` from now unless the caller's deadline comes first:
        the server's own time limit, which holds while the call waits for flow-control window too."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        if self._expire is None or (self.deadline is not None and self.deadline <= deadline):
            return
        if self.timer is not None:
            self.timer.cancel()
        self.deadline = deadline
        self.timer = loop.call_at(deadline, self._expire)


def _header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    out = [frame(HEADERS, flags, stream_id, chunks[0])]
    out += [frame(CONTINUATION, 0, stream_id, c) for c in chunks[1:-1]]
    out.append(frame(CONTINUATION, END_HEADERS, stream_id, chunks[-1]))
    return b"".join(out)


_RESPONSE_HEADERS = encode_headers([(":status", "200"), ("content-type", "application/grpc")])
_OK_TRAILERS = encode_headers([("grpc-status", "0")])
_RESERVED_METADATA = frozenset({"content-type", "te", "user-agent", "grpc-timeout", "grpc-encoding"})
_REQUEST_PSEUDO = frozenset({":method", ":scheme", ":path", ":authority"})
_CONNECTION_SPECIFIC = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
_ENCODINGS = frozenset({"identity", "gzip", "deflate"})
_PLAIN_BODY = "This port serves gRPC (POST, content-type application/grpc), e.g. llmgateway.v1.LLMService.\n"


def _trailers(
    code: grpc.StatusCode, details: str, extra: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    out = [("grpc-status", str(code.value[0]))]
    if details:
        out.append(("grpc-message", percent_encode(details)))
    return out + list(extra)


@contextlib.asynccontextmanager
async def _closing(responses: AsyncIterator[Any]) -> AsyncIterator[AsyncIterator[Any]]:
    """A handler's responses, closed as soon as the call ends (its ``finally`` blocks, such as the
    release of an admission slot, run then, not when the garbage collector finds the generator)."""
    try:
        yield responses
    finally:
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            await aclose()


class _GrpcServerConnection(Connection):
    def __init__(self, server: Server) -> None:
        super().__init__(server.limits, server.on_limit)
        self.server = server
        self._timer: asyncio.TimerHandle | None = None  # the preface timeout, then the idle timeout
        self._last_active = 0.0  # loop time a stream last opened or closed
        self._idle_armed = False
        self.calls: dict[int, ServerCall] = {}
        self._plain: dict[int, str] = {}  # non-gRPC requests waiting for their end: the status to answer
        # requests still arriving: the loop time each must be complete by, in that order (one timeout for
        # all), and one timer for the first of them rather than one per call
        self._receiving: dict[int, float] = {}
        self._receive_timer: asyncio.TimerHandle | None = None
        self.accepting_until = MAX_STREAM_ID  # after GOAWAY: the last stream this connection serves
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peername = transport.get_extra_info("peername")
        self.peer = f"{peername[0]}:{peername[1]}" if peername else ""
        if len(self.server.connections) >= self.limits.max_connections:
            self.limit_hit("maxConnections")
            self.server.refused_connection()
            self.write(goaway(0, ErrorCode.ENHANCE_YOUR_CALM, b"too many connections"))
            self.close()
            self.closed = True
            return
        self.server.connections.add(self)
        loop = asyncio.get_running_loop()
        self._last_active = loop.time()
        self._timer = loop.call_later(self.limits.preface_timeout_s, self._preface_timeout)

    def _preface_timeout(self) -> None:
        if self.closed or self.peer_settings_seen:
            return
        self.limit_hit("prefaceTimeoutSeconds")
        self.fail(
            ErrorCode.PROTOCOL_ERROR,
            f"no HTTP/2 preface and SETTINGS within {self.limits.preface_timeout_s:g} s ({self.peer})",
        )

    def settings_received(self) -> None:
        if not self._idle_armed:  # the client's first SETTINGS: the preface timeout gives way to the idle one
            self._idle_armed = True
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(self.limits.idle_timeout_s, self._idle_check)

    def _idle_check(self) -> None:
        """GOAWAY and close a connection that has had no open stream for ``idle_timeout_s``."""
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.streams or self.calls:
            self._last_active = now
        idle_for = now - self._last_active
        if idle_for < self.limits.idle_timeout_s:
            self._timer = loop.call_later(self.limits.idle_timeout_s - idle_for, self._idle_check)
            return
        self.limit_hit("idleTimeoutSeconds")
        log.debug("closing idle HTTP/2 connection from %s", self.peer)
        self.write(goaway(self.highest_stream, ErrorCode.NO_ERROR, b"idle"))
        self.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._receive_timer is not None:
            self._receive_timer.cancel()
        self._receiving.clear()
        super().connection_lost(exc)
        for call in list(self.calls.values()):
            self._abandon(call)
        self.calls.clear()
        self.server.connections.discard(self)
        self.server.changed()

    def last_peer_stream(self) -> int:
        return self.highest_stream

    def headers_received(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is not None:  # a client's trailers: gRPC clients send none, but may end their side so
            if stream.ended:
                raise H2ProtocolError(f"HEADERS on half-closed stream {stream_id}", ErrorCode.STREAM_CLOSED)
            if not end_stream or any(key.startswith(":") for key, _ in headers):
                self.stream_error(stream, ErrorCode.PROTOCOL_ERROR)  # trailers end the stream, and are plain
                return
            stream.ended = True
            self.stream_changed(stream)
            stream.wake()
            return
        if stream_id % 2 == 0 or stream_id <= self.highest_stream:
            raise H2ProtocolError(
                f"stream id {stream_id} is not a new client stream", ErrorCode.STREAM_CLOSED
            )
        self.highest_stream = stream_id
        if stream_id > self.accepting_until:
            self.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        if len(self.streams) >= self.limits.max_concurrent_streams:  # RFC 9113 section 5.1.2
            self.limit_hit("maxConcurrentStreams")
            if self.settings_acked and not self._reset_rate.take():
                # A client that knows the limit and opens streams beyond it makes this end reset them:
                # as costly as resetting them itself (rapid reset), and bounded alike.
                raise H2ProtocolError(
                    f"more than {self.limits.max_resets_per_second} streams refused a second beyond "
                    f"SETTINGS_MAX_CONCURRENT_STREAMS ({self.limits.max_concurrent_streams})",
                    ErrorCode.ENHANCE_YOUR_CALM,
                    "maxResetsPerSecond",
                )
            self.reset_stream(stream_id, ErrorCode.REFUSED_STREAM)
            return
        self._last_active = asyncio.get_running_loop().time()
        stream = Stream(stream_id, self.peer_initial_window)
        stream.ended = end_stream
        pseudo: dict[str, str] = {}
        metadata: list[tuple[str, str | bytes]] = []
        timeout: float | None = None
        content_type = ""
        malformed = False
        for key, value in headers:
            if key.startswith(":"):
                # Pseudo-headers: known request ones, once each, before any other field (RFC 9113 8.3).
                malformed |= (
                    key not in _REQUEST_PSEUDO or key in pseudo or bool(metadata) or bool(content_type)
                )
                pseudo[key] = value
            elif key == "content-type":
                content_type = value
            elif key == "grpc-timeout":
                try:
                    timeout = parse_timeout(value)
                except (ValueError, KeyError):
                    timeout = None
            elif key == "grpc-encoding":
                stream.encoding = value
            elif key == "content-length":
                stream.expected_length = int(value) if value.isascii() and value.isdigit() else -1
            elif key in _CONNECTION_SPECIFIC or (key == "te" and value != "trailers") or key != key.lower():
                malformed = True
            elif key not in _RESERVED_METADATA:
                metadata.append((key, metadata_value(key, value)))
        self.streams[stream_id] = stream
        if malformed or not all(pseudo.get(k) for k in (":method", ":scheme", ":path")):
            self.stream_error(stream, ErrorCode.PROTOCOL_ERROR)
            return
        if end_stream and stream.expected_length not in (None, 0):
            self.stream_error(stream, ErrorCode.PROTOCOL_ERROR)  # content-length says a body follows
            return
        if pseudo[":method"] != "POST" or not content_type.startswith("application/grpc"):
            # Not a gRPC call (a browser, curl): answered in plain HTTP once its request is complete.
            stream.plain = True
            self._plain[stream_id] = "405" if pseudo[":method"] != "POST" else "415"
            if not end_stream:
                self._receive_within(stream)
            self.stream_changed(stream)
            return
        method = self.server.methods.get(pseudo[":path"])
        if method is None or stream.encoding not in _ENCODINGS:
            refusal = f"unknown method {pseudo[':path']}"
            trailers: tuple[tuple[str, str], ...] = ()
            if method is not None:  # gRPC's answer to an encoding it cannot read, naming those it can
                refusal = f"grpc-encoding {stream.encoding[:40]!r} is not supported"
                trailers = (("grpc-accept-encoding", ",".join(sorted(_ENCODINGS))),)
            self.write(
                self._status_frames(stream_id, grpc.StatusCode.UNIMPLEMENTED, refusal, trailers, False)
            )
            self._forget(stream)
            return
        call = ServerCall(stream, method, tuple(metadata), self.peer)
        call._expire = functools.partial(self._deadline, call)
        self.calls[stream_id] = call
        if timeout is not None:
            loop = asyncio.get_running_loop()
            call.deadline = loop.time() + timeout
            call.timer = loop.call_at(call.deadline, self._deadline, call)
        if method.kind == BIDI or end_stream:
            self._start(call)
        else:
            self._receive_within(stream)

    def _receive_within(self, stream: Stream) -> None:
        """Give a request ``request_receive_timeout_s`` to arrive in full: the whole request of a unary or
        server-streaming call, each message of a bidirectional one."""
        loop = asyncio.get_running_loop()
        due = self._receiving[stream.id] = loop.time() + self.limits.request_receive_timeout_s
        if self._receive_timer is None:
            self._receive_timer = loop.call_at(due, self._receive_timeouts)

    def _stop_receiving(self, stream_id: int) -> None:
        self._receiving.pop(stream_id, None)  # the timer stays: it finds nothing due

    def _receive_timeouts(self) -> None:
        self._receive_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._receiving and not self.closed:
            stream_id, due = next(iter(self._receiving.items()))
            if due > now:
                self._receive_timer = loop.call_at(due, self._receive_timeouts)
                return
            del self._receiving[stream_id]
            stream = self.streams.get(stream_id)
            if stream is not None:
                self._receive_timeout(stream)

    def _receive_timeout(self, stream: Stream) -> None:
        if self.closed or self.streams.get(stream.id) is not stream or stream.ended:
            return
        call = self.calls.get(stream.id)
        timeout = self.limits.request_receive_timeout_s
        if call is not None:
            task = call._task
            if task is not None and not stream.partial:  # a bidirectional call between messages
                return
            self.limit_hit("requestReceiveTimeoutSeconds")
            what = "a request message" if task is not None else "the request"
            self.finish(
                call, grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} did not arrive in full within {timeout:g} s"
            )
            if task is not None:
                task.cancel()
            return
        self.limit_hit("requestReceiveTimeoutSeconds")
        self._plain.pop(stream.id, None)
        self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)

    def stream_changed(self, stream: Stream) -> None:
        if stream.ended or stream.reset is not None:
            self._stop_receiving(stream.id)
        call = self.calls.get(stream.id)
        if call is not None and call._task is not None and not stream.ended:  # bidirectional, running
            if not stream.partial:
                self._stop_receiving(stream.id)
            elif stream.id not in self._receiving:  # a message has begun: it must end in time
                self._receive_within(stream)
        if call is None:
            status = self._plain.get(stream.id)
            if status is not None and (stream.ended or stream.reset is not None):
                del self._plain[stream.id]
                if stream.reset is None:
                    asyncio.get_running_loop().create_task(self._answer_plain(stream, status))
            return
        if stream.reset is not None:  # the client cancelled, or the connection is gone
            self._last_active = asyncio.get_running_loop().time()
            self.calls.pop(stream.id, None)
            self._abandon(call)
            self.server.changed()
        elif stream.ended and call._task is None:
            self._start(call)

    async def _answer_plain(self, stream: Stream, status: str) -> None:
        body = _PLAIN_BODY.encode()
        headers = [(":status", status), ("content-type", "text/plain; charset=utf-8")]
        headers.append(("content-length", str(len(body))))
        self.write(_header_frames(stream.id, encode_headers(headers), False, self.peer_max_frame))
        with contextlib.suppress(ConnectionError):
            await self.send_data(stream, body)  # in as many frames as the client's window asks for
            self.write(frame(DATA, END_STREAM, stream.id))
        self._forget(stream)

    def message_too_large(self, stream: Stream, length: int, decompressed: bool = False) -> None:
        if not decompressed:
            self.limit_hit("maxMessageBytes")
        call = self.calls.get(stream.id)
        if call is None:
            return
        if call._task is not None:
            call._task.cancel()
        size = f"more than {self.max_message_bytes} bytes decompressed" if decompressed else f"{length} bytes"
        self.finish(
            call,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request message of {size} is over the server's limit of {self.max_message_bytes} bytes",
        )

    def message_invalid(self, stream: Stream, reason: str) -> None:
        call = self.calls.get(stream.id)
        if call is None:
            self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)
            return
        if call._task is not None:
            call._task.cancel()
        self.finish(call, grpc.StatusCode.INTERNAL, f"the client sent {reason}")

    def window_full(self, stream: Stream) -> None:
        call = self.calls.get(stream.id)
        if call is None:
            self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)
            return
        if call._task is not None:
            call._task.cancel()
        self.finish(
            call,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "unfinished request messages of several calls filled the connection's window "
            f"({self.connection_window} bytes); this one, the largest, was given up",
        )

    def send_stalled(self, stream: Stream, mid_message: bool) -> None:
        """The client read nothing of a response for ``stall_timeout``: the call ends (and with it its
        handler, which is the one sending). With a whole message unsent the client gets a status;
        within a message only RST_STREAM can end it."""
        call = self.calls.get(stream.id)
        if call is not None and not mid_message:
            self.finish(
                call,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the client read none of the response for {self.stall_timeout:g} s",
            )
            return
        if call is not None:
            self.calls.pop(stream.id, None)
            if call.timer is not None:
                call.timer.cancel()
            self.server.changed()
        self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)

    @staticmethod
    def _abandon(call: ServerCall) -> None:
        """Stop a call nobody waits for any more: its handler, and its deadline timer."""
        if call.timer is not None:
            call.timer.cancel()
        if call._task is not None:
            call._task.cancel()

    def _deadline(self, call: ServerCall) -> None:
        if self.calls.get(call.stream.id) is not call:
            return
        call.deadline_exceeded = True
        if call._task is not None:
            call._task.cancel()
        else:
            self.finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    def _start(self, call: ServerCall) -> None:
        self._stop_receiving(call.stream.id)
        call._task = asyncio.get_running_loop().create_task(self._run(call))

    async def _requests(self, call: ServerCall) -> AsyncIterator[Any]:
        stream = call.stream
        while True:
            if stream.messages:
                yield self._decode(call, self.take_message(stream))
            elif stream.ended or stream.reset is not None:
                return
            else:
                stream.waiter = asyncio.get_running_loop().create_future()
                await stream.waiter

    @staticmethod
    def _decode(call: ServerCall, body: bytes) -> Any:
        try:
            return call.method.request_type.FromString(body)
        except DecodeError:
            raise RpcError(grpc.StatusCode.INTERNAL, "could not parse the request message") from None

    async def _run(self, call: ServerCall) -> None:
        method, stream = call.method, call.stream
        try:
            if method.kind == BIDI:
                async with _closing(method.handler(self._requests(call), call)) as responses:
                    async for response in responses:
                        await self._send(call, response.SerializeToString())
            else:
                if len(stream.messages) != 1:
                    raise RpcError(
                        grpc.StatusCode.INTERNAL,
                        f"expected one request message, got {len(stream.messages)}",
                    )
                request = self._decode(call, self.take_message(stream))
                if method.kind == UNARY:
                    response = await method.handler(request, call)
                    self._respond(call, response.SerializeToString())
                    return
                async with _closing(method.handler(request, call)) as responses:
                    async for response in responses:
                        await self._send(call, response.SerializeToString())
            self.finish(call, grpc.StatusCode.OK)
        except RpcError as exc:
            self.finish(call, exc.code, exc.details, exc.trailers)
        except asyncio.CancelledError:
            if call.deadline_exceeded:
                self.finish(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            elif self.server.stopping:
                self.finish(call, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        except ConnectionError:
            pass  # the stream or connection closed while we were sending
        except Exception:
            log.exception("unexpected error in %s", method.handler.__qualname__)
            self.finish(
                call, grpc.StatusCode.INTERNAL, "internal error in the server; its logs have the details"
            )

    def _respond(self, call: ServerCall, body: bytes) -> None:
        """A unary response: headers, message and trailers in one write when flow control allows."""
        stream = call.stream
        if stream.reset is not None or self.closed:
            return
        prefix = b"" if call.headers_sent else frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS)
        call.headers_sent = True
        suffix = frame(HEADERS, END_HEADERS | END_STREAM, stream.id, _OK_TRAILERS)
        if self.try_send(stream, message(body), prefix, suffix):
            self._close_stream(call)
            return
        self.write(prefix)
        task = asyncio.get_running_loop().create_task(self._send_then_finish(call, body))
        call._task = task

    async def _send_then_finish(self, call: ServerCall, body: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            await self.send_data(call.stream, message(body))
            self.finish(call, grpc.StatusCode.OK)

    async def _send(self, call: ServerCall, body: bytes) -> None:
        stream = call.stream
        if stream.reset is not None or self.closed:
            raise ConnectionError("stream closed")
        prefix = b""
        if not call.headers_sent:
            call.headers_sent = True
            prefix = frame(HEADERS, END_HEADERS, stream.id, _RESPONSE_HEADERS)
        if self.try_send(stream, message(body), prefix):
            await self.drain()
        else:
            self.write(prefix)
            await self.send_data(stream, message(body))

    def finish(
        self,
        call: ServerCall,
        code: grpc.StatusCode,
        details: str = "",
        trailers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        """End the call with a status: trailers after a response, or one trailers-only HEADERS frame."""
        stream = call.stream
        if stream.reset is not None or self.closed or self.calls.get(stream.id) is not call:
            return
        self.write(self._status_frames(stream.id, code, details, trailers, call.headers_sent))
        self._close_stream(call)

    def _status_frames(
        self,
        stream_id: int,
        code: grpc.StatusCode,
        details: str,
        trailers: tuple[tuple[str, str], ...],
        headers_sent: bool,
    ) -> bytes:
        fields = _trailers(code, details, trailers)
        if not headers_sent:
            fields = [(":status", "200"), ("content-type", "application/grpc"), *fields]
        return _header_frames(stream_id, encode_headers(fields), True, self.peer_max_frame)

    def _close_stream(self, call: ServerCall) -> None:
        if call.timer is not None:
            call.timer.cancel()
        self.calls.pop(call.stream.id, None)
        self._forget(call.stream)
        self.server.changed()

    def _forget(self, stream: Stream) -> None:
        self._stop_receiving(stream.id)
        self.streams.pop(stream.id, None)
        self._last_active = asyncio.get_running_loop().time()
        if not stream.ended:  # the client may still be sending: tell it to stop
            self.reset_stream(stream.id, ErrorCode.NO_ERROR)
            stream.ended = True
        self._release(stream)
        if self.accepting_until != MAX_STREAM_ID and not self.calls:
            self.close()

    async def begin_drain(self, ping_timeout: float) -> None:
        """GOAWAY twice, as RFC 9113 suggests: first "no new streams soon", then, a round trip later, the
        last stream id this connection will serve, so no call the client sent meanwhile is lost."""
        self.write(goaway(MAX_STREAM_ID, ErrorCode.NO_ERROR))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.ping(), ping_timeout)
        self.accepting_until = self.highest_stream
        self.write(goaway(self.highest_stream, ErrorCode.NO_ERROR))
        if not self.calls:
            self.close()


class Server:
    """Serves ``methods`` ({"/package.Service/Method": Method}) on one listening address."""

    def __init__(
        self,
        methods: dict[str, Method],
        limits: HTTP2Limits,
        on_limit: Callable[[str], None] | None = None,
    ) -> None:
        self.methods = methods
        self.limits = limits
        self.on_limit = on_limit  # told the configuration key of each limit a client runs into
        self.connections: set[_GrpcServerConnection] = set()
        self.stopping = False
        self._refused = 0  # connections refused (maxConnections) since the last log line about them
        self._refused_logged = -60.0  # monotonic time of that line
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (port 0 picks a free one); returns the bound port."""
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["h2"])
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _GrpcServerConnection(self),
            host,
            port,
            ssl=ssl_context,
            # a TLS client has as long for its handshake as a client in the clear for its preface
            ssl_handshake_timeout=self.limits.preface_timeout_s if ssl_context is not None else None,
            reuse_address=True,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def refused_connection(self) -> None:
        """Log connections refused for ``max_connections``: one line a minute at most, with their count."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 60.0:
            log.warning(
                "gRPC listener at its limit of %d connections: %d refused (limits.grpcServer.maxConnections)",
                self.limits.max_connections,
                self._refused,
            )
            self._refused, self._refused_logged = 0, now

    def changed(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def active_calls(self) -> int:
        return sum(len(c.calls) for c in self.connections)

    async def stop(self, grace: float) -> None:
        """Stop accepting; let started calls finish for up to ``grace`` seconds; end the rest."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        await asyncio.gather(*(c.begin_drain(min(1.0, grace)) for c in list(self.connections)))
        self._changed = asyncio.Event()
        deadline = time.monotonic() + grace
        while self.active_calls() and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
        tasks = [c._task for conn in self.connections for c in conn.calls.values() if c._task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
