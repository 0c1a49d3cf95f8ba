"""llm-gateway: a gRPC+Protobuf proxy in front of LLM providers, and the operator that runs it."""

__version__ = "0.1.0"
