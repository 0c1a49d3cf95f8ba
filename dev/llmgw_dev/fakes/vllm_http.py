"""The fake of vLLM's OpenAI-compatible HTTP server (kind ``vllm-http``), on the model of :mod:`.model`: the same
request answers the same text here as through a router (SMG, the gateway) on the engine kinds ``vllm`` and
``sglang``, since both render the same chat template, tokenize with the same tokenizer and generate from the
same prompt ids.

As ``vllm serve`` started with ``--enable-auto-tool-choice --tool-call-parser hermes --reasoning-parser
qwen3``: ``POST /v1/chat/completions`` (the chat template rendered with jinja2 as transformers does, with the
request's ``tools`` and ``chat_template_kwargs``; tool calls parsed from ``<tool_call>`` blocks, finish
reason "tool_calls"; ``reasoning_content`` from the text before ``</think>`` when the prompt opened a
thought; unary or SSE: a role chunk, one chunk a token, the finish on the last, a usage chunk with
``stream_options.include_usage``, ``data: [DONE]``; ``tool_choice`` required or named and ``response_format``
json_schema/json_object constrain the output as vLLM's structured outputs do, the forced calls returned as
tool calls), ``POST /v1/completions`` (the raw prompt, a string or
token ids), ``GET /v1/models``, ``GET /health``. Usage counts real tokens (the EOS included, as vLLM does);
the model's defaults (temperature...) apply to what a request leaves unset. Errors use vLLM's envelope
(``{"error": {"message", "type", "param", "code"}}``); a prompt that leaves no room for one token is a 400.
Auth, faults and ``received`` work as for the other HTTP kinds (:class:`~.server.HttpApi`).

Images, as vLLM serves a vision model (the provider's ``vision`` option): when a chat request's messages hold
``image_url`` parts (a ``data:`` URL each; another scheme, bad base64 or bytes that are not an image: a 400 in
vLLM's envelope; more than 4: a 400), every message whose content is a list goes to the template as HF parts
(``{"type": "text", "text"}`` and ``{"type": "image"}``, other parts dropped), the images are read in prompt
order, the prompt is expanded (:meth:`.model.FakeModel.expand`) and the model answers from it, so the answer
names the images and ``usage.prompt_tokens`` counts the expanded prompt: what the engine kind ``vllm`` answers
to the same rendered prompt with the images as ``media_refs``. A request without images is unchanged (its text
parts joined with newlines). Without ``vision`` an ``image_url`` part is a 400 ("<model> is not a multimodal
model").
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from llmgw_dev.fakes.faults import MODEL_CREATED, Chat, Reply, new_id
from llmgw_dev.fakes.model import (
    MAX_IMAGES,
    FakeModel,
    Generation,
    ImageFacts,
    Sampling,
    fetch_media,
    image_facts,
    load,
)
from llmgw_dev.fakes.server import BadRequest, HttpApi, json_response

_DONE: Final = b"data: [DONE]\n\n"
_TOOL_CALL_RE: Final = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = {400: "BadRequestError", 401: "Unauthorized", 404: "NotFoundError", 429: "RateLimitError"}.get(
        status, "InternalServerError" if status >= 500 else "BadRequestError"
    )
    return json_response(
        {"error": {"message": message, "type": kind, "param": param, "code": status}}, status
    )


def _content_text(content: Any) -> str:
    """A message's content as the template's string (text parts joined with newlines, as vLLM does)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "\n".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    raise BadRequest("messages: content must be a string or a list of content parts", param="messages")


def _image_url(part: Any) -> str | None:
    """The URL of an ``image_url`` content part (None: not an image part)."""
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return None
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise BadRequest("image_url: must be an object with a url string", param="messages")
    return url


def _parts(content: list[Any]) -> list[dict[str, Any]]:
    """A content list as the template's HF parts: ``{"type": "text", "text"}`` and ``{"type": "image"}``."""
    parts: list[dict[str, Any]] = []
    for part in content:
        if _image_url(part) is not None:
            parts.append({"type": "image"})
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
    return parts


def _int(body: Mapping[str, Any], key: str, low: int = 0) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BadRequest(f"{key}: must be an integer >= {low}, got {value!r}", param=key)
    return value


def sampling_of(body: Mapping[str, Any], chat: bool) -> Sampling:
    """A request's sampling parameters, as vLLM's OpenAI server reads them."""
    max_tokens = _int(body, "max_completion_tokens", 1) if chat else None
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1)
    stop = body.get("stop")
    stops: tuple[str, ...]
    if stop is None:
        stops = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise BadRequest("stop: must be a string or a list of strings", param="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise BadRequest("stop_token_ids: must be a list of integers", param="stop_token_ids")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, int | float) or temperature < 0
    ):
        raise BadRequest("temperature: must be a non-negative number", param="temperature")
    logprobs: int | None
    if chat:
        logprobs = (_int(body, "top_logprobs") or 0) if body.get("logprobs") is True else None
    else:
        logprobs = _int(body, "logprobs")
    return Sampling(
        max_tokens=max_tokens,
        min_tokens=_int(body, "min_tokens") or 0,
        stop=stops,
        stop_token_ids=tuple(stop_ids),
        ignore_eos=body.get("ignore_eos") is True,
        include_stop_str_in_output=body.get("include_stop_str_in_output") is True,
        n=_int(body, "n", 1) or 1,
        temperature=None if temperature is None else float(temperature),
        seed=_int(body, "seed", -(2**63)),
        logprobs=logprobs,
    )


@dataclasses.dataclass
class _Choice:
    """One choice's parsed output: content, reasoning, tool calls, and the finish reason the API reports."""

    generation: Generation
    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]]
    finish_reason: str


def parse_output(
    text: str, thinking: bool, tools: bool
) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    """(content, reasoning, tool calls) of a choice's text, as vLLM's qwen3 reasoning parser and hermes tool
    parser read it: the reasoning is what comes before ``</think>`` when the prompt opened a thought (a
    ``<think>`` the model writes is dropped), tool calls are the JSON objects in ``<tool_call>`` blocks."""
    reasoning = None
    if thinking or "</think>" in text:
        head, sep, tail = text.partition("</think>")
        if sep:
            reasoning, text = head.removeprefix("<think>"), tail
        elif thinking:
            reasoning, text = head.removeprefix("<think>"), ""
    calls: list[dict[str, Any]] = []
    if tools and "<tool_call>" in text:
        for block in _TOOL_CALL_RE.findall(text):
            try:
                call = json.loads(block)
            except ValueError:
                continue
            if isinstance(call, dict) and isinstance(call.get("name"), str):
                calls.append(
                    {
                        "id": "chatcmpl-tool-" + new_id("")[:32],
                        "type": "function",
                        "function": {
                            "name": call["name"],
                            "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False),
                        },
                    }
                )
        if calls:
            text = text[: text.index("<tool_call>")]
    content = text if text or not (reasoning or calls) else None
    return content, reasoning, calls


def constraint_of(body: Mapping[str, Any], use_tools: bool) -> tuple[str | None, str | None]:
    """(the JSON schema the output must follow, the forced tool) of a chat request, as vLLM builds them:
    ``tool_choice: required`` is an array of calls of any tool (forced tool ""), a named function is its
    parameters (forced tool: its name), ``response_format`` json_schema/json_object its schema (None)."""
    tools = (
        [t.get("function", {}) for t in body.get("tools") or () if isinstance(t, dict)] if use_tools else []
    )
    choice = body.get("tool_choice")
    if tools and choice == "required":
        items = [
            {
                "properties": {
                    "name": {"type": "string", "enum": [t.get("name")]},
                    "parameters": t.get("parameters") or {"type": "object", "properties": {}},
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
        return json.dumps(schema), ""
    if tools and isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        tool = next((t for t in tools if t.get("name") == name), None)
        if tool is None:
            raise BadRequest(f"tool_choice: no tool named {name!r}", param="tool_choice")
        return json.dumps(tool.get("parameters") or {"type": "object", "properties": {}}), str(name)
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return json.dumps((fmt.get("json_schema") or {}).get("schema") or {}), None
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return '{"type": "object"}', None
    return None, None


def forced_calls(text: str, forced: str) -> list[dict[str, Any]]:
    """The tool calls of a forced answer: the array of ``{"name", "parameters"}`` (required), or the named
    function's arguments."""
    if forced:
        calls = [{"name": forced, "arguments": text.strip()}]
    else:
        try:
            items = json.loads(text)
        except ValueError:
            return []
        if not isinstance(items, list):
            return []
        calls = [
            {
                "name": str(item.get("name")),
                "arguments": json.dumps(item.get("parameters", {}), ensure_ascii=False),
            }
            for item in items
            if isinstance(item, dict)
        ]
    return [{"id": "chatcmpl-tool-" + new_id("")[:32], "type": "function", "function": c} for c in calls]


class VllmHttp(HttpApi):
    """vLLM's OpenAI-compatible server; see the module docstring."""

    base_path = "/v1"

    def __init__(self, fake: Any) -> None:
        super().__init__(fake)
        self.model: FakeModel = load(fake.models[0], fake.response_tokens)

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat),
            web.post("/v1/completions", self._completions),
            web.get("/v1/models", self._models),
            web.get("/health", self._health),
        ]

    async def _not_found(self, request: web.Request) -> web.Response:
        return json_response({"detail": "Not Found"}, 404)

    def _check(self, request: web.Request) -> web.Response | None:
        if self._bearer is None:
            return None
        if hmac.compare_digest(request.headers.get("Authorization", "").encode(), self._bearer.encode()):
            return None
        self.fake.stats["unauthorized"] += 1
        return json_response({"error": "Unauthorized"}, 401)

    def _parse(self, raw: bytes) -> Chat:
        try:
            body = orjson.loads(raw)
            self.fake.received.append(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"JSON decode error: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: a non-empty list is required", param="messages")
        model = body.get("model")
        if model is None:
            model = self.fake.models[0]
        if not isinstance(model, str):
            raise BadRequest("model: must be a string", param="model")
        sampling_of(body, chat=True)  # checked here, used in _answer
        return Chat(model, "", 0, None, (), body.get("stream") is True, False, body)

    def _unknown_model(self, model: str) -> BadRequest:
        return BadRequest(f"The model `{model}` does not exist.", status=404, param="model")

    def _invalid(self, exc: BadRequest) -> web.Response:
        return _error(exc.status, exc.message, exc.param)

    def _injected(self, status: int, retry_after: float) -> web.Response:
        response = _error(status, f"injected error (HTTP {status})")
        if status == 429:
            response.headers["Retry-After"] = str(max(1, round(retry_after)))
        return response

    def _stream_error(self) -> bytes:
        status = self.fake.faults.error_status
        body = {
            "error": {
                "message": f"injected error (HTTP {status})",
                "type": "InternalServerError",
                "code": status,
            }
        }
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def _prompt(self, body: Mapping[str, Any]) -> tuple[list[int], bool, bool, tuple[ImageFacts, ...]]:
        """The chat's prompt ids (one ``<|image_pad|>`` anchor per image), whether it opens a thought, whether
        tools are on, and its images in prompt order."""
        urls: list[str] = []
        for i, message in enumerate(body["messages"]):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"messages[{i}]: must be an object with a role", param="messages")
            content = message.get("content")
            if isinstance(content, list):
                urls.extend(url for url in map(_image_url, content) if url is not None)
        if urls:
            model = body.get("model") or self.fake.models[0]
            if not self.fake.vision:
                raise BadRequest(f"{model} is not a multimodal model", param="messages")
            if len(urls) > MAX_IMAGES:
                raise BadRequest(f"At most {MAX_IMAGES} image(s) may be provided in one prompt.")
        messages = []
        for message in body["messages"]:
            content = message.get("content")
            if urls and isinstance(content, list):
                messages.append({**message, "content": _parts(content)})
            else:
                messages.append({**message, "content": _content_text(content)})
        try:
            images = tuple(image_facts(fetch_media(url)) for url in urls)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        tools = body.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise BadRequest("tools: must be a list", param="tools")
        kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise BadRequest("chat_template_kwargs: must be an object", param="chat_template_kwargs")
        use_tools = bool(tools) and body.get("tool_choice") != "none"
        try:
            text = self.model.render(
                messages,
                tools=tools if use_tools else None,
                add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                **kwargs,
            )
        except Exception as exc:  # a template error is the client's
            raise BadRequest(f"chat template error: {exc}") from None
        ids = self.model.encode(text)
        return ids, self.model.read(ids).thinking, use_tools, images

    def _generate(
        self, ids: list[int], sampling: Sampling, images: tuple[ImageFacts, ...] = ()
    ) -> tuple[list[Generation], int]:
        """The choices and the prompt's length, its images' anchors expanded."""
        try:
            prompt = self.model.expand(ids, images)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        if len(prompt) >= self.model.max_context_length:
            raise BadRequest(
                f"This model's maximum context length is {self.model.max_context_length} tokens. However, your "
                f"request has {len(prompt)} input tokens. Please reduce the length of the input messages.",
                param="messages",
            )
        try:
            return self.model.generate(prompt, sampling, images), len(prompt)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    def _logprobs(self, g: Generation, start: int, end: int, chat: bool) -> Any:
        if g.logprobs is None:
            return None
        entries = g.logprobs[start:end]

        def token(t: int) -> str:
            return self.model.decode([t], skip_special_tokens=False)

        if chat:
            return {
                "content": [
                    {
                        "token": token(e.token_id),
                        "logprob": e.logprob,
                        "bytes": list(token(e.token_id).encode()),
                        "top_logprobs": [
                            {"token": token(t), "logprob": v, "bytes": list(token(t).encode())}
                            for t, v in e.top
                        ],
                    }
                    for e in entries
                ]
            }
        return {
            "tokens": [token(e.token_id) for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{token(t): v for t, v in e.top} for e in entries],
            "text_offset": [],
        }

    async def _answer(self, request: web.Request, chat: Chat, reply: Reply) -> web.StreamResponse:
        body = chat.body
        try:
            ids, thinking, use_tools, images = self._prompt(body)
            schema, forced = constraint_of(body, use_tools)
            sampling = dataclasses.replace(sampling_of(body, chat=True), json_schema=schema)
            generations, prompt_tokens = self._generate(ids, sampling, images)
        except BadRequest as exc:
            self.fake.stats["rejected"] += 1
            return self._invalid(exc)
        choices = []
        for g in generations:
            if forced is None:
                content, reasoning, calls = parse_output(g.text, thinking, use_tools)
                finish = (
                    "tool_calls" if calls and body.get("tool_choice") in (None, "auto") else g.finish_reason
                )
            else:
                text, reasoning, _ = parse_output(g.text, thinking, False)
                calls = forced_calls(text or "", forced)
                # vLLM: "tool_calls" for required, the engine's reason for a named function (content "").
                content = "" if forced else None
                finish = "tool_calls" if not forced and g.finish_reason == "stop" else g.finish_reason
            choices.append(_Choice(g, content, reasoning, calls, finish))
        completion_id = new_id("chatcmpl-")
        created = int(time.time())
        completion_tokens = sum(len(c.generation.token_ids) for c in choices)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        }
        if not chat.stream:
            return self._completed(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": chat.model,
                    "choices": [
                        {
                            "index": c.generation.index,
                            "message": {
                                "role": "assistant",
                                # Only whitespace before the tool calls: no content (streams send it).
                                "content": None
                                if c.tool_calls and not (c.content or "").strip()
                                else c.content,
                                "refusal": None,
                                "annotations": None,
                                "audio": None,
                                "function_call": None,
                                "tool_calls": c.tool_calls,
                                "reasoning_content": c.reasoning,
                            },
                            "logprobs": self._logprobs(c.generation, 0, len(c.generation.token_ids), True),
                            "finish_reason": c.finish_reason,
                            "stop_reason": c.generation.matched_stop_str or c.generation.matched_token_id,
                        }
                        for c in choices
                    ],
                    "service_tier": None,
                    "system_fingerprint": None,
                    "usage": usage,
                    "prompt_logprobs": None,
                    "kv_transfer_params": None,
                }
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        head = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": chat.model,
        }

        def frame(choices_: list[dict[str, Any]], **extra: Any) -> bytes:
            return b"data: " + orjson.dumps({**head, "choices": choices_, **extra}) + b"\n\n"

        frames = [
            frame(
                [
                    {
                        "index": c.generation.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                    }
                    for c in choices
                ]
            )
        ]
        frames.extend(frame([chunk]) for chunk in self._chat_chunks(choices))
        closing = b""
        if include_usage:
            closing += frame([], usage=usage)
        paced = Reply("", (), "stop", None, tuple(frames[1:]))
        return await self._stream(request, paced, frames[0], lambda f: f, closing + _DONE)

    def _chat_chunks(self, choices: list[_Choice]) -> Iterator[dict[str, Any]]:
        """The streamed choices, one token of each choice a step (interleaved when n > 1); reasoning, then
        content, then the tool calls once their block is complete; the finish reason on a choice's last."""
        state = []
        for c in choices:
            text = c.generation.text
            spans: list[tuple[str, int, int]] = []  # (field, start, end) in the choice's text
            at = 0
            if c.reasoning is not None:
                at = len("<think>") if text.startswith("<think>") else 0
                spans.append(("reasoning_content", at, at + len(c.reasoning)))
                at += len(c.reasoning) + len("</think>")
            if c.content:
                spans.append(("content", at, at + len(c.content)))
            steps_: list[dict[str, str]] = []
            offset = 0
            for piece_of_text in self.model.text_deltas(c.generation):
                fields: dict[str, str] = {}
                for name, lo, hi in spans:
                    piece = text[max(lo, offset) : min(hi, offset + len(piece_of_text))]
                    if piece:
                        fields[name] = piece
                steps_.append(fields)
                offset += len(piece_of_text)
            state.append((c, steps_))
        steps = max(len(k) for _, k in state)
        for step in range(steps):
            for c, kinds in state:
                if step >= len(kinds):
                    continue
                last = step == len(kinds) - 1
                g = c.generation
                delta: dict[str, Any] = dict(kinds[step])
                if last and c.tool_calls:
                    delta["tool_calls"] = [
                        {"index": i, **call, "function": dict(call["function"])}
                        for i, call in enumerate(c.tool_calls)
                    ]
                if not delta and not last:
                    continue
                yield {
                    "index": g.index,
                    "delta": delta,
                    "logprobs": self._logprobs(g, step, step + 1, True),
                    "finish_reason": c.finish_reason if last else None,
                    **({"stop_reason": g.matched_stop_str or g.matched_token_id} if last else {}),
                }

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            denied = self._check(request)
            if denied is not None:
                return denied
            try:
                body = orjson.loads(await request.read())
                self.fake.received.append(body)
                if not isinstance(body, dict):
                    raise BadRequest("the body must be a JSON object")
                model = body.get("model") or self.fake.models[0]
                if not self._known(model):
                    raise self._unknown_model(model)
                prompt = body.get("prompt")
                if isinstance(prompt, list) and len(prompt) == 1:
                    prompt = prompt[0]
                if isinstance(prompt, str):
                    ids = self.model.encode(prompt)
                elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                    ids = list(prompt)
                else:
                    raise BadRequest("prompt: a string or a list of token ids is required", param="prompt")
                sampling = sampling_of(body, chat=False)
                if sampling.max_tokens is None:
                    sampling = dataclasses.replace(sampling, max_tokens=16)  # the OpenAI default vLLM keeps
                generations, _ = self._generate(ids, sampling)
            except orjson.JSONDecodeError as exc:
                self.fake.stats["rejected"] += 1
                return _error(400, f"JSON decode error: {exc}")
            except BadRequest as exc:
                self.fake.stats["rejected"] += 1
                return self._invalid(exc)
            fault = await self._admit()
            if fault is not None:
                return self._injected(*fault)
            completion_id = new_id("cmpl-")
            created = int(time.time())
            completion_tokens = sum(len(g.token_ids) for g in generations)
            usage = {
                "prompt_tokens": len(ids),
                "total_tokens": len(ids) + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
            }
            head = {"id": completion_id, "object": "text_completion", "created": created, "model": model}
            if body.get("stream") is not True:
                return self._completed(
                    {
                        **head,
                        "choices": [
                            {
                                "index": g.index,
                                "text": g.text,
                                "logprobs": self._logprobs(g, 0, len(g.token_ids), False),
                                "finish_reason": g.finish_reason,
                                "stop_reason": g.matched_stop_str or g.matched_token_id,
                                "prompt_logprobs": None,
                            }
                            for g in generations
                        ],
                        "service_tier": None,
                        "system_fingerprint": None,
                        "usage": usage,
                        "kv_transfer_params": None,
                    }
                )
            frames = []
            per_choice = [(g, self.model.text_deltas(g)) for g in generations]
            for step in range(max(len(d) for _, d in per_choice)):
                for g, deltas in per_choice:
                    if step >= len(deltas):
                        continue
                    last = step == len(deltas) - 1
                    if not deltas[step] and not last:
                        continue
                    choice = {
                        "index": g.index,
                        "text": deltas[step],
                        "logprobs": self._logprobs(g, step, step + 1, False),
                        "finish_reason": g.finish_reason if last else None,
                        "stop_reason": (g.matched_stop_str or g.matched_token_id) if last else None,
                    }
                    frames.append(b"data: " + orjson.dumps({**head, "choices": [choice]}) + b"\n\n")
            options = body.get("stream_options")
            closing = _DONE
            if isinstance(options, dict) and options.get("include_usage") is True:
                closing = b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n" + _DONE
            paced = Reply("", (), "stop", None, tuple(frames))
            return await self._stream(request, paced, b"", lambda f: f, closing)

    async def _models(self, request: web.Request) -> web.Response:
        denied = self._check(request)
        if denied is not None:
            return denied
        data: list[dict[str, Any]] = [
            {
                "id": m,
                "object": "model",
                "created": MODEL_CREATED,
                "owned_by": "vllm",
                "root": m,
                "parent": None,
                "max_model_len": self.model.max_context_length,
                "permission": [],
            }
            for m in self.fake.models
        ]
        return json_response({"object": "list", "data": data})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)
