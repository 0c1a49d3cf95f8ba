"""Rendering a model's chat template: a conversation (OpenAI-style messages, tools) into the prompt's text.

The model learned one exact prompt layout, written by its Jinja chat template; an engine that takes token
ids leaves rendering it to its client. This renders it the way transformers' ``apply_chat_template`` does,
so a prompt here is the prompt the model was trained on:

* a sandboxed, immutable Jinja environment (``trim_blocks``, ``lstrip_blocks``, ``{% break %}`` and
  ``{% continue %}``): templates are the model repository's code, not ours, and must not reach Python;
* transformers' globals and filters: ``raise_exception(message)``, ``strftime_now(format)``, and a
  ``tojson`` that keeps non-ASCII characters and takes ``indent``, ``separators`` and ``sort_keys``;
* the variables ``messages``, ``tools`` (the request's tool dicts, ``{"type": "function", "function":
  {...}}``), ``documents``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, and whatever the
  request adds (``chat_template_kwargs``: ``enable_thinking`` for Qwen 3, ...).

Messages are prepared as vLLM prepares them (:func:`template_messages`): content given as a list of parts
becomes one string (text parts joined by newlines), since most templates expect a string; a conversation
with images keeps its parts instead, in transformers' shape (``{"type": "text", "text": ...}``,
``{"type": "image"}``), which a vision model's template turns into its image placeholders; an assistant's
tool-call arguments (a JSON string on the wire) become the object templates write with ``tojson``.
Compiled templates are cached (a bounded LRU), so a model's template is compiled once.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_CACHE_SIZE = 16  # compiled templates kept: one or two per model a proxy serves


class ChatTemplateError(ValueError):
    """The chat template failed on this conversation, or the conversation cannot be given to it."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    bos_token: str | None = None,
    eos_token: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
    keep_parts: bool = False,
) -> str:
    """The prompt ``template`` writes for ``messages`` (OpenAI chat messages, prepared by
    :func:`template_messages`; ``keep_parts`` for a conversation with images).

    ``continue_final_message`` leaves the last (assistant) message open for the model to go on with,
    cutting what the template writes after its content, as transformers does. ``template_kwargs`` are
    further template variables; they cannot replace the ones named here.
    """
    if add_generation_prompt and continue_final_message:
        raise ChatTemplateError(
            "add_generation_prompt and continue_final_message cannot both be set: the first opens a new "
            "assistant message, the second continues the last one"
        )
    prepared = template_messages(messages, keep_parts=keep_parts)
    variables: dict[str, Any] = dict(template_kwargs or {})
    variables.update(
        messages=prepared,
        tools=[dict(tool) for tool in tools] if tools else None,
        documents=[dict(doc) for doc in documents] if documents else None,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token if bos_token is not None else "",
        eos_token=eos_token if eos_token is not None else "",
    )
    compiled = _compile(template)
    try:
        rendered = compiled.render(**variables)
    except jinja2.exceptions.SecurityError as exc:
        raise ChatTemplateError(f"the chat template tried something the sandbox forbids: {exc}") from exc
    except jinja2.exceptions.UndefinedError as exc:
        raise ChatTemplateError(f"the chat template used something undefined: {exc}") from exc
    except _TemplateRaised as exc:
        raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from exc
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc}") from exc
    except (
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
        OverflowError,
        RecursionError,
    ) as exc:
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from exc
    if continue_final_message:
        rendered = _cut_after_final_message(rendered, prepared)
    return rendered


def template_messages(
    messages: Iterable[Mapping[str, Any]], *, keep_parts: bool = False
) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: content as one string, tool-call arguments as objects.

    A list of content parts becomes its text parts joined by newlines (vLLM's "string" content format,
    which most templates need); any other part (an image, audio) is refused. With ``keep_parts`` (a
    conversation with images, for a vision model's template) a list stays a list of transformers' parts:
    text parts ``{"type": "text", "text": ...}``, images ``{"type": "image"}``.
    """
    prepared = []
    for position, message in enumerate(messages):
        copy = dict(message)
        content = copy.get("content")
        if isinstance(content, list):
            copy["content"] = _parts(content, position) if keep_parts else _flatten_parts(content, position)
        if isinstance(copy.get("tool_calls"), list):
            copy["tool_calls"] = [_parsed_arguments(call) for call in copy["tool_calls"]]
        prepared.append(copy)
    return prepared


def _flatten_parts(parts: list[Any], position: int) -> str:
    texts = []
    for part in parts:
        text = _part_text(part)
        if text is None:
            raise ChatTemplateError(
                f"message {position} has a content part of type {_kind(part)!r}: this provider sends text "
                "to the model's chat template and cannot carry images, audio or files"
            )
        texts.append(text)
    return "\n".join(texts)


def _parts(parts: list[Any], position: int) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    for part in parts:
        text = _part_text(part)
        if text is not None:
            kept.append({"type": "text", "text": text})
        elif _kind(part) == "image_url":
            kept.append({"type": "image"})
        else:
            raise ChatTemplateError(
                f"message {position} has a content part of type {_kind(part)!r}: this provider carries "
                "text and images only"
            )
    return kept


def _kind(part: Any) -> Any:
    return part.get("type") if isinstance(part, Mapping) else None


def _part_text(part: Any) -> str | None:
    """A text part's text (an assistant's refusal sent back counts as its text); None for other parts."""
    if isinstance(part, str):
        return part
    kind = _kind(part)
    if kind in ("text", "input_text") and isinstance(part.get("text"), str):
        return str(part["text"])
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return str(part["refusal"])
    return None


def _parsed_arguments(call: Any) -> Any:
    """A tool call whose ``function.arguments`` JSON string is parsed into the object templates expect
    (``tool_call.arguments | tojson``); arguments that are not a JSON object stay a string."""
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        return call
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {**call, "function": function}


def _cut_after_final_message(rendered: str, messages: list[dict[str, Any]]) -> str:
    final = messages[-1].get("content") if messages else None
    if not isinstance(final, str) or not final.strip():
        raise ChatTemplateError("continue_final_message needs a last message with text content")
    location = rendered.rfind(final.strip())
    if location < 0:
        raise ChatTemplateError(
            "continue_final_message: the template did not write the last message's content verbatim"
        )
    # The template may trim the message's trailing spaces: keep them only when it wrote them (the test is
    # transformers', which a message with leading spaces never passes).
    if rendered[location : location + len(final.lstrip())] == final:
        return rendered[: location + len(final.lstrip())]
    return rendered[: location + len(final.strip())]


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """A template's own ``raise_exception(message)``."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter, not Jinja's: Jinja's escapes <, >, & and ' for HTML, which would change the
    # prompt the model was trained on.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers marks assistant text with it for training
    masks; rendering keeps the text as it is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=TEMPLATE_CACHE_SIZE)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    try:
        return environment.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile (line {exc.lineno}): {exc.message}"
        ) from exc
