"""Images for an inference engine: where they sit in the prompt, and what the engine takes of them.

A vision model's engine takes the prompt's ids with one placeholder token per image, the *anchor* its
processor expands into the image's feature tokens (Qwen2-VL's ``<|image_pad|>``, Llama 3.2 Vision's
``<|image|>``, LLaVA's ``<image>``...), and the images beside the ids. The chat template writes the
anchors: a vision model's template handles content parts and writes an anchor for each part of type
``image`` (transformers' convention), so a conversation with images goes to it with its parts kept
(:func:`llmgw.engine.chat_template.render_chat_template`, ``keep_parts``). The anchor is the first token of
:data:`ANCHORS` the tokenizer holds as one token. The anchors in the prompt's ids are counted against the
images: a template that leaves an image out (a text model's) or writes two anchors for one is refused, never
an image lost.

What an engine takes is its :class:`MediaSupport`, from the engine itself:

* **vLLM** with worker-side processing (``GetServerInfo``: ``mm_processor`` set): the images' URLs as the
  client sent them (``media_refs``), fetched by the worker under its own rules, in the URL schemes it names
  (``mm_media_ref_schemes``), at most its per-prompt limit (``mm_item_limits``);
* **TensorRT-LLM**: the images' bytes (``multimodal_input.image_data``), which its input processor decodes;
  the gateway reads them from ``data:`` URLs only: it fetches nothing from the network for a client;
* **SGLang**: pixel tensors preprocessed per model family, which the gateway does not make: refused.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal

# Image placeholder tokens of vision models' tokenizers, the most specific first.
ANCHORS: Final = (
    "<|image_pad|>",  # Qwen2-VL, Qwen2.5-VL, Qwen3-VL
    "<|image|>",  # Llama 3.2 Vision, Llama 4
    "<start_of_image>",  # Gemma 3
    "[IMG]",  # Pixtral, Mistral Small 3.1
    "<IMG_CONTEXT>",  # InternVL
    "<image>",  # LLaVA, Idefics, PaliGemma
)


class MediaError(ValueError):
    """The images cannot go to this engine as the request gives them: the message says why (a 400)."""


@dataclasses.dataclass(frozen=True)
class MediaSupport:
    """What an engine takes of a request's images.

    ``transport``: ``"url"`` (the URLs, fetched by the engine), ``"bytes"`` (the images' bytes), or None
    (no images: ``refusal`` says why). ``schemes``: the URL schemes a ``"url"`` engine fetches.
    ``max_images``: the most one prompt may carry, None when the engine does not say.
    """

    transport: Literal["url", "bytes"] | None
    refusal: str = ""
    schemes: frozenset[str] = frozenset()
    max_images: int | None = None


def item_limits(text: str) -> dict[str, int]:
    """vLLM's ``mm_item_limits`` (``"image=8,video=2"``) as a dict; malformed pairs are left out."""
    limits = {}
    for pair in text.split(","):
        name, _, count = pair.strip().partition("=")
        if name and count.isdigit():
            limits[name] = int(count)
    return limits


def image_urls(messages: Iterable[Mapping[str, Any]]) -> list[str]:
    """The URL of every ``image_url`` part of the conversation, in prompt order."""
    urls = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, Mapping) and part.get("type") == "image_url":
                image = part.get("image_url")
                url = image.get("url") if isinstance(image, Mapping) else None
                if not isinstance(url, str) or not url:
                    raise MediaError(f"messages[{i}].content[{j}].image_url.url: must be a URL")
                urls.append(url)
    return urls


def anchor_of(token_id: Any) -> tuple[str, int] | None:
    """The model's image anchor token and its id: the first of :data:`ANCHORS` that ``token_id`` (a
    tokenizer's token-to-id lookup) knows; None for a model without one."""
    for token in ANCHORS:
        found = token_id(token)
        if found is not None:
            return token, int(found)
    return None


def check_anchors(ids: list[int], anchor: tuple[str, int], images: int) -> None:
    """Refuse a prompt whose anchors do not match the images one for one."""
    found = ids.count(anchor[1])
    if found != images:
        raise MediaError(
            f"the model's chat template wrote {found} image placeholder(s) ({anchor[0]}) for {images} "
            "image(s); each image needs exactly one (is the chat template a vision model's?)"
        )


def scheme_of(url: str) -> str:
    scheme, colon, _ = url.partition(":")
    return scheme.lower() if colon and scheme.isascii() and scheme.replace("+", "").isalnum() else ""


def data_url_bytes(url: str, where: str) -> bytes:
    """The bytes of a ``data:<type>;base64,<payload>`` image URL."""
    if scheme_of(url) != "data":
        raise MediaError(
            f"{where}: this provider takes images as data: URLs (base64); the gateway does not fetch "
            f"{scheme_of(url) or 'such'} URLs for a client"
        )
    header, comma, payload = url[5:].partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError(f"{where}: a data: URL must be base64 (data:image/png;base64,...)")
    if not header.startswith("image/"):
        raise MediaError(f"{where}: a data: URL of type {header[:-7] or 'none'!r} is not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: the data: URL's payload is not valid base64") from None
