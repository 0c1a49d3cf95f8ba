"""The provider types a configuration may name, one module each, found through :data:`TYPES`.

A provider entry sets exactly one member named after its type, as Kubernetes union types do
(``VolumeSource``): ``{name: gpt, openai: {baseURL: ...}, timeoutSeconds: 30}``. The fields every type
shares (API key, timeouts, retries, headers) sit beside the member. Each type's module declares its
settings dataclass, the parser of its member and ``TYPE`` (its name and the side of the REST/gRPC split it
serves). The proxy's client of each type is :mod:`llmgw.providers`' module of the same name (the engine types
share :mod:`~llmgw_common.providers.engine` and one client); the CRD has one block per type too.
"""

from __future__ import annotations

from llmgw_common.providers import anthropic, engine, llmgateway, openai
from llmgw_common.providers.base import ProviderType

TYPES: dict[str, ProviderType] = {
    t.name: t
    for t in (openai.TYPE, anthropic.TYPE, llmgateway.TYPE, engine.VLLM, engine.SGLANG, engine.TRTLLM)
}

__all__ = ["TYPES", "ProviderType"]
