"""gRPC over HTTP/2, the part llmgw's gRPC server (the front) and gRPC channel (the upstream client) share.

gRPC runs on HTTP/2 (RFC 9113). One TCP connection carries many *streams*, one per call, each made of
frames: a HEADERS frame opens it (the method as ``:path``, then the call's metadata), DATA frames carry the
messages, each prefixed by a compressed flag and a 4-byte length, and the server ends the call with a
second HEADERS frame, the *trailers*, whose ``grpc-status`` and ``grpc-message`` are the outcome.

Both ends obey *flow control*: a sender may send only as many DATA bytes as the receiver's window allows,
per stream and for the whole connection, and the receiver reopens its windows with WINDOW_UPDATE as its
application consumes what arrived; so a slow reader slows its sender instead of filling memory. Header
lists are compressed with HPACK (RFC 7541). This module decodes with the ``hpack`` package and encodes
without HPACK's dynamic table, which keeps the encoder stateless and lets constant header blocks be
built once.

grpcio's own stack costs a proxy a second full set of per-call machinery (``bench/README.md``, "Why llmgw
has its own network stacks"); this one is written for llmgw's calls: small messages, many concurrent
streams, one event loop. What a peer may make a connection hold is bounded by one
:class:`~llmgw_common.limits.HTTP2Limits`, advertised in this end's SETTINGS.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import enum
import logging
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence

import grpc
import hpack
from hpack.table import HeaderTable

from llmgw_common.limits import HTTP2Limits

log = logging.getLogger("llmgw._net.grpc_wire")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_NOT_GRPC = "is the other end a gRPC endpoint, with TLS on or off as this end has it?"

# Frame types (RFC 9113 section 6)
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
_DEPENDS_ON_ITSELF = 0x100  # not a wire flag: marks a HEADERS frame whose priority names its own stream

# Settings identifiers
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MAX_HEADER_LIST_SIZE = 6


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


DEFAULT_WINDOW = 65_535
DEFAULT_FRAME_SIZE = 16_384
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
# What this end lets a peer have in flight: per stream, and for the whole connection.

STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}


class H2ProtocolError(Exception):
    """The peer broke HTTP/2, or one of this end's limits (``limit``, its configuration key): the connection
    ends with GOAWAY carrying ``code``."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR, limit: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.limit = limit


class _Rate:
    """A token bucket: up to ``rate`` events at once, and ``rate`` more every second."""

    __slots__ = ("last", "rate", "tokens")

    def __init__(self, rate: int) -> None:
        self.rate = float(rate)
        self.tokens = self.rate
        self.last = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        if self.tokens < self.rate:  # what events earned (give) may exceed the bucket
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def give(self, events: float) -> None:
        """Events earned otherwise than by time: a stream's and the connection's WINDOW_UPDATE for each DATA
        frame sent, which a peer may send at once after reading many."""
        if self.tokens < 2**20:
            self.tokens += events


class RpcError(Exception):
    """A call's outcome other than OK: a status code, a message for people, and trailing metadata."""

    def __init__(
        self, code: grpc.StatusCode, details: str = "", trailers: Sequence[tuple[str, str]] = ()
    ) -> None:
        super().__init__(f"{code.name}: {details}" if details else code.name)
        self.code = code
        self.details = details
        self.trailers = tuple(trailers)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in settings.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def rst_stream(stream_id: int, code: ErrorCode) -> bytes:
    return frame(RST_STREAM, 0, stream_id, struct.pack(">I", code))


def goaway(last_stream_id: int, code: ErrorCode, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code) + debug)


def message(payload: bytes) -> bytes:
    """One gRPC length-prefixed message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


# --- HPACK encoding without the dynamic table --------------------------------------------------------

_STATIC_FULL = {entry: i for i, entry in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}
_STATIC_NAME = {name: i for i, (name, _) in reversed(list(enumerate(HeaderTable.STATIC_TABLE, 1)))}


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
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


def _string(data: bytes) -> bytes:
    return _integer(len(data), 7, 0) + data


def encode_headers(headers: Iterable[tuple[str, str]]) -> bytes:
    """An HPACK block that uses only the static table: fully indexed, or a literal never added to a table."""
    out = []
    for name, value in headers:
        key = (name.encode("ascii"), value.encode("latin-1"))
        index = _STATIC_FULL.get(key)
        if index is not None:
            out.append(_integer(index, 7, 0x80))
            continue
        name_index = _STATIC_NAME.get(key[0])
        if name_index is not None:
            out.append(_integer(name_index, 4, 0x00) + _string(key[1]))
        else:
            out.append(b"\x00" + _string(key[0]) + _string(key[1]))
    return b"".join(out)


# --- HPACK decoding -----------------------------------------------------------------------------------


def _skip_integer(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    """The integer at ``block[i]`` with an N-bit prefix, and the index after it."""
    mask = (1 << prefix_bits) - 1
    value = block[i] & mask
    i += 1
    if value == mask:
        shift = 0
        while True:
            byte = block[i]
            i += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
    return value, i


def _kind_of_block(block: bytes) -> tuple[bool, bool]:
    """(only indexed fields, changes the dynamic table) of an HPACK block, from its representations."""
    i, size, only_indexed = 0, len(block), True
    while i < size:
        first = block[i]
        if first & 0x80:  # indexed field
            _, i = _skip_integer(block, i, 7)
            continue
        if first & 0x40 or first & 0x20:  # literal with incremental indexing, or a table size update
            return False, True
        only_indexed = False
        name_index, i = _skip_integer(block, i, 4)  # literal without indexing / never indexed
        for _ in range(1 if name_index else 2):
            length, i = _skip_integer(block, i, 7)
            i += length
    return only_indexed, False


class HeaderDecoder:
    """HPACK decoding with a cache for blocks made only of indexed fields.

    A peer that sends the same headers again (grpcio does, call after call) sends them as a few bytes of
    table indices. Such a block does not change the dynamic table, so its meaning stays the same until
    some block does; the cache is emptied then.
    """

    def __init__(self, max_header_list_size: int) -> None:
        self._hpack = hpack.Decoder(max_header_list_size=max_header_list_size)
        self._cache: dict[bytes, list[tuple[str, str]]] = {}

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        """The header list (shared with later identical blocks: do not modify it)."""
        cached = self._cache.get(block)
        if cached is not None:
            return cached
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in self._hpack.decode(block, raw=True)]
        only_indexed, changes_table = _kind_of_block(block)
        if changes_table:
            self._cache.clear()
        elif only_indexed:
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[block] = headers
        return headers


# --- gRPC metadata ---------------------------------------------------------------------------------

_UNRESERVED = frozenset(range(0x20, 0x7F)) - {ord("%")}


def percent_encode(text: str) -> str:
    """grpc-message's encoding: printable ASCII except '%' as is, everything else as %XX of its UTF-8."""
    data = text.encode("utf-8")
    if all(b in _UNRESERVED for b in data):
        return text
    return "".join(chr(b) if b in _UNRESERVED else f"%{b:02X}" for b in data)


def percent_decode(text: str) -> str:
    if "%" not in text:
        return text
    out = bytearray()
    i = 0
    raw = text.encode("latin-1", "replace")
    while i < len(raw):
        if raw[i] == 0x25 and _is_hex(raw[i + 1 : i + 3]):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


def metadata_value(key: str, value: str) -> str | bytes:
    """A custom metadata value as gRPC defines it: keys ending in ``-bin`` carry base64 of binary data."""
    if key.endswith("-bin"):
        try:
            return base64.b64decode(value + "=" * (-len(value) % 4))
        except ValueError:  # not base64 after all: keep its bytes rather than fail the call
            return value.encode("latin-1")
    return value


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """grpc-timeout: up to 8 digits and a unit (H, M, S, m, u, n); raises ValueError otherwise."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    if not 2 <= len(value) <= 9 or not (value[:-1].isascii() and value[:-1].isdigit()) or unit is None:
        raise ValueError(value)
    return int(value[:-1]) * unit


def format_timeout(seconds: float) -> str:
    millis = max(1, int(seconds * 1000 + 0.999))
    return f"{millis}m" if millis < 100_000_000 else f"{min(int(seconds + 1), 99_999_999)}S"


# --- streams and connections --------------------------------------------------------------------------


class Stream:
    """One call's stream as this end sees it: what arrived (headers, messages, trailers) and the send window."""

    __slots__ = (
        "encoding",
        "ended",
        "error",
        "expected_length",
        "headers",
        "held",
        "id",
        "messages",
        "partial",
        "plain",
        "received",
        "reset",
        "send_blocked",
        "send_window",
        "stall_progress",
        "stalled_since",
        "trailers",
        "unacked",
        "waiter",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.headers: list[tuple[str, str]] | None = None
        self.trailers: list[tuple[str, str]] | None = None
        # each message with the bytes it took on the wire (what returns to the peer's window once read)
        self.messages: collections.deque[tuple[bytes, int]] = collections.deque()
        self.partial = bytearray()
        self.encoding = "identity"
        self.plain = False  # not a gRPC call: its body is counted, not parsed into messages
        self.expected_length: int | None = None  # the request's content-length, when it has one
        self.received = 0  # DATA payload bytes so far, padding excluded
        self.ended = False  # the peer sent END_STREAM
        self.reset: ErrorCode | None = None  # the stream ended abnormally (RST_STREAM or connection lost)
        self.error: RpcError | None = None  # why this end gave up on the stream (a client's deadline, say)
        self.send_window = send_window
        self.send_blocked = False  # a send waits for this stream's or the connection's window
        # loop time a send first waited for a window, until a frame's worth (stall_progress) went out since
        self.stalled_since: float | None = None
        self.stall_progress = 0
        self.unacked = 0  # bytes received and consumed but not yet returned to the peer's window
        self.held = 0  # bytes received and not yet returned to the peer's window (buffered or unacked)
        self.waiter: asyncio.Future[None] | None = None

    def wake(self) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class Connection(asyncio.Protocol):
    """An HTTP/2 connection: frames in and out, flow control, and the stream table.

    Subclasses say what a new stream means (:meth:`headers_received`) and react to a stream's progress
    (:meth:`stream_changed`); both are called from ``data_received``, so they must not block.
    """

    is_client = False

    def __init__(self, limits: HTTP2Limits, on_limit: Callable[[str], None] | None = None) -> None:
        self.limits = limits
        self.on_limit = on_limit  # told the configuration key of each limit the peer runs into
        self.max_message_bytes = limits.max_message_bytes
        # The windows this end grants. A message is only handed on whole, so a server's windows hold at
        # least its largest message, or a client sending one would wait for window forever.
        self.stream_window = limits.stream_window_bytes
        self.connection_window = limits.connection_window_bytes
        self._flush_below = 0  # credit is returned at once when less than this is left of a window
        if not self.is_client:
            self.stream_window = min(MAX_WINDOW, max(self.stream_window, self.max_message_bytes + 5))
            self.connection_window = max(self.connection_window, self.stream_window)
            # A peer that waits for window to send the rest of a message must get it back, however little
            # was consumed since the last WINDOW_UPDATE.
            self._flush_below = self.max_message_bytes + 5
        self._held = 0  # bytes received on the connection and not yet returned to the peer's window
        # servers: how long DATA may wait for a window or a socket that does not drain (clients have
        # TCP_USER_TIMEOUT for the socket)
        self.stall_timeout: float | None = None if self.is_client else limits.stalled_write_timeout_s
        self.transport: asyncio.Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stall_timer: asyncio.TimerHandle | None = None  # the socket has not drained since it was armed
        self._abort_timer: asyncio.TimerHandle | None = None  # after close(): abort if the peer never reads
        self.streams: dict[int, Stream] = {}
        self._buffer = bytearray()
        self._decoder = HeaderDecoder(limits.max_header_block_bytes)
        self._need_preface = not self.is_client
        self._continuation: tuple[int, int, bytearray] | None = None  # stream id, flags, block so far
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = DEFAULT_FRAME_SIZE
        self.peer_max_streams = 2**31
        self.send_window = DEFAULT_WINDOW  # the connection's
        self._connection_unacked = 0
        self._window_waiters: list[Stream] = []  # streams waiting for the connection's window
        self._writable: asyncio.Future[None] | None = None
        self._out: list[bytes] | None = None  # written this turn of the event loop, not yet sent
        self.highest_stream = 0  # streams above this one are idle: never opened
        self.peer_settings_seen = False
        self.settings_acked = False  # the peer applies this end's SETTINGS (its stream limit among them)
        self._peer = "server" if self.is_client else "client"
        self.failure: str | None = None  # why this end ended the connection, for error messages
        self._reset_by_us: dict[int, None] = {}  # recent streams this end reset (frames may still come)
        self.closed = False
        self.goaway_received: int | None = None  # the last stream id the peer will process
        self._ping_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._paused_bytes = 0  # frames other than DATA written while the peer does not read
        self._control_rate = _Rate(limits.max_control_frames_per_second)
        self._reset_rate = _Rate(limits.max_resets_per_second)
        self._window_update_rate = _Rate(limits.max_window_updates_per_second)
        self._empty_frames = 0  # in a row

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self._loop = asyncio.get_running_loop()
        local = settings_frame(
            {
                ENABLE_PUSH: 0,
                MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
                INITIAL_WINDOW_SIZE: self.stream_window,
                MAX_HEADER_LIST_SIZE: self.limits.max_header_block_bytes,
            }
        ) + window_update(0, self.connection_window - DEFAULT_WINDOW)
        self.write((PREFACE if self.is_client else b"") + local)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in (self._stall_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        for stream in list(self.streams.values()):
            if stream.reset is None and not (stream.ended and stream.trailers is not None):
                stream.reset = ErrorCode.CANCEL
            self.stream_changed(stream)
            stream.wake()
        self.streams.clear()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        while self._ping_waiters:
            waiter = self._ping_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = asyncio.get_running_loop().create_future()
        if self.stall_timeout is not None and self._stall_timer is None:
            self._stall_timer = asyncio.get_running_loop().call_later(self.stall_timeout, self._write_stalled)
            # A server reads no more requests from a client that does not read the answers: what it holds
            # for it stays what one read brought. (A client keeps reading: two ends that both stopped could
            # wait on each other.)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused_bytes = 0
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def _write_stalled(self) -> None:
        """The socket did not drain below its low-water mark for ``stall_timeout``: the peer reads nothing."""
        self._stall_timer = None
        if self.transport is None:
            return
        self.limit_hit("stalledWriteTimeoutSeconds")
        log.info("HTTP/2 %s read nothing for %g s: connection dropped", self._peer, self.stall_timeout)
        self.failure = "the peer reads nothing (stalled write)"
        self.closed = True
        self._out = None
        self.transport.abort()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark (a slow peer)."""
        if self._writable is not None and not self._writable.done():
            await self._writable

    def data_received(self, data: bytes) -> None:
        try:
            self._frames(data)
        except H2ProtocolError as exc:
            if exc.limit:
                self.limit_hit(exc.limit)
            self.fail(exc.code, str(exc))
        except hpack.OversizedHeaderListError as exc:  # decoded size, HPACK's amplification included
            self.limit_hit("maxHeaderBlockBytes")
            self.fail(ErrorCode.ENHANCE_YOUR_CALM, f"header list too large: {exc}")
        except hpack.HPACKError as exc:
            self.fail(ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}")
        except Exception as exc:  # input that slipped past the checks, or a bug: end this connection only
            log.exception("unexpected error handling HTTP/2 input")
            self.fail(ErrorCode.INTERNAL_ERROR, f"internal error ({type(exc).__name__})")

    def fail(self, code: ErrorCode, reason: str) -> None:
        """End the connection for a protocol violation, telling the peer why."""
        log.info("HTTP/2 connection error (%s): %s", code.name, reason)  # the peer's mistake, not ours
        self.failure = reason
        if not self.closed:
            self.write(goaway(self.last_peer_stream(), code, reason.encode()[:200]))
            self.close()
        self.closed = True

    def last_peer_stream(self) -> int:
        return 0

    def limit_hit(self, limit: str) -> None:
        if self.on_limit is not None:
            try:
                self.on_limit(limit)
            except Exception:
                log.exception("on_limit callback failed")

    # frames in

    def _frames(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos = 0
        if self._need_preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(bytes(buffer)):
                    raise H2ProtocolError(f"not an HTTP/2 connection preface ({_NOT_GRPC})")
                return
            if buffer[: len(PREFACE)] != PREFACE:
                raise H2ProtocolError(f"not an HTTP/2 connection preface ({_NOT_GRPC})")
            pos = len(PREFACE)
            self._need_preface = False
        size = len(buffer)
        while size - pos >= 9 and not self.closed:
            length = int.from_bytes(buffer[pos : pos + 3], "big")
            kind = buffer[pos + 3]
            if not self.peer_settings_seen:
                if kind != SETTINGS:  # every HTTP/2 peer starts with SETTINGS (RFC 9113 section 3.4)
                    raise H2ProtocolError(
                        f"the {self._peer} did not start with HTTP/2 SETTINGS ({_NOT_GRPC})"
                    )
                self.peer_settings_seen = True
            if length > DEFAULT_FRAME_SIZE:  # we never raise our SETTINGS_MAX_FRAME_SIZE
                raise H2ProtocolError(f"frame of {length} bytes", ErrorCode.FRAME_SIZE_ERROR)
            if size - pos - 9 < length:
                break
            flags = buffer[pos + 4]
            stream_id = int.from_bytes(buffer[pos + 5 : pos + 9], "big") & MAX_STREAM_ID
            payload = bytes(buffer[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self._frame(kind, flags, stream_id, payload)
        del buffer[:pos]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuation is not None and kind != CONTINUATION:
            raise H2ProtocolError("a header block was interrupted by another frame")
        if kind <= HEADERS or kind == CONTINUATION:  # DATA, HEADERS, CONTINUATION
            if payload or flags & END_STREAM:
                self._empty_frames = 0
            else:
                self._empty_frames += 1
                if self._empty_frames > self.limits.max_empty_frames:
                    raise H2ProtocolError(
                        f"more than {self.limits.max_empty_frames} empty frames in a row",
                        ErrorCode.ENHANCE_YOUR_CALM,
                        "maxEmptyFrames",
                    )
        elif (
            kind in (PRIORITY, GOAWAY)
            or kind > CONTINUATION
            or (kind in (PING, SETTINGS) and not flags & ACK)
        ) and not self._control_rate.take():
            raise H2ProtocolError(
                f"more than {self.limits.max_control_frames_per_second} PING, SETTINGS, PRIORITY, GOAWAY and "
                "unknown frames a second",
                ErrorCode.ENHANCE_YOUR_CALM,
                "maxControlFramesPerSecond",
            )
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise H2ProtocolError("HEADERS on stream 0")
            payload = _unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                if int.from_bytes(payload[:4], "big") & MAX_STREAM_ID == stream_id:
                    flags |= _DEPENDS_ON_ITSELF
                payload = payload[5:]
            if flags & END_HEADERS:
                self._header_block(stream_id, flags, payload)
            else:
                self._continuation = (stream_id, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self._continuation is None or self._continuation[0] != stream_id:
                raise H2ProtocolError("unexpected CONTINUATION")
            block = self._continuation[2]
            block += payload
            if len(block) > self.limits.max_header_block_bytes:
                raise H2ProtocolError(
                    "header block too large", ErrorCode.ENHANCE_YOUR_CALM, "maxHeaderBlockBytes"
                )
            if flags & END_HEADERS:
                first_flags = self._continuation[1]
                self._continuation = None
                self._header_block(stream_id, first_flags, bytes(block))
        elif kind == SETTINGS:
            if flags & ACK:
                if payload:
                    raise H2ProtocolError("SETTINGS ACK with a payload", ErrorCode.FRAME_SIZE_ERROR)
                self.settings_acked = True
                return
            if len(payload) % 6 or stream_id:
                raise H2ProtocolError("malformed SETTINGS", ErrorCode.FRAME_SIZE_ERROR)
            window_grew = False
            for offset in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HI", payload, offset)
                window_grew |= self._setting(key, value)
            self.write(frame(SETTINGS, ACK, 0))
            if window_grew:  # only then can a stream waiting for its window send more
                for stream in [s for s in self.streams.values() if s.send_blocked and s.send_window > 0]:
                    stream.wake()
            self.settings_received()
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise H2ProtocolError("malformed WINDOW_UPDATE", ErrorCode.FRAME_SIZE_ERROR)
            if not self._window_update_rate.take():
                raise H2ProtocolError(
                    f"more than {self.limits.max_window_updates_per_second} WINDOW_UPDATE frames a second "
                    "beyond the DATA frames sent",
                    ErrorCode.ENHANCE_YOUR_CALM,
                    "maxWindowUpdatesPerSecond",
                )
            increment = int.from_bytes(payload, "big") & MAX_WINDOW
            if stream_id > self.highest_stream:
                raise H2ProtocolError(f"WINDOW_UPDATE on idle stream {stream_id}")
            if stream_id == 0:
                if increment == 0:
                    raise H2ProtocolError("WINDOW_UPDATE of 0")
                self.send_window += increment
                if self.send_window > MAX_WINDOW:
                    raise H2ProtocolError("connection window overflow", ErrorCode.FLOW_CONTROL_ERROR)
                waiting, self._window_waiters = self._window_waiters, []
                for stream in waiting:
                    stream.wake()
            else:
                updated = self.streams.get(stream_id)
                if updated is not None:
                    updated.send_window += increment
                    if increment == 0:
                        self.stream_error(updated, ErrorCode.PROTOCOL_ERROR)
                    elif updated.send_window > MAX_WINDOW:
                        self.stream_error(updated, ErrorCode.FLOW_CONTROL_ERROR)
                    elif updated.send_blocked:
                        updated.wake()
        elif kind == PING:
            if len(payload) != 8 or stream_id:
                raise H2ProtocolError("malformed PING", ErrorCode.FRAME_SIZE_ERROR)
            if flags & ACK:
                if self._ping_waiters:
                    waiter = self._ping_waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)
            else:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if len(payload) != 4:
                raise H2ProtocolError("malformed RST_STREAM", ErrorCode.FRAME_SIZE_ERROR)
            if stream_id == 0 or stream_id > self.highest_stream:
                raise H2ProtocolError(f"RST_STREAM on {'stream 0' if stream_id == 0 else 'an idle stream'}")
            if not self.is_client and not self._reset_rate.take():
                raise H2ProtocolError(
                    f"more than {self.limits.max_resets_per_second} streams reset a second",
                    ErrorCode.ENHANCE_YOUR_CALM,
                    "maxResetsPerSecond",
                )
            ended = self.streams.get(stream_id)
            if ended is not None:
                code = int.from_bytes(payload, "big")
                self._drop(
                    ended, ErrorCode(code) if code in ErrorCode._value2member_map_ else ErrorCode.CANCEL
                )
        elif kind == GOAWAY:
            if stream_id:
                raise H2ProtocolError("GOAWAY on a stream")
            if len(payload) < 8:
                raise H2ProtocolError("malformed GOAWAY", ErrorCode.FRAME_SIZE_ERROR)
            last, code = struct.unpack_from(">II", payload)
            self.goaway_received = last & MAX_STREAM_ID
            if code != ErrorCode.NO_ERROR:
                log.info("peer ended the HTTP/2 connection: %s %r", code, payload[8:200])
            self.goaway(self.goaway_received)
        elif kind == PUSH_PROMISE:
            raise H2ProtocolError("PUSH_PROMISE although push is disabled")
        elif kind == PRIORITY:  # deprecated by RFC 9113 and ignored, once well-formed
            if stream_id == 0:
                raise H2ProtocolError("PRIORITY on stream 0")
            if len(payload) != 5:
                self.reset_stream(stream_id, ErrorCode.FRAME_SIZE_ERROR)
            elif int.from_bytes(payload[:4], "big") & MAX_STREAM_ID == stream_id:
                self.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)
        # unknown frame types are ignored, as RFC 9113 asks

    def _setting(self, key: int, value: int) -> bool:
        """Apply one setting; True if it grew the streams' send windows."""
        if key == INITIAL_WINDOW_SIZE:
            if value > MAX_WINDOW:
                raise H2ProtocolError("initial window too large", ErrorCode.FLOW_CONTROL_ERROR)
            delta = value - self.peer_initial_window
            self.peer_initial_window = value
            if delta:  # SETTINGS that repeat the window cost nothing per stream
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2ProtocolError("a stream's window overflows", ErrorCode.FLOW_CONTROL_ERROR)
            return delta > 0
        elif key == MAX_FRAME_SIZE:
            if not DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                raise H2ProtocolError("bad SETTINGS_MAX_FRAME_SIZE")
            self.peer_max_frame = value
        elif key == MAX_CONCURRENT_STREAMS:
            self.peer_max_streams = value
        elif key == ENABLE_PUSH and value > 1:
            raise H2ProtocolError("SETTINGS_ENABLE_PUSH other than 0 or 1")
        return False

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise H2ProtocolError("DATA on stream 0")
        size = len(payload)
        self._held += size
        if self._held > self.connection_window:  # a peer that ignores flow control cannot fill memory
            raise H2ProtocolError(
                f"the {self._peer} sent more than the connection's window",
                ErrorCode.FLOW_CONTROL_ERROR,
                "connectionWindowBytes",
            )
        payload = _unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended:
            self.consumed(None, size)  # bytes of a closed stream still count against the connection
            if stream is None and stream_id in self._reset_by_us:
                return  # sent before the peer saw our RST_STREAM
            if stream_id > self.highest_stream:
                raise H2ProtocolError(f"DATA on idle stream {stream_id}")
            raise H2ProtocolError(f"DATA on closed stream {stream_id}", ErrorCode.STREAM_CLOSED)
        stream.held += size
        if stream.held > self.stream_window:
            self.limit_hit("streamWindowBytes")
            self.consumed(None, size)
            self.stream_error(stream, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self.consumed(stream, size - len(payload))  # padding is consumed on arrival
        stream.received += len(payload)
        if stream.plain:
            self.consumed(stream, len(payload))
        else:
            self._messages(stream, payload)
            if self.connection_window - self._held < DEFAULT_FRAME_SIZE and self._flush_below:
                self._unjam()
        if stream.reset is not None:
            return
        if flags & END_STREAM:
            stream.ended = True
            if stream.expected_length is not None and stream.expected_length != stream.received:
                self.stream_error(stream, ErrorCode.PROTOCOL_ERROR)  # content-length said otherwise
                return
        self.stream_changed(stream)
        stream.wake()

    def _unjam(self) -> None:
        """The connection's window is (nearly) shut. If nothing buffered is a whole message, the peer
        cannot finish any and this end cannot consume any: unfinished messages of several streams have
        filled the window. The stream holding most of it is given up, so the others can go on."""
        if any(stream.messages for stream in self.streams.values()):
            return  # they will be consumed, and the window reopens
        largest = max(self.streams.values(), key=lambda stream: len(stream.partial), default=None)
        if largest is not None and largest.partial:
            self.limit_hit("connectionWindowBytes")
            self.window_full(largest)

    def _messages(self, stream: Stream, payload: bytes) -> None:
        stream.partial += payload
        partial = stream.partial
        while len(partial) >= 5:
            length = int.from_bytes(partial[1:5], "big")
            if length > self.max_message_bytes:
                self.message_too_large(stream, length)
                return
            if len(partial) < 5 + length:
                break
            compressed = partial[0]
            body = bytes(partial[5 : 5 + length])
            del partial[: 5 + length]
            if compressed:
                try:
                    inflated = self._decompress(stream, compressed, body)
                except ValueError as exc:  # the peer's data, not this end: the call fails, not the connection
                    self.consumed(None, 5 + length)
                    self.message_invalid(stream, str(exc))
                    return
                if inflated is None:
                    self.consumed(None, 5 + length)  # not kept: back to the connection's window
                    self.message_too_large(stream, self.max_message_bytes + 1, decompressed=True)
                    return
                body = inflated
            stream.messages.append((body, 5 + length))

    def _decompress(self, stream: Stream, flag: int, body: bytes) -> bytes | None:
        """The message inflated, or None if it inflates beyond ``max_message_bytes`` (never inflated
        further than that: a small gzip bomb stays small); ValueError for data that cannot be inflated."""
        if flag != 1:
            raise ValueError(f"a message with the reserved compressed flag {flag}")
        if stream.encoding == "gzip":
            inflater = zlib.decompressobj(wbits=31)
        elif stream.encoding == "deflate":
            inflater = zlib.decompressobj()
        elif stream.encoding == "identity":
            raise ValueError("a compressed message without grpc-encoding")
        else:
            raise ValueError(f"a compressed message with the unsupported grpc-encoding {stream.encoding!r}")
        try:
            out = inflater.decompress(body, self.max_message_bytes + 1)
        except zlib.error as exc:
            raise ValueError(f"a message that is not valid {stream.encoding} data ({exc})") from None
        if len(out) > self.max_message_bytes:
            self.limit_hit("maxMessageBytes")
            return None
        if not inflater.eof or inflater.unused_data:
            raise ValueError(f"a message that is not one complete {stream.encoding} stream")
        return out

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        # Decoded even for a stream about to be refused: HPACK's table must follow every block.
        self.headers_received(stream_id, self._decoder.decode(block), bool(flags & END_STREAM))
        if flags & _DEPENDS_ON_ITSELF:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.stream_error(stream, ErrorCode.PROTOCOL_ERROR)
            else:
                self.reset_stream(stream_id, ErrorCode.PROTOCOL_ERROR)

    # for subclasses

    def headers_received(self, stream_id: int, headers: list[tuple[str, str]], end_stream: bool) -> None:
        raise NotImplementedError

    def stream_changed(self, stream: Stream) -> None:
        """Something arrived for ``stream`` (headers, messages, trailers, the end, or a reset)."""

    def message_too_large(self, stream: Stream, length: int, decompressed: bool = False) -> None:
        """A message of ``length`` bytes (more than that, inflated, if ``decompressed``) is over the limit."""
        raise NotImplementedError

    def message_invalid(self, stream: Stream, reason: str) -> None:
        """A message could not be decompressed (``reason`` says why): the call ends with INTERNAL."""
        stream.error = RpcError(grpc.StatusCode.INTERNAL, f"the {self._peer} sent {reason}")
        self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)

    def window_full(self, stream: Stream) -> None:
        """Unfinished messages, this stream's the largest, fill the connection's window: give up on it."""
        self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)

    def send_stalled(self, stream: Stream, mid_message: bool) -> None:
        """The peer opened no window for ``stream`` for ``stall_timeout`` (``mid_message``: part of a message
        was sent): give up on the stream."""
        self.stream_error(stream, ErrorCode.CANCEL, by_peer=False)

    def settings_received(self) -> None:
        """The peer's SETTINGS arrived and are in effect (the first of them completes its preface)."""

    def goaway(self, last_stream_id: int) -> None:
        """The peer will not process streams above ``last_stream_id``."""

    # frames out

    def write(self, data: bytes, control: bool = True) -> None:
        """Send ``data`` now, or, while several streams are open, with everything else written during
        this turn of the event loop, in one system call.

        Under load, responses complete together (one read from an upstream wakes many calls), and a
        system call per response is most of a proxy's CPU. A lone call does not wait for the turn to end.

        Frames other than flow-controlled DATA (``control``) written while the peer does not read are
        counted: past ``max_queued_control_bytes`` the connection is dropped, so that a peer that sends
        PINGs, SETTINGS or requests and never reads the answers cannot make this end hold them all.
        """
        if self.transport is None or self.closed:
            return
        if control and self._writable is not None and not self._writable.done():
            self._paused_bytes += len(data)
            if self._paused_bytes > self.limits.max_queued_control_bytes:
                self.limit_hit("maxQueuedControlBytes")
                log.info("HTTP/2 peer does not read what it asks for: connection dropped")
                self.failure = "the peer does not read (ENHANCE_YOUR_CALM)"
                self.closed = True
                self._out = None
                self.transport.write(goaway(self.last_peer_stream(), ErrorCode.ENHANCE_YOUR_CALM))
                self.transport.abort()  # what is queued is dropped: the peer would not read it anyway
                return
        if self._out is not None:
            self._out.append(data)
        elif len(self.streams) > 1:
            self._out = [data]
            asyncio.get_running_loop().call_soon(self.flush)
        else:
            self.transport.write(data)

    def flush(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.closed:
            self.transport.write(b"".join(out))

    def close(self) -> None:
        """Send what is queued, then close the connection (aborted if the peer reads none of it in time)."""
        self.flush()
        if self.transport is not None:
            self.transport.close()
            if self.stall_timeout is not None and self._abort_timer is None and self._loop is not None:
                self._abort_timer = self._loop.call_later(self.stall_timeout, self.transport.abort)

    def consumed(self, stream: Stream | None, size: int) -> None:
        """Give ``size`` consumed bytes back to the peer's windows, in batches of a quarter window (at once
        when less than a whole message is left of a window)."""
        if size <= 0:
            return
        out = b""
        if stream is not None and not stream.ended:
            stream.unacked += size
            if stream.unacked >= self.stream_window // 4 or (
                self.stream_window - stream.held < self._flush_below and not stream.plain
            ):
                out = window_update(stream.id, stream.unacked)
                stream.held -= stream.unacked
                stream.unacked = 0
        self._connection_unacked += size
        if (
            self._connection_unacked >= self.connection_window // 4
            or self.connection_window - self._held < self._flush_below
        ):
            out += window_update(0, self._connection_unacked)
            self._held -= self._connection_unacked
            self._connection_unacked = 0
        if out:
            self.write(out)

    def reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        """Send RST_STREAM, and remember it for a while: the peer may have frames for it in flight."""
        self.write(rst_stream(stream_id, code))
        self._reset_by_us[stream_id] = None
        if len(self._reset_by_us) > 1024:
            del self._reset_by_us[next(iter(self._reset_by_us))]

    def stream_error(self, stream: Stream, code: ErrorCode, by_peer: bool = True) -> None:
        """End one stream for the peer's mistake (RFC 9113 section 5.4.2), or as this end gives up on it
        (not ``by_peer``); the connection goes on.

        A server counts the resets a client's mistakes cause with the client's own: malformed frames
        that make the server reset streams ("MadeYouReset") cost what RST_STREAMs do."""
        if by_peer and not self.is_client and not self.closed and not self._reset_rate.take():
            self.limit_hit("maxResetsPerSecond")
            self.fail(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"more than {self.limits.max_resets_per_second} streams reset a second",
            )
            return
        self.reset_stream(stream.id, code)
        self._drop(stream, code)

    def _drop(self, stream: Stream, code: ErrorCode) -> None:
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            stream.reset = code
            self._release(stream)
            self.stream_changed(stream)
            stream.wake()

    def _release(self, stream: Stream) -> None:
        """A stream that ends with bytes still queued: return them to the connection's window."""
        queued = len(stream.partial) + sum(size for _, size in stream.messages) - self.credited_early(stream)
        stream.messages.clear()
        stream.partial.clear()
        if queued > 0:
            self.consumed(None, queued)

    def credited_early(self, stream: Stream) -> int:
        """Bytes of ``stream``'s queued data already given back to the windows (forgotten once asked)."""
        return 0

    def take_message(self, stream: Stream) -> bytes:
        body, wire_size = stream.messages.popleft()
        self.consumed(stream, wire_size)  # the bytes received, not what they inflated to
        return body

    def try_send(self, stream: Stream, payload: bytes, prefix: bytes = b"", suffix: bytes = b"") -> bool:
        """Write ``prefix``, ``payload`` as one DATA frame and ``suffix`` at once, if the windows allow it."""
        size = len(payload)
        if size > self.peer_max_frame or size > self.send_window or size > stream.send_window:
            return False
        self.send_window -= size
        stream.send_window -= size
        self._window_update_rate.give(2.0)
        if stream.stalled_since is not None:
            self._progress(stream, size)
        self.write(prefix + frame(DATA, 0, stream.id, payload) + suffix, control=False)
        return True

    @staticmethod
    def _progress(stream: Stream, size: int) -> None:
        """``size`` bytes of a stream that had waited for a window went out: once a frame's worth has (a
        peer must open that much per ``stall_timeout``, across messages), the stream is no longer stalled."""
        stream.stall_progress += size
        if stream.stall_progress >= DEFAULT_FRAME_SIZE:
            stream.stalled_since, stream.stall_progress = None, 0

    async def send_data(self, stream: Stream, payload: bytes) -> None:
        """Send ``payload`` as DATA frames as the windows allow; raises ConnectionError if the stream ends,
        or if the windows stay shut for ``stall_timeout`` (the stream, or the connection if its window
        is the one shut, is ended then)."""
        view = memoryview(payload)
        while view:
            if self.closed or stream.reset is not None or stream.trailers is not None:
                raise ConnectionError("stream closed")
            allowed = min(self.send_window, stream.send_window, self.peer_max_frame, len(view))
            if allowed <= 0:
                loop = asyncio.get_running_loop()
                waiter = stream.waiter = loop.create_future()
                if self.send_window <= 0:
                    self._window_waiters.append(stream)
                stream.send_blocked = True
                try:
                    if self.stall_timeout is None:
                        await waiter
                    else:
                        if stream.stalled_since is None:
                            stream.stalled_since = loop.time()
                        remaining = stream.stalled_since + self.stall_timeout - loop.time()
                        await asyncio.wait_for(waiter, remaining)
                except TimeoutError:
                    self._send_stalled(stream, len(view) < len(payload))
                    raise ConnectionError("the peer opened no window") from None
                finally:
                    stream.send_blocked = False
                continue
            self.send_window -= allowed
            stream.send_window -= allowed
            self._window_update_rate.give(2.0)
            self.write(frame(DATA, 0, stream.id, bytes(view[:allowed])), control=False)
            view = view[allowed:]
            if stream.stalled_since is not None:
                self._progress(stream, allowed)
        await self.drain()

    def _send_stalled(self, stream: Stream, mid_message: bool) -> None:
        if self.closed or self.streams.get(stream.id) is not stream:
            return
        self.limit_hit("stalledWriteTimeoutSeconds")
        if self.send_window <= 0:  # nothing can be sent on the whole connection
            self.fail(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"the {self._peer} opened no connection window for {self.stall_timeout:g} s",
            )
        else:
            self.send_stalled(stream, mid_message)

    async def ping(self) -> None:
        """Send a PING and wait for its ACK (or the connection's end)."""
        waiter = asyncio.get_running_loop().create_future()
        self._ping_waiters.append(waiter)
        self.write(frame(PING, 0, 0, b"llmgwpng"))
        await waiter


def _unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise H2ProtocolError("bad padding")
    return payload[1 : len(payload) - payload[0]]


def status_from_http(status: str) -> grpc.StatusCode:
    """The gRPC status for a non-200 HTTP response, as gRPC's HTTP-to-gRPC status mapping defines it."""
    return {
        "400": grpc.StatusCode.INTERNAL,
        "401": grpc.StatusCode.UNAUTHENTICATED,
        "403": grpc.StatusCode.PERMISSION_DENIED,
        "404": grpc.StatusCode.UNIMPLEMENTED,
        "429": grpc.StatusCode.UNAVAILABLE,
        "502": grpc.StatusCode.UNAVAILABLE,
        "503": grpc.StatusCode.UNAVAILABLE,
        "504": grpc.StatusCode.UNAVAILABLE,
    }.get(status, grpc.StatusCode.UNKNOWN)


def status_of(trailers: Sequence[tuple[str, str]]) -> tuple[grpc.StatusCode, str]:
    """The status and message of a call's trailers; a grpc-status that is not a status code is UNKNOWN,
    with a message that says so (and what the server sent)."""
    code: grpc.StatusCode | None = None
    details = ""
    bad_status: str | None = None
    for key, value in trailers:
        if key == "grpc-status":
            known = STATUS_BY_CODE.get(int(value)) if value.isascii() and value.isdigit() else None
            if known is None:
                bad_status = value
            code = known if known is not None else grpc.StatusCode.UNKNOWN
        elif key == "grpc-message":
            details = percent_decode(value)
    if code is None:
        return grpc.StatusCode.INTERNAL, "the server's trailers carry no grpc-status"
    if bad_status is not None:
        sent = f"the server sent grpc-status {bad_status[:40]!r}, which is not a gRPC status code"
        return code, f"{sent}: {details}" if details else sent
    return code, details
