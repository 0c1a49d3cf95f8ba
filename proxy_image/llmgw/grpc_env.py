"""gRPC core settings that llmgw applies to its own processes, before grpc is imported.

grpcio reads ``GRPC_EXPERIMENTS`` once, when it is first imported. grpcio 1.8x runs its TCP client and
listener on the new EventEngine by default; on this project's benchmark (``bench/proxy_latency.py``, library
table) a grpc.aio client without it needs less CPU per call, so ``llmgw`` turns the client off, and the
listener with it, in the processes that use grpcio (the fake gRPC provider, the client library's users). The
proxy itself runs on llmgw's own gRPC stack. A ``GRPC_EXPERIMENTS`` set in the environment wins.
"""

from __future__ import annotations

import os

EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def apply() -> None:
    """Set the default; call before the first ``import grpc`` of the process (later it has no effect)."""
    os.environ.setdefault("GRPC_EXPERIMENTS", EXPERIMENTS)
