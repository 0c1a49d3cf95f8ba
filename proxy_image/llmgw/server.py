"""``llmgw proxy``: the process the operator runs as LLMGateway pods.

It serves the gRPC front, the REST front and the admin port from one asyncio (uvloop) event loop, and:

- reloads its configuration when the file, or a file it names (API keys), changes, polling the
  content every ``reloadIntervalSeconds``. That also works for Kubernetes ConfigMap and Secret volumes,
  which kubelet updates by swapping a symlink. A bad new file is rejected, logged and counted
  (``llmgw_config_reloads_total{result="failure"}``) and the old configuration stays in effect. Listen
  addresses and TLS files take effect at the next restart;
- on SIGTERM or SIGINT, drains: readiness turns to 503 and health to NOT_SERVING, the listeners stop
  accepting, and in-flight requests and streams get up to ``shutdown.drainSeconds`` to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
import ssl
import time

from aiohttp import web
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from llmgw._net.grpc_server import BIDI, Method, Server
from llmgw._net.http_server import HTTPServer
from llmgw.fronts import grpc_health, llmservice
from llmgw.fronts.admin import admin_app
from llmgw.fronts.anthropic import AnthropicFront
from llmgw.fronts.openai import OpenAIFront
from llmgw.fronts.rest import RestRouter
from llmgw.gateway import Gateway
from llmgw.metrics import Metrics
from llmgw_common import config as config_mod
from llmgw_common.config import ConfigError, ProxyConfig

log = logging.getLogger("llmgw.proxy")

_SPARE_FILES = 64  # descriptors besides connections: the admin port, config files, the event loop's own


def open_file_limit(config: ProxyConfig) -> tuple[int, int]:
    """Raise this process's soft open-file limit to its hard limit (as Go's runtime does for every server),
    then warn when the connections the configuration allows (both fronts' maxConnections and every
    provider's) could still take every descriptor: a full front would then leave none to the others.
    Returns (descriptors the configuration may need, the soft limit now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    limits = config.limits
    upstream = sum(getattr(p.settings, "max_connections", 1) for p in config.providers.values())
    needed = limits.rest_server.max_connections + limits.grpc_server.max_connections + upstream + _SPARE_FILES
    if soft != resource.RLIM_INFINITY and needed > soft:
        log.warning(
            "the open-file limit (%d) is below what the configuration allows: %d REST and %d gRPC client "
            "connections (limits.restServer.maxConnections, limits.grpcServer.maxConnections), %d to providers "
            "(their maxConnections) and %d spare; lower those limits or raise the limit (ulimit -n)",
            soft,
            limits.rest_server.max_connections,
            limits.grpc_server.max_connections,
            upstream,
            _SPARE_FILES,
        )
    return needed, int(soft)


class ProxyServer:
    def __init__(self, config_path: str, metrics: Metrics | None = None) -> None:
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.config: ProxyConfig = config_mod.load(config_path)
        self.gateway = Gateway(self.config, self.metrics)
        self._fingerprint = config_mod.fingerprint(self.config.source_files)
        self.draining = False
        self.grpc_port = self.rest_port = self.admin_port = 0
        self._runners: list[web.AppRunner] = []
        self.health = grpc_health.HealthService()
        self.grpc_server = self._grpc_server()
        self.rest_server = HTTPServer(
            RestRouter(
                OpenAIFront(self.gateway, self.config.limits.max_request_bytes).routes(),
                AnthropicFront(self.gateway, self.config.limits.max_request_bytes).routes(),
                error_shapes=AnthropicFront.error_shapes,
            ).handle,
            self.config.limits.rest_server,
            lambda limit: self._limit_hit(f"restServer.{limit}"),  # distinct from the gRPC front's keys
        )
        self._watcher: asyncio.Task[None] | None = None
        self.metrics.reloads.labels("success").inc()
        self.metrics.last_reload.set(time.time())

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.tls is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.config.tls.cert_file, self.config.tls.key_file)
        return context

    def _grpc_server(self) -> Server:
        """The gRPC port: the LLM service, health and reflection."""
        names = (llmservice.SERVICE_NAME, grpc_health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflector = reflection.aio.ReflectionServicer(names)
        methods = {
            **llmservice.LLMServiceFront(self.gateway).methods(),
            **self.health.methods(),
            f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": Method(
                BIDI, reflection_pb2.ServerReflectionRequest, reflector.ServerReflectionInfo
            ),
        }
        return Server(
            methods, self.config.limits.grpc_server, lambda limit: self._limit_hit(f"grpcServer.{limit}")
        )

    def _limit_hit(self, limit: str) -> None:
        self.metrics.child(self.metrics.limit_hits, limit).inc()

    async def start(self) -> None:
        cfg = self.config
        open_file_limit(cfg)
        host, port = config_mod.check_listen_address(cfg.listen.grpc, "listen")
        self.grpc_port = await self.grpc_server.start(host, port, self._ssl_context())
        for service in ("", llmservice.SERVICE_NAME):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

        host, port = config_mod.check_listen_address(cfg.listen.rest, "listen")
        self.rest_port = await self.rest_server.start(host, port, self._ssl_context())
        self.admin_port = await self._serve(
            admin_app(self.metrics, lambda: not self.draining), cfg.listen.admin
        )
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        log.info(
            "proxy serving gRPC on port %d, REST on port %d, admin on port %d (config generation %d)",
            self.grpc_port,
            self.rest_port,
            self.admin_port,
            cfg.generation,
        )

    async def _serve(self, app: web.Application, address: str) -> int:
        host, port = config_mod.check_listen_address(address, "listen")
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        self._runners.append(runner)
        bound = runner.addresses  # the real port when port 0 was asked for
        return int(bound[-1][1]) if bound else port

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.config.reload_interval_s)
            self.reload_if_changed()

    def reload_if_changed(self) -> bool:
        """Load the configuration again if any file it depends on changed; True when a new one took effect."""
        fingerprint = config_mod.fingerprint(self.config.source_files)
        if fingerprint == self._fingerprint:
            return False
        try:
            new = config_mod.load(self.config_path)
        except ConfigError as exc:
            self._fingerprint = fingerprint  # report a bad file once, not on every poll
            self.metrics.reloads.labels("failure").inc()
            log.error("configuration change rejected, keeping generation %d: %s", self.config.generation, exc)
            return False
        self._fingerprint = config_mod.fingerprint(new.source_files)
        if new.listen != self.config.listen or new.tls != self.config.tls:
            log.warning("listen addresses or TLS files changed: they take effect when the proxy restarts")
        self.gateway.apply(new)
        self.config = new
        self.metrics.reloads.labels("success").inc()
        self.metrics.last_reload.set(time.time())
        log.info("configuration generation %d in effect", new.generation)
        return True

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, then close everything."""
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        grace = self.config.drain_s
        log.info("draining: %d request(s) in flight, up to %.0fs", self.gateway.admission.inflight, grace)
        if self._watcher is not None:
            self._watcher.cancel()
        self.health.enter_graceful_shutdown()
        await self.rest_server.stop_accepting()  # open requests and streams keep being served
        grpc_stopped = asyncio.get_running_loop().create_task(self.grpc_server.stop(grace))
        deadline = time.monotonic() + grace
        while self.gateway.admission.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await grpc_stopped
        await self.rest_server.close()
        for runner in self._runners:
            await runner.cleanup()
        await self.gateway.close()
        log.info("drained; exiting")

    async def run_until_signal(self) -> None:
        await self.start()
        # Everything allocated so far lives as long as the process: keep the collector from rescanning it.
        gc.collect()
        gc.freeze()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.drain()


def run(config_path: str) -> int:
    """Run the proxy until SIGTERM/SIGINT; exit code 2 for a configuration that cannot be loaded."""
    import uvloop

    try:
        server = ProxyServer(config_path)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(server.run_until_signal())
    return 0
