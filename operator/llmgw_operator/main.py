"""``llmgw operator``: run the operator (kopf) until SIGINT/SIGTERM.

Beside kopf's watches runs the periodic loop (:func:`~llmgw_operator.handlers.periodic_loop`); a
:class:`~llmgw_operator.handlers.Watchdog` follows its progress, and kopf's liveness endpoint
(``LLMGW_HEALTH_LISTEN``) answers 500 when it has ended or stalled, so that the kubelet restarts a stuck
operator. The endpoint also stops answering when the event loop is blocked, or kopf's own tasks ended.
"""

from __future__ import annotations

import asyncio
import logging

import kopf

from .handlers import Passes, Watchdog, build_registry, periodic_loop
from .kube import Kube
from .reconcile import Reconciler
from .settings import Settings

log = logging.getLogger(__name__)


async def serve(settings: Settings) -> None:
    # Request-level HTTP logs say nothing a user needs, even at debug.
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kube = Kube()
    reconciler = Reconciler(kube, settings)
    watchdog = Watchdog(settings.watchdog_seconds)
    passes = Passes(reconciler, progress=watchdog.beat)
    registry = build_registry(settings, reconciler, passes, watchdog)
    scope = "all namespaces" if settings.clusterwide else f"namespaces {', '.join(settings.namespaces)}"
    log.info("llm-gateway operator watching %s (proxy image %s)", scope, settings.proxy_image)
    periodic = asyncio.create_task(periodic_loop(settings, reconciler, passes, watchdog))
    watchdog.task = periodic
    try:
        await kopf.operator(
            registry=registry,
            clusterwide=settings.clusterwide,
            namespaces=settings.namespaces,
            standalone=True,  # one replica (Recreate), no peering objects needed
            liveness_endpoint=f"http://{settings.health_listen}/healthz" if settings.health_listen else None,
        )
    finally:
        periodic.cancel()
        await reconciler.close()
        await kube.close()


def run(settings: Settings) -> int:
    # kopf installs its own SIGINT/SIGTERM handling and returns when asked to stop.
    asyncio.run(serve(settings))
    return 0
