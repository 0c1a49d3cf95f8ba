"""``grpc.health.v1.Health`` on the gRPC port: the serving status per service name ("" is the whole
server), NOT_SERVING for good once the proxy drains. It needs no API key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from llmgw._net.grpc_server import SERVER_STREAM, UNARY, Method, ServerCall
from llmgw._net.grpc_wire import RpcError

SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class HealthService:
    """``grpc.health.v1.Health``: the serving status per service name ("" is the whole server)."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._shutting_down = False
        self._changed = asyncio.Event()

    def set(self, service: str, status: int) -> None:
        if self._shutting_down:
            return  # a draining server stays NOT_SERVING
        self._status[service] = status
        self._changed.set()
        self._changed = asyncio.Event()

    def enter_graceful_shutdown(self) -> None:
        for service in self._status:
            self.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._shutting_down = True

    async def check(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> Any:
        status = self._status.get(request.service)
        if status is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(self, request: health_pb2.HealthCheckRequest, call: ServerCall) -> AsyncIterator[Any]:
        last = None
        while True:
            changed = self._changed
            status = self._status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await changed.wait()

    def methods(self) -> dict[str, Method]:
        return {
            f"/{SERVICE_NAME}/Check": Method(UNARY, health_pb2.HealthCheckRequest, self.check),
            f"/{SERVICE_NAME}/Watch": Method(SERVER_STREAM, health_pb2.HealthCheckRequest, self.watch),
        }
