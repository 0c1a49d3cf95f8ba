"""The bounds of each network layer, one typed object per layer, as hypercorn's and uvicorn's ``Config``
and h11's ``max_incomplete_event_size`` pass them in.

The proxy's configuration holds them under ``limits`` (``limits.restServer``, ``limits.grpcServer``,
``limits.restClient``, ``limits.grpcClient``); :mod:`llmgw._net` takes them in its constructors and keeps
no bound of its own. The body and message limits of the two fronts are ``limits.maxRequestBytes``. The
defaults are the values the proxy has always used.
"""

from __future__ import annotations

import dataclasses

from llmgw_common.reader import Reader

MiB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class HTTPServerLimits:
    """What one client of an HTTP/1.1 server may make it hold."""

    # request line and headers, counted as they arrive (a head still incomplete too); larger: 431, closed
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 4 * MiB  # larger: the handler is told the body is too large, and it is not kept
    # parsed ahead of the one being answered (or bodies of those over max_body_bytes) before reading pauses
    max_pipelined_requests: int = 8
    request_timeout_s: float = 60.0  # to receive one whole request; a trickling client gets 408, closed
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    # a new connection's first request head, and each request's head, must arrive within this (or within
    # request_timeout_s, if shorter); else 408 (nothing sent yet: just closed)
    request_header_timeout_s: float = 10.0
    # response bytes queued to a client that does not read them (the write buffer's high-water mark) before
    # the next pipelined answer, and the next chunk of a stream, wait until it reads
    max_queued_response_bytes: int = 64 * 1024
    # a response that cannot be written out for this long (the client reads nothing) closes the
    # connection at once: its handler is cancelled, with its admission slot and upstream call
    stalled_write_timeout_s: float = 30.0
    # open connections on one listener; more are answered 503 and closed at once
    max_connections: int = 4096
    # request bodies held by the whole listener (arriving, waiting and being answered); a body past its first
    # 64 KiB that would take more is answered 503 with Retry-After and its connection closed. Raised to
    # max_body_bytes if below
    max_buffered_body_bytes: int = 256 * MiB


@dataclasses.dataclass(frozen=True)
class HTTP2Limits:
    """What the peer of one HTTP/2 connection (gRPC) may make this end hold."""

    # SETTINGS_INITIAL_WINDOW_SIZE: unread data per stream; a server's holds at least its largest message
    # (max_message_bytes + 5), so that a message within the limit can arrive. More: RST_STREAM
    # FLOW_CONTROL_ERROR
    stream_window_bytes: int = 4 * MiB
    # unread data per connection (a server's at least its stream window); more: GOAWAY FLOW_CONTROL_ERROR.
    # A server whose window fills with unfinished messages of several calls ends the largest of those
    # calls (RESOURCE_EXHAUSTED), so the others can finish
    connection_window_bytes: int = 16 * MiB
    max_header_block_bytes: int = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE; larger ends the connection
    max_message_bytes: int = 4 * MiB  # one gRPC message, after decompression; larger: RESOURCE_EXHAUSTED
    # SETTINGS_MAX_CONCURRENT_STREAMS (100, as Envoy and nghttp2 advertise): streams the peer may have open;
    # a HEADERS opening one more is answered RST_STREAM REFUSED_STREAM and nothing of it is kept
    max_concurrent_streams: int = 100
    # frames other than DATA (ACKs, RST_STREAM, WINDOW_UPDATE, headers) queued to a peer that has stopped
    # reading (the write buffer over its high-water mark); more: GOAWAY ENHANCE_YOUR_CALM, connection dropped
    max_queued_control_bytes: int = MiB
    # PING and SETTINGS (not ACKs), PRIORITY, GOAWAY and unknown frames per second; more: GOAWAY ENHANCE_YOUR_CALM
    max_control_frames_per_second: int = 1000
    # DATA, HEADERS, CONTINUATION frames in a row that carry nothing (no payload, no END_STREAM);
    # more: GOAWAY ENHANCE_YOUR_CALM
    max_empty_frames: int = 10
    # RST_STREAMs from the peer per second ("rapid reset", CVE-2023-44487); more: GOAWAY ENHANCE_YOUR_CALM
    max_resets_per_second: int = 200
    # servers only: the client's preface and first SETTINGS must arrive within this; else GOAWAY, closed
    preface_timeout_s: float = 10.0
    # servers only: a connection without an open stream this long gets GOAWAY NO_ERROR and is closed
    idle_timeout_s: float = 300.0
    # WINDOW_UPDATE frames a second beyond one for each DATA frame this end sent (a reader that opens
    # windows as it reads never reaches it); more: GOAWAY ENHANCE_YOUR_CALM
    max_window_updates_per_second: int = 1000
    # servers only: a stream whose DATA cannot be sent this long (the client opens no window) ends with
    # RESOURCE_EXHAUSTED (or RST_STREAM CANCEL mid-message) and its handler is cancelled; a connection whose
    # window or socket does not drain this long is closed
    stalled_write_timeout_s: float = 30.0
    # servers only: open connections on one listener; more are answered GOAWAY ENHANCE_YOUR_CALM and closed
    max_connections: int = 4096
    # servers only: a unary or server-streaming request not received in full within this (or the call's
    # deadline, if sooner) ends with DEADLINE_EXCEEDED and what arrived of it is dropped
    request_receive_timeout_s: float = 60.0


@dataclasses.dataclass(frozen=True)
class HTTPClientLimits:
    """What one REST provider may make its pooled HTTP/1.1 client hold."""

    idle_timeout_s: float = 30.0  # an idle pooled connection older than this is not reused
    read_ahead_bytes: int = MiB  # unread body bytes of one response before the socket stops being read
    max_response_bytes: int = 64 * MiB  # a whole (non-streamed) response body
    max_error_body_bytes: int = 64 * 1024  # an error body is read for its message only
    # status line and header fields of a response (interim 1xx responses and trailers included), counted
    # as they arrive; larger: the call fails (502 naming the provider) and the connection is dropped
    max_response_header_bytes: int = 64 * 1024
    # header fields of a response (interim responses and trailers included); more: as above
    max_response_headers: int = 100
    # one line, and the data of one event, of a streamed (Server-Sent Events) response; larger: the stream
    # fails (an error event to the client naming the provider) and the connection is dropped
    max_sse_event_bytes: int = MiB


@dataclasses.dataclass(frozen=True)
class GrpcChannelLimits:
    """What one gRPC provider may make its channel hold, and how a vanished one is noticed."""

    http2: HTTP2Limits = HTTP2Limits(max_message_bytes=64 * MiB)
    keepalive_idle_s: int = 30  # TCP keepalive: probe a connection silent this long,
    keepalive_interval_s: int = 10  # then every this often,
    keepalive_probes: int = 3  # and give up after this many unanswered probes
    unacked_data_timeout_s: float = 30.0  # TCP_USER_TIMEOUT: sent data unacknowledged this long ends it
    refused_stream_attempts: int = 5  # sends of a call the server refuses unprocessed (REFUSED_STREAM)


def _http2(r: Reader, default: HTTP2Limits) -> HTTP2Limits:
    return HTTP2Limits(
        stream_window_bytes=r.integer(
            "streamWindowBytes", default.stream_window_bytes, minimum=65_535, maximum=2**31 - 1
        ),
        connection_window_bytes=r.integer(
            "connectionWindowBytes", default.connection_window_bytes, minimum=65_535, maximum=2**31 - 1
        ),
        max_header_block_bytes=r.integer("maxHeaderBlockBytes", default.max_header_block_bytes, minimum=1024),
        max_message_bytes=default.max_message_bytes,
        max_concurrent_streams=r.integer(
            "maxConcurrentStreams", default.max_concurrent_streams, minimum=1, maximum=2**31 - 1
        ),
        max_queued_control_bytes=r.integer(
            "maxQueuedControlBytes", default.max_queued_control_bytes, minimum=16 * 1024
        ),
        max_control_frames_per_second=r.integer(
            "maxControlFramesPerSecond", default.max_control_frames_per_second, minimum=10
        ),
        max_empty_frames=r.integer("maxEmptyFrames", default.max_empty_frames, minimum=1),
        max_resets_per_second=r.integer("maxResetsPerSecond", default.max_resets_per_second, minimum=10),
        max_window_updates_per_second=r.integer(
            "maxWindowUpdatesPerSecond", default.max_window_updates_per_second, minimum=10
        ),
        preface_timeout_s=default.preface_timeout_s,
        idle_timeout_s=default.idle_timeout_s,
        stalled_write_timeout_s=default.stalled_write_timeout_s,
        max_connections=default.max_connections,
        request_receive_timeout_s=default.request_receive_timeout_s,
    )


def parse_http_server(r: Reader, max_body_bytes: int) -> HTTPServerLimits:
    d = HTTPServerLimits()
    return HTTPServerLimits(
        max_head_bytes=r.integer("maxHeadBytes", d.max_head_bytes, minimum=1024),
        max_body_bytes=max_body_bytes,
        max_pipelined_requests=r.integer("maxPipelinedRequests", d.max_pipelined_requests, maximum=1024),
        request_timeout_s=r.number("requestReadTimeoutSeconds", d.request_timeout_s),
        keepalive_timeout_s=r.number("keepAliveTimeoutSeconds", d.keepalive_timeout_s),
        request_header_timeout_s=r.number("requestHeaderTimeoutSeconds", d.request_header_timeout_s),
        max_queued_response_bytes=r.integer(
            "maxQueuedResponseBytes", d.max_queued_response_bytes, minimum=4096, maximum=64 * MiB
        ),
        stalled_write_timeout_s=r.number("stalledWriteTimeoutSeconds", d.stalled_write_timeout_s),
        max_connections=r.integer("maxConnections", d.max_connections, maximum=1_000_000),
        # never below one whole body, or a request within maxRequestBytes could not arrive
        max_buffered_body_bytes=max(
            r.integer("maxBufferedBodyBytes", d.max_buffered_body_bytes, minimum=MiB), max_body_bytes
        ),
    )


def parse_grpc_server(r: Reader, max_message_bytes: int) -> HTTP2Limits:
    d = HTTP2Limits()
    return dataclasses.replace(
        _http2(r, HTTP2Limits(max_message_bytes=max_message_bytes)),
        preface_timeout_s=r.number("prefaceTimeoutSeconds", d.preface_timeout_s),
        idle_timeout_s=r.number("idleTimeoutSeconds", d.idle_timeout_s),
        stalled_write_timeout_s=r.number("stalledWriteTimeoutSeconds", d.stalled_write_timeout_s),
        max_connections=r.integer("maxConnections", d.max_connections, maximum=1_000_000),
        request_receive_timeout_s=r.number("requestReceiveTimeoutSeconds", d.request_receive_timeout_s),
    )


def parse_http_client(r: Reader) -> HTTPClientLimits:
    d = HTTPClientLimits()
    return HTTPClientLimits(
        idle_timeout_s=r.number("idleTimeoutSeconds", d.idle_timeout_s),
        read_ahead_bytes=r.integer("readAheadBytes", d.read_ahead_bytes, minimum=1024),
        max_response_bytes=r.integer("maxResponseBytes", d.max_response_bytes, minimum=1024),
        max_error_body_bytes=r.integer("maxErrorBodyBytes", d.max_error_body_bytes, minimum=1024),
        max_response_header_bytes=r.integer(
            "maxResponseHeaderBytes", d.max_response_header_bytes, minimum=1024, maximum=16 * MiB
        ),
        max_response_headers=r.integer(
            "maxResponseHeaders", d.max_response_headers, minimum=8, maximum=10_000
        ),
        max_sse_event_bytes=r.integer(
            "maxSSEEventBytes", d.max_sse_event_bytes, minimum=1024, maximum=1024 * MiB
        ),
    )


def parse_grpc_channel(r: Reader) -> GrpcChannelLimits:
    d = GrpcChannelLimits()
    http2 = _http2(r, d.http2)
    return GrpcChannelLimits(
        http2=dataclasses.replace(
            http2, max_message_bytes=r.integer("maxMessageBytes", d.http2.max_message_bytes, minimum=1024)
        ),
        keepalive_idle_s=r.integer("keepAliveIdleSeconds", d.keepalive_idle_s),
        keepalive_interval_s=r.integer("keepAliveIntervalSeconds", d.keepalive_interval_s),
        keepalive_probes=r.integer("keepAliveProbes", d.keepalive_probes),
        unacked_data_timeout_s=r.number("unackedDataTimeoutSeconds", d.unacked_data_timeout_s),
        refused_stream_attempts=r.integer("refusedStreamAttempts", d.refused_stream_attempts, maximum=100),
    )
