"""Faithful fake LLM providers for tests, the demo and the benchmarks: OpenAI, Anthropic and gRPC.

Never shipped in an image. ``llmgw fake-provider`` runs one as a process; tests start them in-process.
"""

from llmgw_dev.fakes.provider import (
    FakeProvider,
    Faults,
    configure_parser,
    make_reply,
    provider_from_args,
    run,
)

__all__ = ["FakeProvider", "Faults", "configure_parser", "make_reply", "provider_from_args", "run"]
