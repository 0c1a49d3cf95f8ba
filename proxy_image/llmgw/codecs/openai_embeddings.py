"""OpenAI's Embeddings API (``POST /v1/embeddings``) to and from ``llmgateway.v1`` messages, losslessly.

The input keeps its JSON shape (one string, a list of strings, one token array, a list of token arrays:
``EmbeddingInputShape``); a vector comes back as the doubles its JSON numbers are (``Embedding.values``,
written out by orjson in their shortest exact form) or, with ``encoding_format: "base64"``, as the
provider's base64 text itself. Every key without a typed field, and every key sent as null, travels in
``extra_json``, so a request and an answer cross the gateway unchanged but for the model name (and key order).
"""

from __future__ import annotations

from typing import Any

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.errors import GatewayError, Kind

_SHAPES = {
    pb.EMBEDDING_INPUT_SHAPE_UNSPECIFIED: "a string",
    pb.EMBEDDING_INPUT_SHAPE_TEXTS: "a list of strings",
    pb.EMBEDDING_INPUT_SHAPE_TOKENS: "a token array",
    pb.EMBEDDING_INPUT_SHAPE_TOKEN_ARRAYS: "a list of token arrays",
}


def _invalid(message: str) -> GatewayError:
    return GatewayError(Kind.INVALID_ARGUMENT, message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _extras(body: dict[str, Any], typed: tuple[str, ...]) -> str:
    extra = {k: v for k, v in body.items() if k not in typed or v is None}
    return orjson.dumps(extra).decode() if extra else ""


def _merge(out: dict[str, Any], extra_json: str) -> dict[str, Any]:
    if extra_json:
        out.update(orjson.loads(extra_json))
    return out


# -- requests ---------------------------------------------------------------------------------------------

_REQUEST_KEYS = ("model", "input", "encoding_format", "dimensions", "user")


def request_from_json(body: Any) -> pb.EmbeddingRequest:
    """A client's JSON request; GatewayError (400) naming the field for what OpenAI's API refuses."""
    if not isinstance(body, dict):
        raise _invalid("request body: must be a JSON object")
    req = pb.EmbeddingRequest()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model: required, a non-empty string")
    req.model = model
    value = body.get("input")
    if isinstance(value, str):
        req.texts.append(value)
    elif isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            req.input_shape = pb.EMBEDDING_INPUT_SHAPE_TEXTS
            req.texts.extend(value)
        elif all(_is_int(v) for v in value):
            req.input_shape = pb.EMBEDDING_INPUT_SHAPE_TOKENS
            req.token_arrays.add().ids.extend(value)
        elif all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
            req.input_shape = pb.EMBEDDING_INPUT_SHAPE_TOKEN_ARRAYS
            for ids in value:
                req.token_arrays.add().ids.extend(ids)
        else:
            raise _invalid(
                "input: must be a string, a list of strings, an array of token ids or a list of such arrays"
            )
    else:
        raise _invalid("input: required, a string or a non-empty list (of strings or token ids)")
    fmt = body.get("encoding_format")
    if fmt is not None:
        if not isinstance(fmt, str):
            raise _invalid("encoding_format: must be a string ('float' or 'base64')")
        req.encoding_format = fmt
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions) or not 0 < dimensions < 2**31:
            raise _invalid("dimensions: must be a positive integer")
        req.dimensions = dimensions
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _invalid("user: must be a string")
        req.user = user
    req.extra_json = _extras(body, _REQUEST_KEYS)
    return req


def request_to_json(req: pb.EmbeddingRequest, model: str | None = None) -> dict[str, Any]:
    """The JSON an OpenAI-compatible provider receives; ``model`` replaces the request's name."""
    shape = req.input_shape
    if shape == pb.EMBEDDING_INPUT_SHAPE_UNSPECIFIED:
        if len(req.texts) != 1:
            raise _invalid(
                f"texts: input_shape {_SHAPES[shape]} needs exactly one text, got {len(req.texts)}"
            )
        value: Any = req.texts[0]
    elif shape == pb.EMBEDDING_INPUT_SHAPE_TEXTS:
        value = list(req.texts)
    elif shape == pb.EMBEDDING_INPUT_SHAPE_TOKENS:
        if len(req.token_arrays) != 1:
            raise _invalid(f"token_arrays: input_shape {_SHAPES[shape]} needs exactly one array")
        value = list(req.token_arrays[0].ids)
    elif shape == pb.EMBEDDING_INPUT_SHAPE_TOKEN_ARRAYS:
        value = [list(t.ids) for t in req.token_arrays]
    else:
        raise _invalid(f"input_shape: unknown value {shape}")
    out: dict[str, Any] = {"model": model or req.model, "input": value}
    if req.HasField("encoding_format"):
        out["encoding_format"] = req.encoding_format
    if req.HasField("dimensions"):
        out["dimensions"] = req.dimensions
    if req.HasField("user"):
        out["user"] = req.user
    return _merge(out, req.extra_json)


def validate(req: pb.EmbeddingRequest) -> None:
    """What the gateway checks of a gRPC client's request (the REST front's JSON is checked as it is read)."""
    if not req.model:
        raise _invalid("model: required")
    if not req.texts and not req.token_arrays:
        raise _invalid("input: at least one text or token array is required")
    request_to_json(req)


# -- answers ----------------------------------------------------------------------------------------------


def response_from_json(body: Any) -> pb.EmbeddingResponse:
    """A provider's JSON answer; KeyError/TypeError/ValueError when it is not of the API's shape."""
    if not isinstance(body, dict):
        raise TypeError("the answer is not a JSON object")
    resp = pb.EmbeddingResponse()
    model = body.get("model")
    if isinstance(model, str):
        resp.model = model
    data = body.get("data")
    if not isinstance(data, list):
        raise TypeError("data: not a list")
    for item in data:
        if not isinstance(item, dict):
            raise TypeError("data[]: not an object")
        embedding = resp.data.add()
        index = item.get("index")
        typed = ["embedding"]
        if _is_int(index):
            embedding.index = index
            typed.append("index")
        vector = item.get("embedding")
        if isinstance(vector, str):
            embedding.base64 = vector
        elif isinstance(vector, list):
            embedding.values.extend(vector)  # TypeError for what is not a number
        else:
            raise TypeError("data[].embedding: neither a list of numbers nor a base64 string")
        embedding.extra_json = _extras(item, tuple(typed))
    typed_keys = ["data"]
    if isinstance(model, str):
        typed_keys.append("model")
    usage = body.get("usage")
    if isinstance(usage, dict) and all(_is_int(usage.get(k)) for k in ("prompt_tokens", "total_tokens")):
        resp.usage.prompt_tokens = usage["prompt_tokens"]
        resp.usage.total_tokens = usage["total_tokens"]
        resp.usage.extra_json = _extras(usage, ("prompt_tokens", "total_tokens"))
        typed_keys.append("usage")
    resp.extra_json = _extras(body, tuple(typed_keys))
    return resp


def response_to_json(resp: pb.EmbeddingResponse) -> dict[str, Any]:
    """The JSON a client receives: OpenAI's ``{"object": "list", "data": [...], "model", "usage"}``."""
    extra = orjson.loads(resp.extra_json) if resp.extra_json else {}
    out: dict[str, Any] = {}
    if "object" in extra:
        out["object"] = extra.pop("object")
    data = []
    for embedding in resp.data:
        item_extra = orjson.loads(embedding.extra_json) if embedding.extra_json else {}
        item: dict[str, Any] = {}
        if "object" in item_extra:
            item["object"] = item_extra.pop("object")
        item["index"] = embedding.index
        item["embedding"] = embedding.base64 if embedding.HasField("base64") else list(embedding.values)
        item.update(item_extra)
        data.append(item)
    out["data"] = data
    if resp.model or "model" not in extra:
        out["model"] = resp.model
    if resp.HasField("usage"):
        usage = {"prompt_tokens": resp.usage.prompt_tokens, "total_tokens": resp.usage.total_tokens}
        out["usage"] = _merge(usage, resp.usage.extra_json)
    out.update(extra)
    return out
