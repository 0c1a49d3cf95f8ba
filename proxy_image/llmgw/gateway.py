"""The gateway's request path, shared by both fronts: admission, routing, the REST/gRPC split, retries,
fallback, caching and the metrics of each attempt.

A *route* sends a model's requests to a REST provider, a gRPC provider, or both. With both, each request
picks its path at random by the route's ``grpcWeight`` (0 and 100 are exact), and if that path fails with a
retryable error before anything reached the client, the request moves to the other path. The chosen path
gets one attempt when a fallback exists (the other path is the better retry); the last path gets the
provider's full retry budget, with exponential backoff, jitter and the upstream's Retry-After, all bounded
by the request's deadline. Streams are never retried once their first token was sent.

The configuration in effect is one immutable :class:`Runtime`; a reload builds a new one and swaps it in.
Requests keep the runtime they started with, so a reload never disturbs them; provider clients that the new
configuration no longer uses are closed once their last request is done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import inspect
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple, TypeVar

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import clip, is_deterministic, validate_request
from llmgw.codecs import openai_chat
from llmgw.errors import GatewayError, Kind
from llmgw.metrics import PRECREATED_CODES, Metrics, PathMetrics
from llmgw.providers import CLIENTS, CallStats, ProviderClient, connect
from llmgw.redact import add_secrets
from llmgw.retry import backoff_delay
from llmgw_common.config import ProxyConfig, Retries, Route

log = logging.getLogger("llmgw.gateway")
# Past the request's time limit, how long a streamed answer may still take to be written (stream_write_limit).
WRITE_GRACE_S = 1.0

_T = TypeVar("_T")


class ResponseCache:
    """A bounded LRU of complete responses to deterministic requests, each kept for ``ttl`` seconds."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: collections.OrderedDict[bytes, tuple[float, pb.ChatResponse]] = (
            collections.OrderedDict()
        )

    def get(self, key: bytes) -> pb.ChatResponse | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, response = entry
        if expires < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return response

    def put(self, key: bytes, response: pb.ChatResponse) -> None:
        self._entries[key] = (time.monotonic() + self.ttl, response)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Runtime:
    """One loaded configuration with the provider clients that serve it."""

    def __init__(self, config: ProxyConfig, clients: dict[str, ProviderClient]) -> None:
        self.config = config
        self.clients = clients
        self.cache = (
            ResponseCache(config.cache.max_entries, config.cache.ttl_s) if config.cache.enabled else None
        )
        self._client_keys = [k.encode() for k in config.client_keys]

    def check_api_key(self, authorization: str | None) -> None:
        """Refuse a request without one of the configured client keys (compared in constant time)."""
        if not self._client_keys:
            return
        if not authorization:
            raise GatewayError(Kind.UNAUTHENTICATED, "missing API key: send 'Authorization: Bearer <key>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise GatewayError(
                Kind.UNAUTHENTICATED, "malformed Authorization header: expected 'Bearer <key>'"
            )
        presented = token.strip().encode()
        matched = False
        for key in self._client_keys:  # no early exit: the time taken does not depend on which key matched
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise GatewayError(Kind.UNAUTHENTICATED, "invalid API key")

    def route(self, model: str) -> Route:
        route = self.config.route_for(model)
        if route is None:
            available = ", ".join(self.config.models) or "none"
            raise GatewayError(
                Kind.INVALID_ARGUMENT, f"model: unknown model {clip(model)} (available: {available})"
            )
        return route


class Admission:
    """The cap on concurrent requests across both fronts."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.inflight = 0
        self._metrics = metrics

    def acquire(self, front: str) -> None:
        """Count a request in, or refuse it; every successful call is paired with :meth:`release`."""
        if self.inflight >= self.limit:
            self._metrics.child(self._metrics.rejected, front, "concurrency").inc()
            raise GatewayError(
                Kind.RESOURCE_EXHAUSTED,
                f"the gateway is serving its limit of {self.limit} concurrent requests; retry shortly",
            )
        self.inflight += 1
        self._metrics.child(self._metrics.inflight, front).inc()

    def release(self, front: str) -> None:
        self.inflight -= 1
        self._metrics.child(self._metrics.inflight, front).dec()


class _Attempt:
    """Bookkeeping of one upstream attempt on one path: its metrics, recorded once."""

    __slots__ = ("metrics", "start", "stats")

    def __init__(self, metrics: PathMetrics) -> None:
        self.metrics = metrics
        self.stats = CallStats()
        self.start = time.perf_counter()

    def first_token(self) -> None:
        self.metrics.ttft.observe(time.perf_counter() - self.start)

    def done(self, code: str, usage: pb.Usage | None = None) -> None:
        m = self.metrics
        m.outcome(code).inc()
        m.duration.observe(time.perf_counter() - self.start)
        m.sent.inc(self.stats.sent)
        m.received.inc(self.stats.received)
        if usage is not None and code == "200":
            m.input_tokens.observe(usage.prompt_tokens)
            m.output_tokens.observe(usage.completion_tokens)


class _Step(NamedTuple):
    """One path of a request's plan: where to send it and how many attempts it gets there."""

    route: Route
    path: str
    provider: str
    client: ProviderClient
    allowed: int
    retries: Retries
    fallback: str | None  # the next path, if any
    metrics: PathMetrics


class Gateway:
    def __init__(
        self, config: ProxyConfig, metrics: Metrics | None = None, *, seed: int | None = None
    ) -> None:
        self.metrics = metrics or Metrics()
        self.admission = Admission(config.limits.max_concurrent_requests, self.metrics)
        add_secrets([*config.provider_keys.values(), *config.client_keys])  # hidden from messages and logs
        self.runtime = Runtime(
            config,
            {
                n: connect(p, config.provider_keys.get(n), config.limits, self._limit_hit)
                for n, p in config.providers.items()
            },
        )
        self._rng = random.Random(seed)
        # (provider, field) pairs already logged as dropped (vendorExtras: drop), at most 1024
        self._dropped_logged: set[tuple[str, str]] = set()
        self._uses: collections.Counter[int] = collections.Counter()
        self._retired: dict[int, ProviderClient] = {}
        self._publish(config)

    # -- configuration -------------------------------------------------------------------------------

    def apply(self, config: ProxyConfig) -> None:
        """Make ``config`` the one in effect; requests already running finish on the old one."""
        old = self.runtime
        add_secrets([*config.provider_keys.values(), *config.client_keys])
        clients: dict[str, ProviderClient] = {}
        for name, provider in config.providers.items():
            previous = old.clients.get(name)
            same_key = old.config.provider_keys.get(name) == config.provider_keys.get(name)
            same_limits = (old.config.limits.rest_client, old.config.limits.grpc_client) == (
                config.limits.rest_client,
                config.limits.grpc_client,
            )
            if previous is not None and previous.provider == provider and same_key and same_limits:
                clients[name] = previous
            else:
                clients[name] = connect(
                    provider, config.provider_keys.get(name), config.limits, self._limit_hit
                )
        kept = {id(b) for b in clients.values()}
        for client in old.clients.values():
            if id(client) not in kept:
                self._retire(client)
        self.runtime = Runtime(config, clients)
        self.admission.limit = config.limits.max_concurrent_requests
        self._publish(config)

    def _limit_hit(self, limit: str) -> None:
        """A provider ran into one of the limits of ``limits.restClient`` / ``limits.grpcClient``."""
        self.metrics.child(self.metrics.limit_hits, limit).inc()

    def _publish(self, config: ProxyConfig) -> None:
        self.metrics.grpc_weight.clear()
        for route in config.routes:
            self.metrics.grpc_weight.labels(route.model).set(route.grpc_weight)
            for path, provider in (("rest", route.rest), ("grpc", route.grpc)):
                if provider is not None:
                    path_metrics = self.metrics.path(route.model, path, provider)
                    for code in PRECREATED_CODES:
                        path_metrics.outcome(code)
        self.metrics.generation.set(config.generation)

    def _retire(self, client: ProviderClient) -> None:
        if self._uses[id(client)]:
            self._retired[id(client)] = client
        else:
            asyncio.get_running_loop().create_task(client.close())

    def _lease(self, client: ProviderClient) -> None:
        """Count a call on ``client``, so that a retired client is closed only after its last call."""
        self._uses[id(client)] += 1

    def _unlease(self, client: ProviderClient) -> None:
        self._uses[id(client)] -= 1
        if not self._uses[id(client)]:
            del self._uses[id(client)]
            retired = self._retired.pop(id(client), None)
            if retired is not None:
                asyncio.get_running_loop().create_task(retired.close())

    async def close(self) -> None:
        for client in [*self.runtime.clients.values(), *self._retired.values()]:
            await client.close()

    # -- requests ------------------------------------------------------------------------------------

    def list_models(self) -> list[pb.Model]:
        config = self.runtime.config
        return [
            pb.Model(id=r.model, owned_by=",".join(p for p in (r.rest, r.grpc) if p), created=0)
            for r in sorted(config.routes, key=lambda r: r.model)
            if not r.model.endswith("*")
        ]

    def find_model(self, model_id: str) -> pb.Model | None:
        """The model ``model_id`` as ListModels would describe it, if a route serves it (a pattern route
        serves every name it matches), else None."""
        route = self.runtime.config.route_for(model_id)
        if route is None:
            return None
        return pb.Model(id=model_id, owned_by=",".join(p for p in (route.rest, route.grpc) if p), created=0)

    def _paths(self, route: Route) -> list[str]:
        if route.rest is None:
            return ["grpc"]
        if route.grpc is None:
            return ["rest"]
        # random() is in [0, 1): weight 0 never picks gRPC and weight 100 always does.
        if self._rng.random() * 100 < route.grpc_weight:
            return ["grpc", "rest"]
        return ["rest", "grpc"]

    def stream_write_limit(self, timeout: float | None) -> float:
        """The seconds a front may take to write a streamed answer: the request's time limit and
        WRITE_GRACE_S, so that a client reading just fast enough never to stall a write cannot hold its slot
        longer (the gateway's own deadline ends a slow provider first)."""
        return _time_limit(self.runtime, timeout) + WRITE_GRACE_S

    @staticmethod
    def _deadline(runtime: Runtime, timeout: float | None) -> float:
        return time.monotonic() + _time_limit(runtime, timeout)

    def _steps(self, runtime: Runtime, route: Route, paths: list[str]) -> Iterator[_Step]:
        """The paths of one request in order; the last one gets its provider's retry budget, the others one
        attempt each (their fallback is the better retry)."""
        for i, path in enumerate(paths):
            name = route.rest if path == "rest" else route.grpc
            assert name is not None
            retries = runtime.config.providers[name].retries
            last = i == len(paths) - 1
            yield _Step(
                route,
                path,
                name,
                runtime.clients[name],
                retries.max_attempts if last else 1,
                retries,
                paths[i + 1] if not last else None,
                self.metrics.path(route.model, path, name),
            )

    async def _recover(self, exc: GatewayError, step: _Step, attempt: int, deadline: float) -> bool:
        """After a failed attempt: wait and return True to retry on the same path, return False to fall back
        to the next path, or raise ``exc`` when neither may happen."""
        if exc.retryable and attempt < step.allowed:
            delay = backoff_delay(
                attempt,
                base=step.retries.initial_backoff_s,
                cap=step.retries.max_backoff_s,
                retry_after=exc.retry_after,
                rng=self._rng,
            )
            if time.monotonic() + delay < deadline:
                step.metrics.retry(exc.status_label).inc()
                await asyncio.sleep(delay)
                return True
        if step.fallback is not None and exc.retryable and time.monotonic() < deadline:
            self.metrics.fallbacks.labels(step.route.model, step.path, step.fallback, exc.status_label).inc()
            log.info(
                "route %s: %s path failed (%s); falling back to %s",
                step.route.model,
                step.path,
                exc.message,
                step.fallback,
            )
            return False
        raise exc

    def authenticate(self, authorization: str | None, front: str) -> None:
        """Fronts call this first, so that a client without a valid key learns nothing else."""
        try:
            self.runtime.check_api_key(authorization)
        except GatewayError:
            self.metrics.child(self.metrics.rejected, front, "unauthenticated").inc()
            raise

    def _begin(self, req: pb.ChatRequest, front: str) -> tuple[Runtime, Route]:
        runtime = self.runtime
        try:
            validate_request(req)
            return runtime, runtime.route(req.model)
        except GatewayError:
            self.metrics.child(self.metrics.rejected, front, "invalid").inc()
            raise

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise GatewayError(
                Kind.DEADLINE_EXCEEDED, "the request's deadline passed before a provider answered"
            )
        return remaining

    async def complete(
        self, req: pb.ChatRequest, *, front: str, timeout: float | None = None
    ) -> pb.ChatResponse:
        """The whole reply; the caller has authenticated the client."""
        runtime, route = self._begin(req, front)
        code = "500"
        try:
            self.admission.acquire(front)
            try:
                response = await self._complete(runtime, route, req, self._deadline(runtime, timeout))
            finally:
                self.admission.release(front)
            code = "200"
            return response
        except GatewayError as exc:
            code = exc.status_label
            raise
        except asyncio.CancelledError:
            code = "499"
            raise
        finally:
            self.metrics.child(self.metrics.requests, front, route.model, code).inc()

    async def _complete(
        self, runtime: Runtime, route: Route, req: pb.ChatRequest, deadline: float
    ) -> pb.ChatResponse:
        cache_key = None
        if runtime.cache is not None and is_deterministic(req):
            cache_key = req.SerializeToString(deterministic=True)
            cached = runtime.cache.get(cache_key)
            self.metrics.child(self.metrics.cache, "hit" if cached is not None else "miss").inc()
            if cached is not None:
                return cached
        model = route.upstream_model or req.model
        for step in self._steps(runtime, route, self._paths(route)):
            client = step.client
            attempt = 0
            while True:
                attempt += 1
                tracker = _Attempt(step.metrics)
                self._lease(client)
                try:
                    # The provider bounds the wait for the first byte (timeoutSeconds) and the gaps within
                    # the answer (streamIdleTimeoutSeconds) itself; the request's deadline bounds the whole.
                    response = await client.complete(
                        self._vendor_extras(req, client), model, self._remaining(deadline), tracker.stats
                    )
                except GatewayError as exc:
                    tracker.done(exc.status_label)
                    if await self._recover(exc, step, attempt, deadline):
                        continue
                    break
                except asyncio.CancelledError:
                    tracker.done("499")
                    raise
                finally:
                    self._unlease(client)
                tracker.done("200", response.usage)
                if cache_key is not None and runtime.cache is not None:
                    runtime.cache.put(cache_key, response)
                return response
        raise AssertionError("unreachable: the last path either returns or raises")

    async def stream(
        self, req: pb.ChatRequest, *, front: str, timeout: float | None = None
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        """The reply's chunks; the caller has authenticated the client. Errors before the first chunk are
        raised before anything is yielded."""
        runtime, route = self._begin(req, front)

        def open_stream(client: Any, model: str, remaining: float, stats: CallStats) -> Any:
            return client.stream(self._vendor_extras(req, client), model, remaining, stats)

        deadline = self._deadline(runtime, timeout)
        calls = self._stream_call(
            runtime, route, self._paths(route), deadline, open_stream, req.model, _usage
        )
        async with contextlib.aclosing(self._counted_stream(front, route, calls)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _vendor_extras(self, req: pb.ChatRequest, client: ProviderClient) -> pb.ChatRequest:
        """``req`` as ``client``'s provider takes it under its vendorExtras policy: as it is (passThrough),
        without the fields outside the OpenAI API (drop; each field logged once), or refused (reject)."""
        provider = client.provider
        if provider.vendor_extras == "passThrough" or not req.extra_json:
            return req
        extras = openai_chat.vendor_extras(req, client.native_fields)
        if not extras:
            return req
        if provider.vendor_extras == "reject":
            raise GatewayError(
                Kind.INVALID_ARGUMENT,
                f"{clip(extras[0])}: not a field of the OpenAI chat API, and provider {provider.name!r} "
                "takes none (its vendorExtras is reject)",
            )
        self.metrics.child(self.metrics.dropped_fields, provider.name).inc(len(extras))
        for key in extras:
            if (provider.name, key) not in self._dropped_logged and len(self._dropped_logged) < 1024:
                self._dropped_logged.add((provider.name, key))
                log.warning(
                    "provider %r: dropped the request field %s (vendorExtras: drop)", provider.name, clip(key)
                )
        return openai_chat.without_fields(req, extras)

    async def _counted_stream(
        self, front: str, route: Route, items: AsyncGenerator[_T, None]
    ) -> AsyncGenerator[_T, None]:
        """``items`` under admission, counted in llmgw_requests_total by outcome."""
        code = "500"
        try:
            self.admission.acquire(front)
            try:
                async with contextlib.aclosing(items) as items:
                    async for item in items:
                        yield item
            finally:
                self.admission.release(front)
            code = "200"
        except GatewayError as exc:
            code = exc.status_label
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "499"
            raise
        finally:
            self.metrics.child(self.metrics.requests, front, route.model, code).inc()

    async def _stream_call(
        self,
        runtime: Runtime,
        route: Route,
        paths: list[str],
        deadline: float,
        open_stream: Callable[[Any, str, float, CallStats], AsyncGenerator[_T, None]],
        model: str,
        usage_of: Callable[[_T], pb.Usage | None] | None = None,
    ) -> AsyncGenerator[_T, None]:
        """One streamed request over ``paths`` with the retries and fallback of :meth:`_complete`, while
        nothing has been sent; an error after the first item ends the stream."""
        upstream_model = route.upstream_model or model
        for step in self._steps(runtime, route, paths):
            client = step.client
            attempt = 0
            while True:
                attempt += 1
                tracker = _Attempt(step.metrics)
                sent_any = False
                usage: pb.Usage | None = None
                self._lease(client)
                try:
                    items = open_stream(client, upstream_model, self._remaining(deadline), tracker.stats)
                    async with contextlib.aclosing(items) as items:
                        async for item in items:
                            if not sent_any:
                                sent_any = True
                                tracker.first_token()
                            if usage_of is not None:
                                usage = usage_of(item) or usage
                            yield item
                except GatewayError as exc:
                    tracker.done(exc.status_label)
                    if sent_any:
                        raise
                    if await self._recover(exc, step, attempt, deadline):
                        continue
                    break
                except (asyncio.CancelledError, GeneratorExit):
                    tracker.done("499")
                    raise
                finally:
                    self._unlease(client)
                tracker.done("200", usage)
                return

    # -- the other endpoints: embeddings, and OpenAI's Responses and Completions APIs relayed ------------

    def _capable_paths(self, runtime: Runtime, route: Route, capability: str, what: str) -> list[str]:
        """The request's paths whose provider client has ``capability`` (see :func:`_serves`), in the order
        the split picks; a clear 400 naming the route and its providers when none has."""
        paths = [
            p for p in self._paths(route) if _serves(runtime.clients[self._provider(route, p)], capability)
        ]
        if paths:
            return paths
        providers = [
            f"{name!r} (type {runtime.config.providers[name].type})"
            for name in (route.rest, route.grpc)
            if name
        ]
        names = ("provider " if len(providers) == 1 else "providers ") + " and ".join(providers)
        raise GatewayError(
            Kind.INVALID_ARGUMENT,
            f"route {clip(route.model)}: {what} is not served by its {names}"
            + (" (Anthropic has no embeddings API)" if capability == "embed" and "anthropic" in names else "")
            + f"; it needs an {_either([t for t, client in CLIENTS.items() if _serves(client, capability)])}"
            " provider",
        )

    @staticmethod
    def _provider(route: Route, path: str) -> str:
        name = route.rest if path == "rest" else route.grpc
        assert name is not None
        return name

    def _begin_other(
        self, model: str, front: str, capability: str, what: str
    ) -> tuple[Runtime, Route, list[str]]:
        runtime = self.runtime
        try:
            route = runtime.route(model)
            return runtime, route, self._capable_paths(runtime, route, capability, what)
        except GatewayError:
            self.metrics.child(self.metrics.rejected, front, "invalid").inc()
            raise

    async def _unary_call(
        self,
        runtime: Runtime,
        route: Route,
        paths: list[str],
        deadline: float,
        call: Callable[[ProviderClient, str, float, CallStats], Awaitable[_T]],
        model: str,
        usage_of: Callable[[_T], pb.Usage | None] | None = None,
    ) -> _T:
        """One unary request over ``paths`` with the retries and fallback of :meth:`_complete`."""
        upstream_model = route.upstream_model or model
        for step in self._steps(runtime, route, paths):
            client = step.client
            attempt = 0
            while True:
                attempt += 1
                tracker = _Attempt(step.metrics)
                self._lease(client)
                try:
                    result = await call(client, upstream_model, self._remaining(deadline), tracker.stats)
                except GatewayError as exc:
                    tracker.done(exc.status_label)
                    if await self._recover(exc, step, attempt, deadline):
                        continue
                    break
                except asyncio.CancelledError:
                    tracker.done("499")
                    raise
                finally:
                    self._unlease(client)
                tracker.done("200", None if usage_of is None else usage_of(result))
                return result
        raise AssertionError("unreachable: the last path either returns or raises")

    async def _counted(self, front: str, route: Route, work: Awaitable[_T]) -> _T:
        """``work`` under admission, counted in llmgw_requests_total by outcome."""
        code = "500"
        try:
            self.admission.acquire(front)
            try:
                result = await work
            finally:
                self.admission.release(front)
            code = "200"
            return result
        except GatewayError as exc:
            code = exc.status_label
            raise
        except asyncio.CancelledError:
            code = "499"
            raise
        finally:
            if inspect.iscoroutine(work):
                work.close()  # never started when admission refused it
            self.metrics.child(self.metrics.requests, front, route.model, code).inc()

    async def embed(
        self, req: pb.EmbeddingRequest, *, front: str, timeout: float | None = None
    ) -> pb.EmbeddingResponse:
        """Embeddings, from an openai or llmgateway provider; the caller has authenticated the client."""
        runtime, route, paths = self._begin_other(req.model, front, "embed", "POST /v1/embeddings (Embed)")

        async def call(client: Any, model: str, remaining: float, stats: CallStats) -> pb.EmbeddingResponse:
            response: pb.EmbeddingResponse = await client.embed(req, model, remaining, stats)
            return response

        deadline = self._deadline(runtime, timeout)
        return await self._counted(
            front,
            route,
            self._unary_call(runtime, route, paths, deadline, call, req.model, _embedding_usage),
        )

    async def relay(
        self, endpoint: str, body: dict[str, Any], *, front: str, timeout: float | None = None
    ) -> Any:
        """A request of another OpenAI API (``endpoint``: ``/responses``, ``/completions``) passed to a
        provider whose client serves it (an openai provider takes it as it is but for the model name); its
        JSON answer."""
        model = str(body.get("model"))
        runtime, route, paths = self._begin_other(model, front, f"relay:{endpoint}", f"POST /v1{endpoint}")

        async def call(client: Any, upstream: str, remaining: float, stats: CallStats) -> Any:
            return await client.relay(endpoint, {**body, "model": upstream}, remaining, stats)

        deadline = self._deadline(runtime, timeout)
        return await self._counted(
            front, route, self._unary_call(runtime, route, paths, deadline, call, model, _json_usage)
        )

    async def relay_stream(
        self, endpoint: str, body: dict[str, Any], *, front: str, timeout: float | None = None
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """The Server-Sent Events (name, data) of a streamed request of another OpenAI API, relayed as the
        provider sends them. Errors before the first event are raised before anything is yielded (and
        retried as a chat stream's are)."""
        model = str(body.get("model"))
        runtime, route, paths = self._begin_other(model, front, f"relay:{endpoint}", f"POST /v1{endpoint}")

        def open_stream(client: Any, upstream: str, remaining: float, stats: CallStats) -> Any:
            return client.relay_stream(endpoint, {**body, "model": upstream}, remaining, stats)

        deadline = self._deadline(runtime, timeout)
        calls = self._stream_call(runtime, route, paths, deadline, open_stream, model, _event_usage)
        async with contextlib.aclosing(self._counted_stream(front, route, calls)) as events:
            async for event in events:
                yield event


def _serves(client: Any, capability: str) -> bool:
    """Whether a provider client (or its class) has ``capability``: a method name, or ``relay:<endpoint>``
    for an endpoint among its ``relayed_endpoints`` (anthropic and llmgateway providers serve neither the
    Completions nor the Responses API)."""
    kind, _, endpoint = capability.partition(":")
    if kind == "relay":
        return endpoint in getattr(client, "relayed_endpoints", ())
    return hasattr(client, capability)


def _either(names: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _time_limit(runtime: Runtime, timeout: float | None) -> float:
    """The seconds a request may take in all: the client's deadline (``timeout``), within
    limits.requestTimeoutSeconds."""
    limit = runtime.config.limits.request_timeout_s
    return min(timeout, limit) if timeout is not None else limit


def _usage(chunk: pb.ChatChunk) -> pb.Usage | None:
    return chunk.usage if chunk.HasField("usage") else None


def _embedding_usage(response: pb.EmbeddingResponse) -> pb.Usage | None:
    if not response.HasField("usage"):
        return None
    return pb.Usage(prompt_tokens=response.usage.prompt_tokens)


def _json_usage(body: Any) -> pb.Usage | None:
    """The token counts of a relayed JSON answer: the Completions API's usage (prompt_tokens,
    completion_tokens) or the Responses API's (input_tokens, output_tokens); None without."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    counts = []
    for names in (("prompt_tokens", "input_tokens"), ("completion_tokens", "output_tokens")):
        value = next((usage[n] for n in names if isinstance(usage.get(n), int)), 0)
        counts.append(max(0, min(value, 2**31 - 1)))
    return pb.Usage(prompt_tokens=counts[0], completion_tokens=counts[1])


def _event_usage(event: tuple[str, bytes]) -> pb.Usage | None:
    """The usage of a relayed stream's event that carries one (a Completions chunk with include_usage, the
    Responses API's response.completed); only events that mention it are parsed."""
    data = event[1]
    if b'"usage"' not in data:
        return None
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if isinstance(body, dict) and isinstance(body.get("response"), dict):
        body = body["response"]
    return _json_usage(body)
