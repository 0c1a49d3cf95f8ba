"""The operator's settings, read once from ``LLMGW_*`` environment variables.

=========================  =====================================================================
``LLMGW_NAMESPACES``       Comma-separated namespaces to watch. Empty (the default): every namespace
                           (cluster-wide; needs a ClusterRole).
``LLMGW_PROXY_IMAGE``      Proxy image for gateways that set no ``spec.proxy.image``.
``LLMGW_LOG_LEVEL``        debug, info (default), warning or error.
``LLMGW_RESYNC_SECONDS``   Period of the drift check of every gateway (default 300). Changes to a
                           gateway, its Secrets or its children are acted on at once, by watches;
                           this only catches what no watch reports.
``LLMGW_MIGRATION_TICK_SECONDS``  How often a running migration is looked at (default 5): waiting for
                           proxies to report a new weight, and due checks. Checks themselves
                           come each ``spec.migration.interval``.
``LLMGW_HEALTH_LISTEN``    HOST:PORT of kopf's liveness endpoint (``/healthz``); empty: off.
``LLMGW_WATCHDOG_SECONDS`` The liveness endpoint fails (HTTP 500) when the operator has made no
                           progress (a tick of the periodic loop, or a gateway's pass ended) for this
                           long, or the periodic loop ended (default 120, or 3 ticks if longer; at
                           least 3 ticks). A pass is cut after 60 s, so a healthy operator never stalls
                           that long.
``LLMGW_PROMETHEUS_URL``   Default Prometheus API for migration analysis (see ``spec.migration``).
=========================  =====================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PROXY_IMAGE = "ghcr.io/llm-gateway/llmgw-proxy:0.1.0"


class SettingsError(ValueError):
    """An ``LLMGW_*`` variable has a value the operator cannot use; the message names it."""


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name, str(default)))
    except ValueError:
        raise SettingsError(f"{name}: must be a number of seconds, got {env[name]!r}") from None
    if value <= 0:
        raise SettingsError(f"{name}: must be positive, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    proxy_image: str = DEFAULT_PROXY_IMAGE
    log_level: str = "info"
    resync_seconds: float = 300.0
    migration_tick_seconds: float = 5.0
    health_listen: str = ""
    prometheus_url: str = ""
    watchdog_seconds: float = 120.0

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        namespaces = tuple(ns.strip() for ns in env.get("LLMGW_NAMESPACES", "").split(",") if ns.strip())
        log_level = env.get("LLMGW_LOG_LEVEL", "info").lower()
        if log_level not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"LLMGW_LOG_LEVEL: must be debug, info, warning or error, got {log_level!r}")
        resync = _positive(env, "LLMGW_RESYNC_SECONDS", 300.0)
        tick = _positive(env, "LLMGW_MIGRATION_TICK_SECONDS", 5.0)
        watchdog = _positive(env, "LLMGW_WATCHDOG_SECONDS", max(120.0, 3 * tick))
        if watchdog < 3 * tick:
            raise SettingsError(
                f"LLMGW_WATCHDOG_SECONDS: must be at least 3 migration ticks ({3 * tick:g}), got {watchdog:g}"
            )
        return cls(
            namespaces=namespaces,
            proxy_image=env.get("LLMGW_PROXY_IMAGE", DEFAULT_PROXY_IMAGE) or DEFAULT_PROXY_IMAGE,
            log_level=log_level,
            resync_seconds=resync,
            migration_tick_seconds=tick,
            health_listen=env.get("LLMGW_HEALTH_LISTEN", ""),
            prometheus_url=env.get("LLMGW_PROMETHEUS_URL", ""),
            watchdog_seconds=watchdog,
        )
