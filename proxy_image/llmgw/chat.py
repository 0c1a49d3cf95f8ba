"""The protobuf chat messages as the proxy's one internal currency, and the checks every request passes.

Both fronts turn what they receive into a ``ChatRequest`` and every provider client answers with ``ChatResponse``
or ``ChatChunk``; conversions to provider JSON are hand-written next to each provider (no ``json_format``
on the hot path). :func:`validate_request` is the single place where a request's fields are checked, so
the gRPC and REST fronts reject the same things with the same message.
"""

from __future__ import annotations

import math

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.errors import GatewayError, Kind

ROLE_BY_NAME: dict[str, pb.Role] = {
    "system": pb.ROLE_SYSTEM,
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
    "developer": pb.ROLE_DEVELOPER,
}
ROLE_NAME: dict[pb.Role, str] = {v: k for k, v in ROLE_BY_NAME.items()}

FINISH_BY_NAME: dict[str, pb.FinishReason] = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "content_filter": pb.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
    "function_call": pb.FINISH_REASON_TOOL_CALLS,
}
FINISH_NAME: dict[pb.FinishReason, str] = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_CONTENT_FILTER: "content_filter",
    pb.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

MAX_STOP_SEQUENCES = 4


def invalid(message: str) -> GatewayError:
    return GatewayError(Kind.INVALID_ARGUMENT, message)


def validate_request(req: pb.ChatRequest) -> None:
    """Reject a request that no provider could answer, naming the offending field."""
    if not req.model:
        raise invalid("model: required (the model name to route to)")
    if not req.messages:
        raise invalid("messages: must contain at least one message")
    for i, message in enumerate(req.messages):
        if message.role not in ROLE_NAME:
            raise invalid(
                f"messages[{i}].role: unknown role {message.role} (expected one of {', '.join(ROLE_BY_NAME)})"
            )
    if req.HasField("temperature") and not (0.0 <= req.temperature <= 2.0 and math.isfinite(req.temperature)):
        raise invalid(f"temperature: {req.temperature:g} is out of range [0, 2]")
    if req.HasField("top_p") and not (0.0 <= req.top_p <= 1.0 and math.isfinite(req.top_p)):
        raise invalid(f"top_p: {req.top_p:g} is out of range [0, 1]")
    if req.HasField("max_tokens") and req.max_tokens < 1:
        raise invalid(f"max_tokens: {req.max_tokens} must be at least 1")
    if len(req.stop) > MAX_STOP_SEQUENCES:
        raise invalid(f"stop: at most {MAX_STOP_SEQUENCES} sequences, got {len(req.stop)}")


def is_deterministic(req: pb.ChatRequest) -> bool:
    """Temperature explicitly 0: the same request may be answered from the cache."""
    return req.HasField("temperature") and req.temperature == 0.0
