"""The workers of an engine provider: every address its target resolves to, one gRPC channel each.

A target such as a headless Service's name resolves to one address per engine pod; each is a worker, with
its own channel (:class:`llmgw._net.grpc_channel.Channel`, connected to that address, the target's name
kept as its TLS server name and ``:authority``). The name is looked up again every ``resolve_interval``
seconds, lazily, by the first request after the interval: a worker whose address is gone is closed once
its calls are done, a new one is checked with the engine's ``HealthCheck`` before its first request.

Each request goes to the worker with the fewest requests (ties in turn): its own outstanding, plus, when the
engines report their load (``GetLoads``, polled every ``loads_interval`` seconds while requests flow, in the
background), the requests the engine had beyond this proxy's own at the last report: other proxies' share.
A worker whose call failed with UNAVAILABLE (it refused the connection, went away) is skipped for
:data:`COOLDOWN` seconds and checked again after; when every worker is in its cooldown, they are tried all
the same, so that an engine that came back is noticed at once.

**The model a worker serves.** The check also says which model the worker serves (:attr:`Worker.model`), and
it is made again whenever the worker's connection is new (an engine restarted at the same address may serve
another model): a request for one model goes only to workers that serve it. A worker that serves another is
set aside, and when none is left for the model asked for while others serve another, :meth:`WorkerPool.acquire`
raises :class:`ModelMoved`: the fleet moved to a new model (a rolling upgrade whose old pods are gone), and
the client loads the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc

from llmgw._net import grpc_channel
from llmgw._net.grpc_wire import RpcError
from llmgw_common.limits import GrpcChannelLimits

COOLDOWN = 5.0  # seconds a worker that failed with UNAVAILABLE is skipped
HEALTH_TIMEOUT = 5.0  # the bound of a new worker's HealthCheck


async def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates (tests replace this
    function to put several workers behind one name on loopback)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[tuple[str, int]] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = (str(sockaddr[0]), int(sockaddr[1]))
        if address not in addresses:
            addresses.append(address)
    return addresses


def _name(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


ModelKey = tuple[str, str]  # a model as its engine names it: (path, served name)


class ModelMoved(RpcError):
    """No worker serves the model a request was prepared for, and some serve another: load that one."""

    def __init__(self, asked: ModelKey, served: ModelKey) -> None:
        super().__init__(
            grpc.StatusCode.UNAVAILABLE, f"the engines now serve model {served[1]!r}, not {asked[1]!r}"
        )
        self.asked, self.served = asked, served


class Worker:
    """One engine: its channel, the requests it has outstanding, the model it serves."""

    __slots__ = (
        "address",
        "channel",
        "checked",
        "checked_connection",
        "down_until",
        "model",
        "name",
        "others",
        "outstanding",
        "retired",
    )

    def __init__(self, address: tuple[str, int], channel: grpc_channel.Channel) -> None:
        self.address = address
        self.name = _name(address)
        self.channel = channel
        self.outstanding = 0
        self.others = 0  # requests the engine had beyond ours at its last load report
        self.down_until = 0.0
        self.checked = False  # the check passed since the worker was first seen or failed
        self.checked_connection = 0  # the channel's connection the check went over
        self.model: ModelKey | None = None  # what the check found it serves (set by the pool's ``health``)
        self.retired = False  # its address is no longer the target's: closed after its last call

    def needs_check(self) -> bool:
        """Not checked yet, or the next call would go over another connection than the check did."""
        channel = self.channel
        return not (self.checked and channel.connected() and channel.connections == self.checked_connection)


class WorkerPool:
    """The workers behind one target. ``health`` checks a worker (raises RpcError when it is not ready) and
    sets the model it serves."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool,
        metadata: Sequence[tuple[str, str]],
        limits: GrpcChannelLimits,
        connect_timeout: float,
        resolve_interval: float,
        on_limit: Callable[[str], None] | None,
        health: Callable[[Worker, float], Awaitable[None]],
        load: Callable[[Worker, float], Awaitable[int]] | None = None,
        loads_interval: float = 0.0,
    ) -> None:
        host, _, port = target.rpartition(":")
        self.target = target
        self.host, self.port = host.strip("[]"), int(port)
        self._tls = tls
        self._metadata = tuple(metadata)
        self._limits = limits
        self._connect_timeout = connect_timeout
        self._resolve_interval = resolve_interval
        self._on_limit = on_limit
        self._health = health
        self._load = load if loads_interval > 0 else None
        self._loads_interval = loads_interval
        self._loads_at = float("-inf")
        self._polling: asyncio.Task[None] | None = None
        self.workers: dict[tuple[str, int], Worker] = {}
        self._resolved_at = float("-inf")
        self._resolving: asyncio.Future[None] | None = None
        self._turn = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _channel(self, address: tuple[str, int]) -> grpc_channel.Channel:
        return grpc_channel.Channel(
            self.target,
            tls=self._tls,
            metadata=self._metadata,
            limits=self._limits,
            connect_timeout=self._connect_timeout,
            on_limit=self._on_limit,
            address=address,
        )

    async def _refresh(self) -> None:
        try:
            addresses = await resolve(self.host, self.port)
        except (OSError, UnicodeError) as exc:
            if self.workers:  # the last answer stands until the resolver answers again
                self._resolved_at = time.monotonic()
                return
            reason = getattr(exc, "strerror", None) or "the name does not resolve"
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"cannot resolve {self.target}: {reason}") from None
        self._resolved_at = time.monotonic()
        if not addresses:
            if self.workers:
                return
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"{self.target} resolves to no address")
        for address in addresses:
            if address not in self.workers:
                self.workers[address] = Worker(address, self._channel(address))
        for address in [a for a in self.workers if a not in addresses]:
            worker = self.workers.pop(address)
            worker.retired = True
            if not worker.outstanding:
                self._close(worker)

    async def _addresses(self) -> None:
        """Resolve the target when its last answer is older than the interval (once for concurrent
        requests)."""
        if self.workers and time.monotonic() - self._resolved_at < self._resolve_interval:
            return
        if self._resolving is None:
            self._resolving = asyncio.ensure_future(self._refresh())

            def done(_: asyncio.Future[None]) -> None:
                self._resolving = None

            self._resolving.add_done_callback(done)
        await asyncio.shield(self._resolving)

    async def acquire(self, deadline: float, model: ModelKey | None = None) -> Worker:
        """The worker for the next request (one that serves ``model``, when given), counted as outstanding
        until :meth:`release`."""
        await self._addresses()
        self._poll_loads()
        tried: set[tuple[str, int]] = set()
        other: ModelKey | None = None  # a model some worker serves instead
        while True:
            now = time.monotonic()
            workers = [
                w
                for w in self.workers.values()
                # A worker set aside for another model is tried again once its connection is new.
                if w.address not in tried and (model is None or w.model in (None, model) or w.needs_check())
            ]
            if not workers:
                if model is not None and other is None:
                    other = next(
                        (w.model for w in self.workers.values() if w.model not in (None, model)), None
                    )
                if other is not None and model is not None:
                    raise ModelMoved(model, other)
                raise RpcError(grpc.StatusCode.UNAVAILABLE, f"no worker of {self.target} is ready")
            ready = [w for w in workers if w.down_until <= now] or workers
            fewest = min(w.outstanding + w.others for w in ready)
            tied = [w for w in ready if w.outstanding + w.others == fewest]
            worker = tied[self._turn % len(tied)]
            self._turn += 1
            worker.outstanding += 1
            if not worker.needs_check():
                return worker
            try:
                await self._health(worker, max(0.05, min(HEALTH_TIMEOUT, deadline - time.monotonic())))
            except RpcError:
                self.release(worker, failed=True)
                tried.add(worker.address)
                if len(tried) >= len(self.workers):
                    raise
                continue
            except BaseException:
                self.release(worker)
                raise
            worker.checked = True
            worker.checked_connection = worker.channel.connections
            if model is not None and worker.model != model:
                self.release(worker)
                tried.add(worker.address)
                other = other or worker.model
                continue
            return worker

    def _poll_loads(self) -> None:
        """Ask the checked workers for their load in the background, when the last answers are older than
        the interval (requests never wait for it)."""
        if self._load is None or self._polling is not None or len(self.workers) < 2:
            return  # (one worker: there is no choice to make)
        now = time.monotonic()
        if now - self._loads_at < self._loads_interval:
            return
        self._loads_at = now
        workers = [w for w in self.workers.values() if w.checked]
        if workers:
            self._polling = asyncio.get_running_loop().create_task(self._loads(workers))

    async def _loads(self, workers: list[Worker]) -> None:
        load = self._load
        assert load is not None
        timeout = min(HEALTH_TIMEOUT, self._loads_interval)

        async def one(worker: Worker) -> None:
            try:
                total = await load(worker, timeout)
            except RpcError:  # no report (an engine without GetLoads, one going away): its own count decides
                worker.others = 0
                return
            worker.others = max(0, total - worker.outstanding)

        try:
            await asyncio.gather(*(one(w) for w in workers))
        finally:
            self._polling = None

    def release(self, worker: Worker, *, failed: bool = False) -> None:
        """A request on ``worker`` ended; ``failed``: with UNAVAILABLE, so the worker sits out a while."""
        worker.outstanding -= 1
        if failed:
            worker.down_until = time.monotonic() + COOLDOWN
            worker.checked = False
        if worker.retired and not worker.outstanding:
            self._close(worker)

    def _close(self, worker: Worker) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop: nothing was ever connected
            task = asyncio.get_running_loop().create_task(worker.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        if self._polling is not None:
            self._polling.cancel()
        workers, self.workers = list(self.workers.values()), {}
        for worker in workers:
            await worker.channel.close()
