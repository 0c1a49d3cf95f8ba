"""``llmgw operator``: run the operator (kopf) until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging

import kopf

from .handlers import build_registry, periodic_loop
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
    registry = build_registry(settings, reconciler)
    scope = "all namespaces" if settings.clusterwide else f"namespaces {', '.join(settings.namespaces)}"
    log.info("llm-gateway operator watching %s (proxy image %s)", scope, settings.proxy_image)
    periodic = asyncio.create_task(periodic_loop(settings, reconciler))
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
