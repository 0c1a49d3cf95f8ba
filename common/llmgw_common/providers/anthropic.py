"""``anthropic``: Anthropic's Messages REST API."""

from __future__ import annotations

import dataclasses

from llmgw_common.providers.base import ProviderType, base_url, max_connections
from llmgw_common.reader import Reader


@dataclasses.dataclass(frozen=True)
class AnthropicSettings:
    base_url: str  # e.g. https://api.anthropic.com; requests go to BASE/v1/messages
    version: str = "2023-06-01"  # the anthropic-version header
    default_max_tokens: int = 4096  # the Messages API requires max_tokens; sent when the client gives none
    max_connections: int = 256


def parse(r: Reader) -> AnthropicSettings:
    return AnthropicSettings(
        base_url=base_url(r),
        version=r.get("version", str, AnthropicSettings.version),
        default_max_tokens=r.integer("defaultMaxTokens", AnthropicSettings.default_max_tokens),
        max_connections=max_connections(r),
    )


TYPE = ProviderType("anthropic", "rest", parse, "Anthropic's Messages API")
