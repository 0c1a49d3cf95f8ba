"""The kinds of fake provider, by name: where the class that speaks each API lives.

A fake for a new API is one new module, whose class derives from :class:`llmgw_dev.fakes.server.Api`
(``HttpApi`` for an HTTP API), and one line here. :class:`~llmgw_dev.fakes.server.FakeProvider` imports a
kind's module only when a provider of that kind is made, so naming the kinds (``llmgw fake-provider --help``)
imports neither grpc nor aiohttp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

APIS: Final[Mapping[str, str]] = {
    "openai": "llmgw_dev.fakes.openai:OpenAI",
    "anthropic": "llmgw_dev.fakes.anthropic:Anthropic",
    "grpc": "llmgw_dev.fakes.llmservice:LLMService",
    "vllm": "llmgw_dev.fakes.engine:Vllm",
    "sglang": "llmgw_dev.fakes.engine:Sglang",
    "trtllm": "llmgw_dev.fakes.engine:Trtllm",
    "vllm-http": "llmgw_dev.fakes.vllm_http:VllmHttp",
}
KINDS: Final = tuple(APIS)
