"""``openai``: any OpenAI-compatible Chat Completions REST API (OpenAI, vLLM's or SGLang's HTTP server, ...)."""

from __future__ import annotations

import dataclasses

from llmgw_common.providers.base import ProviderType, base_url, max_connections
from llmgw_common.reader import Reader


@dataclasses.dataclass(frozen=True)
class OpenAISettings:
    base_url: str  # e.g. https://api.openai.com/v1; requests go to BASE/chat/completions
    max_connections: int = 256  # the keep-alive pool's size


def parse(r: Reader) -> OpenAISettings:
    return OpenAISettings(base_url=base_url(r), max_connections=max_connections(r))


TYPE = ProviderType("openai", "rest", parse, "an OpenAI-compatible REST API")
