"""A chat request as an engine takes it: the prompt's token ids and the sampling parameters, decided as vLLM's
OpenAI server decides them, and what the answer's choices need (stops, parsers, forced tool calls).

Every field is either carried (into the prompt through the chat template, into the sampling parameters, or
into the gateway's own handling of the answer) or refused with a 400 naming it: a field an engine cannot
carry (audio, a file, a predicted output, an image for an engine that takes none) is never dropped silently.
Images go as :mod:`llmgw.engine.media` describes: the template writes one placeholder per image, counted
before the request leaves, and the images travel as the engine's :class:`MediaSupport` says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.codecs import openai_chat
from llmgw.engine import (
    ChatTemplateError,
    EngineTokenizer,
    TokenizerError,
    render_chat_template,
)
from llmgw.engine.media import (
    MediaError,
    MediaSupport,
    anchor_of,
    check_anchors,
    data_url_bytes,
    image_urls,
    scheme_of,
)
from llmgw.engine.tool_parsers import TOOL_PARSERS
from llmgw.errors import GatewayError, Kind
from llmgw.providers._engine_protocol import ModelInfo, Sampling

# Request fields beyond OpenAI's that vLLM's OpenAI server reads, and the engine providers too.
NATIVE_FIELDS = frozenset(
    {
        "top_k", "min_p", "repetition_penalty", "chat_template_kwargs", "skip_special_tokens",
        "spaces_between_special_tokens", "ignore_eos", "min_tokens", "stop_token_ids",
        "include_stop_str_in_output", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar", "documents", "add_generation_prompt", "continue_final_message",
    }
)  # fmt: skip
# OpenAI fields that change nothing an engine does (vLLM reads them and lets them be).
_IGNORED = frozenset(
    {
        "model", "messages", "stream", "stream_options", "store", "metadata", "user", "service_tier",
        "parallel_tool_calls", "reasoning_effort", "safety_identifier", "prompt_cache_key",
        "prompt_cache_retention", "prompt_cache_options", "verbosity",
    }
)  # fmt: skip
_CARRIED = frozenset(
    {
        "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "n", "seed", "logprobs",
        "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice",
        "response_format",
    }
)  # fmt: skip
_CARRIED_PARTS = frozenset({"text", "input_text", "refusal", "image_url"})
_INT32 = 2**31
_T = TypeVar("_T")
# A request larger than this (bytes, or a prompt's characters) is prepared (template, tokens) in a thread: a long
# conversation takes milliseconds to render and tokenize, which the event loop's other streams must not wait.
_INLINE_SIZE = 32 * 1024


async def prepared(prepare: Callable[[], _T], size: int) -> _T:
    """``prepare()``'s result, computed in a thread when ``size`` says the request is large."""
    return await asyncio.to_thread(prepare) if size > _INLINE_SIZE else prepare()


def invalid(message: str) -> GatewayError:
    return GatewayError(Kind.INVALID_ARGUMENT, message)


@dataclasses.dataclass
class Plan:
    """One request, ready for the engine and for reading its answer."""

    ids: list[int]
    prompt: str
    sampling: Sampling
    decoder_stop_ids: list[int]  # the request's stop ids and the model's EOS ids (unless ignore_eos)
    tool_parser: str | None  # the format the answer's tool calls are read in (tool_choice auto)
    reasoning_parser: str | None
    forced: str | None  # tool_choice required: "" (a JSON array of calls); a named function: its name
    tool_choice_auto: bool  # calls found in the text make the finish reason "tool_calls"
    logprobs: bool
    top_logprobs: int
    images: list[str | bytes] = dataclasses.field(default_factory=list)  # one per anchor in ids, in order


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise invalid(f"{key}: must be a number, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(f"{key}: {value} is out of range [{low:g}, {high:g}]")
    return float(value)


def read_integer(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{key}: must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise invalid(f"{key}: {value} must be between {low} and {high}")
    return value


def read_flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{key}: must be true or false")
    return value


def _int_list(body: Mapping[str, Any], key: str) -> list[int]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(type(v) is int and 0 <= v < _INT32 for v in value):
        raise invalid(f"{key}: must be a list of token ids")
    return list(value)


def _schema_text(value: Any, key: str) -> str:
    if isinstance(value, str):
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            raise invalid(f"{key}: not valid JSON ({exc})") from None
        return value
    if isinstance(value, dict | bool):
        return orjson.dumps(value).decode()
    raise invalid(f"{key}: must be a JSON schema")


def check_fields(body: Mapping[str, Any], provider: str) -> None:
    """Refuse each field the engine cannot carry, naming it."""
    for key, value in body.items():
        if key in _IGNORED or key in _CARRIED or key in NATIVE_FIELDS:
            continue
        if key == "modalities" and (value is None or value == ["text"]):
            continue
        if value is None:
            continue
        raise invalid(
            f"{openai_chat.clip(key)}: provider {provider!r} cannot carry this field to its inference "
            "engine (the engine takes the model's prompt and sampling parameters only)"
        )
    for i, message in enumerate(body.get("messages") or ()):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in _CARRIED_PARTS:
                    raise invalid(
                        f"messages[{i}].content[{j}]: a part of type {openai_chat.clip(kind)} cannot be "
                        f"carried by provider {provider!r}: it renders text and images through the "
                        "model's chat template (audio and files are not supported)"
                    )
        if isinstance(message, dict) and message.get("audio") is not None:
            raise invalid(f"messages[{i}].audio: provider {provider!r} cannot carry audio")


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools") or []
    for i, tool in enumerate(tools):
        if (
            not isinstance(tool, dict)
            or tool.get("type") != "function"
            or not isinstance(tool.get("function"), dict)
        ):
            raise invalid(f"tools[{i}]: only function tools can be carried to an inference engine")
    return list(tools)


def _forced_schema(tools: list[dict[str, Any]], choice: Any) -> tuple[str, str] | None:
    """(the JSON schema the answer must follow, the forced tool: "" for required) as vLLM builds them."""
    functions = [t["function"] for t in tools]
    if choice == "required":
        items = [
            {
                "properties": {
                    "name": {"type": "string", "enum": [f.get("name")]},
                    "parameters": f.get("parameters") or {"type": "object", "properties": {}},
                },
                "required": ["name", "parameters"],
            }
            for f in functions
        ]
        schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
        return orjson.dumps(schema).decode(), ""
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        function = next((f for f in functions if f.get("name") == name), None)
        if function is None:
            raise invalid(f"tool_choice: no tool named {openai_chat.clip(name)} among the request's tools")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return orjson.dumps(parameters).decode(), str(name)
    return None


def read_constraint(body: Mapping[str, Any]) -> tuple[str, Any] | None:
    """The structured-output constraint of response_format or of vLLM's own fields."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict):
        kind = fmt.get("type")
        if kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            return ("json_schema", _schema_text(schema if schema is not None else {}, "response_format"))
        if kind == "json_object":
            return ("json_object", True)
        if kind not in ("text", None):
            raise invalid(f"response_format.type: {openai_chat.clip(kind)} is not supported by an engine")
    found: list[tuple[str, Any]] = []
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise invalid("structured_outputs: must be an object")
        for key, value in structured.items():
            if value is None or value is False:
                continue
            if key == "json":
                found.append(("json_schema", _schema_text(value, "structured_outputs.json")))
            elif key in ("regex", "grammar", "structural_tag") and isinstance(value, str):
                found.append((key, value))
            elif key == "choice" and isinstance(value, list) and all(isinstance(c, str) for c in value):
                found.append(("choice", list(value)))
            elif key == "json_object" and value is True:
                found.append(("json_object", True))
            else:
                raise invalid(f"structured_outputs.{openai_chat.clip(key)}: not supported by an engine")
    for key, kind in (
        ("guided_json", "json_schema"),
        ("guided_regex", "regex"),
        ("guided_grammar", "grammar"),
        ("guided_choice", "choice"),
    ):
        value = body.get(key)
        if value is None:
            continue
        if kind == "json_schema":
            found.append((kind, _schema_text(value, key)))
        elif kind == "choice":
            if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
                raise invalid(f"{key}: must be a list of strings")
            found.append((kind, list(value)))
        elif isinstance(value, str):
            found.append((kind, value))
        else:
            raise invalid(f"{key}: must be a string")
    if len(found) > 1:
        raise invalid("only one kind of structured output (json, regex, choice, grammar) may be asked for")
    return found[0] if found else None


def plan(
    req: pb.ChatRequest,
    *,
    provider: str,
    tokenizer: EngineTokenizer,
    info: ModelInfo,
    chat_template: str | None,
    tool_call_parser: str | None,
    reasoning_parser: str | None,
    seed_bits: int,
    media: MediaSupport,
) -> Plan:
    """The request's prompt and sampling parameters; a GatewayError (400) naming what cannot be done."""
    body = openai_chat.request_to_json(req)
    check_fields(body, provider)
    try:
        urls = image_urls(body["messages"])
        images = _images(urls, media, provider)
    except MediaError as exc:
        raise invalid(str(exc)) from None
    anchor = anchor_of(tokenizer.token_id) if urls else None
    if urls and anchor is None:
        raise invalid(
            f"messages: {len(urls)} image(s), but the model of provider {provider!r} has no image placeholder "
            "token in its tokenizer: it is not a vision model"
        )
    tools = _tools(body)
    choice = body.get("tool_choice")
    if choice is not None and not (choice in ("none", "auto", "required") or isinstance(choice, dict)):
        raise invalid(f"tool_choice: {openai_chat.clip(choice)} is not supported")
    if isinstance(choice, dict) and choice.get("type") != "function":
        raise invalid("tool_choice: only a function (or none, auto, required) can be forced on an engine")
    if choice is not None and choice != "none" and not tools:
        raise invalid("tool_choice: set, but the request has no tools")
    use_tools = bool(tools) and choice != "none"
    forced = _forced_schema(tools, choice) if use_tools else None
    auto = use_tools and forced is None
    if auto and tool_call_parser is None:
        raise invalid(
            f'tools with tool_choice "auto": provider {provider!r} has no toolCallParser, so the model\'s '
            'tool calls cannot be read (set one, or send tool_choice "none", "required" or a function)'
        )
    parser_class = TOOL_PARSERS.get(tool_call_parser or "") if auto else None

    # The prompt, through the chat template.
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise invalid("chat_template_kwargs: must be an object")
    documents = body.get("documents")
    if documents is not None and (
        not isinstance(documents, list) or not all(isinstance(d, dict) for d in documents)
    ):
        raise invalid("documents: must be a list of objects")
    add_generation_prompt = read_flag(body, "add_generation_prompt", True)
    continue_final = read_flag(body, "continue_final_message", False)
    if continue_final:
        add_generation_prompt = read_flag(body, "add_generation_prompt", False)
    template_kwargs = {**tokenizer.special_tokens_map, **kwargs}
    for reserved in ("messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token"):
        template_kwargs.pop(reserved, None)
    try:
        template = chat_template or tokenizer.chat_template(with_tools=use_tools)
        prompt = render_chat_template(
            template,
            body["messages"],
            tools=tools if use_tools else None,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final,
            bos_token=tokenizer.bos_token,
            eos_token=tokenizer.eos_token,
            template_kwargs=template_kwargs,
            keep_parts=bool(urls),
        )
    except (ChatTemplateError, TokenizerError) as exc:
        raise invalid(f"messages: {exc}") from None
    ids = tokenizer.encode(prompt)
    if anchor is not None:
        try:
            check_anchors(ids, anchor, len(urls))
        except MediaError as exc:
            raise invalid(f"messages: {exc}") from None
    check_prompt(ids, info, "messages")
    max_tokens = read_integer(body, "max_completion_tokens", 1, _INT32 - 1)
    if max_tokens is None:
        max_tokens = read_integer(body, "max_tokens", 1, _INT32 - 1)
    logprobs = read_flag(body, "logprobs", False)
    top_logprobs = read_integer(body, "top_logprobs", 0, 20) or 0
    if top_logprobs and not logprobs:
        raise invalid("top_logprobs: needs logprobs: true")
    sampling = sampling_of(
        body,
        tokenizer=tokenizer,
        info=info,
        prompt_tokens=len(ids),
        max_tokens=max_tokens,
        logprobs=top_logprobs if logprobs else None,
        seed_bits=seed_bits,
        constraint=("json_schema", forced[0]) if forced is not None else read_constraint(body),
    )
    if parser_class is not None and parser_class.needs_special_tokens:
        # The format's markers are special tokens (vLLM's parsers adjust it so too).
        sampling.skip_special_tokens = False
    return Plan(
        ids=ids,
        prompt=prompt,
        sampling=sampling,
        decoder_stop_ids=decoder_stop_ids(sampling, info),
        tool_parser=tool_call_parser if auto else None,
        reasoning_parser=reasoning_parser,
        forced=None if forced is None else forced[1],
        tool_choice_auto=auto,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        images=images,
    )


def _images(urls: list[str], media: MediaSupport, provider: str) -> list[str | bytes]:
    """The images as the engine takes them: the URLs it fetches itself, or the bytes of data: URLs."""
    if not urls:
        return []
    if media.transport is None:
        raise MediaError(f"messages: an image cannot go to provider {provider!r}: {media.refusal}")
    if media.max_images is not None and len(urls) > media.max_images:
        raise MediaError(
            f"messages: {len(urls)} images; the engine of provider {provider!r} takes at most "
            f"{media.max_images} in one prompt"
        )
    if media.transport == "bytes":
        return [data_url_bytes(url, f"messages: image {n + 1}") for n, url in enumerate(urls)]
    for n, url in enumerate(urls):
        if scheme_of(url) not in media.schemes:
            raise MediaError(
                f"messages: image {n + 1}: the engine of provider {provider!r} fetches images from "
                f"{', '.join(sorted(media.schemes)) or 'no'} URLs only, not {scheme_of(url) or 'this'} ones"
            )
    return list(urls)


def check_prompt(ids: list[int], info: ModelInfo, field: str) -> None:
    """Refuse an empty prompt, and one the model's context cannot take with one token more."""
    context = info.max_context_length or 2**31 - 1  # (0: the engine does not say; it judges itself)
    if not ids:
        raise invalid(f"{field}: the prompt is empty")
    if len(ids) > info.max_input_length or len(ids) >= context:
        raise invalid(
            f"This model's maximum context length is {context} tokens. However, your request has "
            f"{len(ids)} input tokens. Please reduce the length of the input {field}."
        )


def sampling_of(
    body: Mapping[str, Any],
    *,
    tokenizer: EngineTokenizer,
    info: ModelInfo,
    prompt_tokens: int,
    max_tokens: int | None,
    logprobs: int | None,
    seed_bits: int,
    constraint: tuple[str, Any] | None,
) -> Sampling:
    """The sampling parameters of ``body`` for a prompt of ``prompt_tokens``, the model's defaults for what it
    leaves unset; ``max_tokens`` (None: all the context left) within the context left."""
    defaults = info.default_sampling
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is None and isinstance(defaults.get("temperature"), int | float):
        temperature = float(defaults["temperature"])
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is None:
        top_p = float(defaults["top_p"]) if isinstance(defaults.get("top_p"), int | float) else 1.0
    top_k = read_integer(body, "top_k", -1, _INT32 - 1)
    if top_k is None and type(defaults.get("top_k")) is int:
        top_k = defaults["top_k"]
    min_p = _number(body, "min_p", 0.0, 1.0)
    if min_p is None:
        min_p = float(defaults["min_p"]) if isinstance(defaults.get("min_p"), int | float) else 0.0
    repetition = _number(body, "repetition_penalty", 1e-6, 1e6)
    if repetition is None:
        value = defaults.get("repetition_penalty")
        repetition = float(value) if isinstance(value, int | float) and value > 0 else 1.0
    if info.max_context_length > 0:
        room = info.max_context_length - prompt_tokens
        max_tokens = room if max_tokens is None else min(max_tokens, room)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(isinstance(s, str) for s in stops):
        raise invalid("stop: must be a string or a list of strings")
    seed = read_integer(body, "seed", -(2**63), 2**63 - 1)
    if seed is not None and seed_bits == 32 and not -_INT32 <= seed < _INT32:
        raise invalid(f"seed: {seed} does not fit the engine's 32-bit seed")
    bias: dict[int, float] = {}
    for token, value in (body.get("logit_bias") or {}).items():
        try:
            token_id = int(token)
        except ValueError:
            raise invalid(f"logit_bias: {openai_chat.clip(token)} is not a token id") from None
        if not 0 <= token_id < tokenizer.vocab_size:
            raise invalid(f"logit_bias: token id {token_id} is out of the vocabulary")
        if not isinstance(value, int | float) or isinstance(value, bool) or not -100 <= value <= 100:
            raise invalid(f"logit_bias[{token_id}]: must be a number between -100 and 100")
        bias[token_id] = float(value)
    return Sampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repetition_penalty=repetition,
        max_tokens=max_tokens,
        min_tokens=read_integer(body, "min_tokens", 0, max_tokens or _INT32 - 1) or 0,
        stop=stops,
        stop_token_ids=_int_list(body, "stop_token_ids"),
        skip_special_tokens=read_flag(body, "skip_special_tokens", True),
        spaces_between_special_tokens=read_flag(body, "spaces_between_special_tokens", True),
        ignore_eos=read_flag(body, "ignore_eos", False),
        include_stop_str_in_output=read_flag(body, "include_stop_str_in_output", False),
        n=read_integer(body, "n", 1, 128) or 1,
        seed=seed,
        logprobs=logprobs,
        logit_bias=bias,
        constraint=constraint,
    )


def decoder_stop_ids(sampling: Sampling, info: ModelInfo) -> list[int]:
    """The ids that end a choice as the gateway reads it: the request's stop ids, and the model's EOS ids
    unless ignore_eos."""
    ids = list(sampling.stop_token_ids)
    if not sampling.ignore_eos:
        ids += [i for i in info.eos_token_ids if i not in ids]
    return ids
