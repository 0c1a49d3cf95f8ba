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

    max_head_bytes: int = 16 * 1024  # request line and headers; larger: 431
    max_body_bytes: int = 4 * MiB  # larger: the handler is told the body is too large, and it is not kept
    max_pipelined_requests: int = 8  # parsed ahead of the one being answered before reading pauses
    request_timeout_s: float = 60.0  # to receive one whole request; a trickling client is disconnected
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this


@dataclasses.dataclass(frozen=True)
class HTTP2Limits:
    """What the peer of one HTTP/2 connection (gRPC) may make this end hold."""

    stream_window_bytes: int = 4 * MiB  # SETTINGS_INITIAL_WINDOW_SIZE: unread data per stream
    connection_window_bytes: int = 16 * MiB  # unread data per connection
    max_header_block_bytes: int = 64 * 1024  # SETTINGS_MAX_HEADER_LIST_SIZE; larger ends the connection
    max_message_bytes: int = 4 * MiB  # one gRPC message, after decompression; larger: RESOURCE_EXHAUSTED
    # SETTINGS_MAX_CONCURRENT_STREAMS (100, as Envoy and nghttp2 advertise): streams the peer may have open;
    # a HEADERS opening one more is answered RST_STREAM REFUSED_STREAM and nothing of it is kept
    max_concurrent_streams: int = 100
    # frames other than DATA (ACKs, RST_STREAM, WINDOW_UPDATE, headers) queued to a peer that has stopped
    # reading (the write buffer over its high-water mark); more: GOAWAY ENHANCE_YOUR_CALM, connection dropped
    max_queued_control_bytes: int = MiB
    # PING and SETTINGS (not ACKs) and PRIORITY frames per second; more: GOAWAY ENHANCE_YOUR_CALM
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


@dataclasses.dataclass(frozen=True)
class HTTPClientLimits:
    """What one REST provider may make its pooled HTTP/1.1 client hold."""

    idle_timeout_s: float = 30.0  # an idle pooled connection older than this is not reused
    read_ahead_bytes: int = MiB  # unread body bytes of one response before the socket stops being read
    max_response_bytes: int = 64 * MiB  # a whole (non-streamed) response body
    max_error_body_bytes: int = 64 * 1024  # an error body is read for its message only


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
        preface_timeout_s=default.preface_timeout_s,
        idle_timeout_s=default.idle_timeout_s,
    )


def parse_http_server(r: Reader, max_body_bytes: int) -> HTTPServerLimits:
    d = HTTPServerLimits()
    return HTTPServerLimits(
        max_head_bytes=r.integer("maxHeadBytes", d.max_head_bytes, minimum=1024),
        max_body_bytes=max_body_bytes,
        max_pipelined_requests=r.integer("maxPipelinedRequests", d.max_pipelined_requests),
        request_timeout_s=r.number("requestReadTimeoutSeconds", d.request_timeout_s),
        keepalive_timeout_s=r.number("keepAliveTimeoutSeconds", d.keepalive_timeout_s),
    )


def parse_grpc_server(r: Reader, max_message_bytes: int) -> HTTP2Limits:
    d = HTTP2Limits()
    return dataclasses.replace(
        _http2(r, HTTP2Limits(max_message_bytes=max_message_bytes)),
        preface_timeout_s=r.number("prefaceTimeoutSeconds", d.preface_timeout_s),
        idle_timeout_s=r.number("idleTimeoutSeconds", d.idle_timeout_s),
    )


def parse_http_client(r: Reader) -> HTTPClientLimits:
    d = HTTPClientLimits()
    return HTTPClientLimits(
        idle_timeout_s=r.number("idleTimeoutSeconds", d.idle_timeout_s),
        read_ahead_bytes=r.integer("readAheadBytes", d.read_ahead_bytes, minimum=1024),
        max_response_bytes=r.integer("maxResponseBytes", d.max_response_bytes, minimum=1024),
        max_error_body_bytes=r.integer("maxErrorBodyBytes", d.max_error_body_bytes, minimum=1024),
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
