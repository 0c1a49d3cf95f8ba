"""gRPC core settings that llmgw applies to its own processes, before grpc is imported.

grpcio reads ``GRPC_EXPERIMENTS`` once, when it is first imported. grpcio 1.8x runs its TCP client and
listener on the new EventEngine by default; on this project's benchmark (``bench/proxy_latency.py``, library
table) a grpc.aio client without it needs less latency and CPU per call, so ``llmgw`` turns the client off,
and the listener with it, so that both ends of the proxy run on the long-standing iomgr path. A
``GRPC_EXPERIMENTS`` set in the environment wins.
"""

from __future__ import annotations

import os

EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def apply() -> None:
    """Set the default; call before the first ``import grpc`` of the process (later it has no effect)."""
    os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
