"""``llmgateway``: an upstream ``llmgateway.v1.LLMService`` over gRPC (another gateway, an in-house service)."""

from __future__ import annotations

import dataclasses

from llmgw_common.providers.base import ProviderType, target
from llmgw_common.reader import Reader


@dataclasses.dataclass(frozen=True)
class LLMGatewaySettings:
    target: str  # HOST:PORT
    tls: bool = False  # TLS with the system's roots


def parse(r: Reader) -> LLMGatewaySettings:
    return LLMGatewaySettings(target=target(r), tls=r.get("tls", bool, False))


TYPE = ProviderType("llmgateway", "grpc", parse, "an upstream llmgateway.v1.LLMService over gRPC")
