"""The provider clients, one module per provider type, found through :data:`CLIENTS`.

Each type's settings and the parser of its configuration member live in :mod:`llmgw_common.providers`
(the operator checks configurations with them, without the proxy); its client lives here, under the same
name. Adding a provider type is its settings module there, its client module here, its CRD block, and
their tests.
"""

from __future__ import annotations

from collections.abc import Callable

from llmgw.providers.anthropic import AnthropicClient
from llmgw.providers.base import CallStats, OnLimit, ProviderClient
from llmgw.providers.engine import EngineClient
from llmgw.providers.llmgateway import LLMGatewayClient
from llmgw.providers.openai import OpenAIClient
from llmgw_common.config import Limits, Provider

CLIENTS: dict[str, Callable[[Provider, str | None, Limits, OnLimit | None], ProviderClient]] = {
    "openai": OpenAIClient,
    "anthropic": AnthropicClient,
    "llmgateway": LLMGatewayClient,
    "vllm": EngineClient,
    "sglang": EngineClient,
    "trtllm": EngineClient,
}


def connect(
    provider: Provider, api_key: str | None, limits: Limits, on_limit: OnLimit | None = None
) -> ProviderClient:
    """The client of ``provider``'s type, bounded by ``limits`` (it connects lazily, on its first call);
    ``on_limit`` is told the key of each of them the provider runs into (``restClient.maxResponseHeaders``)."""
    return CLIENTS[provider.type](provider, api_key, limits, on_limit)


__all__ = ["CLIENTS", "CallStats", "OnLimit", "ProviderClient", "connect"]
