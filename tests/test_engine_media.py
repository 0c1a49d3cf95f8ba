"""Images for inference engines, without sockets: the URLs in a conversation, the model's placeholder token,
the count check, data: URLs, what each protocol says it takes, and a vision template given content parts."""

from __future__ import annotations

import base64
import importlib
from typing import Any

import pytest

from llmgw.engine.chat_template import ChatTemplateError, render_chat_template, template_messages
from llmgw.engine.media import (
    MediaError,
    anchor_of,
    check_anchors,
    data_url_bytes,
    image_urls,
    item_limits,
    scheme_of,
)
from llmgw.providers._engine_protocol import PROTOCOLS, Sampling

vpb: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2")
tpb: Any = importlib.import_module("smg_grpc_proto.generated.trtllm_service_pb2")
common: Any = importlib.import_module("smg_grpc_proto.generated.common_pb2")

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
# Qwen2.5-VL's handling of content parts, cut down.
VISION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for c in m.content %}"
    "{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


def image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def test_image_urls_in_prompt_order() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [image("data:image/png;base64,A"), {"type": "text", "text": "and"}]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [image("https://example.test/b.png")]},
    ]
    assert image_urls(messages) == ["data:image/png;base64,A", "https://example.test/b.png"]
    with pytest.raises(MediaError, match=r"messages\[0\]\.content\[0\]\.image_url\.url"):
        image_urls([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])


def test_anchor_is_the_first_known_placeholder_the_tokenizer_has() -> None:
    vocab = {"<image>": 7, "<|image_pad|>": 151655}
    assert anchor_of(vocab.get) == ("<|image_pad|>", 151655)
    assert anchor_of({"<image>": 7}.get) == ("<image>", 7)
    assert anchor_of({}.get) is None


def test_placeholders_must_match_the_images_one_for_one() -> None:
    check_anchors([1, 9, 2, 9], ("<x>", 9), 2)
    with pytest.raises(MediaError, match=r"wrote 0 image placeholder\(s\) \(<x>\) for 1 image"):
        check_anchors([1, 2], ("<x>", 9), 1)
    with pytest.raises(MediaError, match=r"wrote 2 .* for 1"):
        check_anchors([9, 9], ("<x>", 9), 1)


def test_data_urls() -> None:
    assert data_url_bytes(f"data:image/png;base64,{PNG}", "image 1") == b"\x89PNG\r\n\x1a\n"
    assert scheme_of("HTTPS://x") == "https" and scheme_of("no scheme") == ""
    with pytest.raises(MediaError, match=r"image 1: .*does not fetch https URLs"):
        data_url_bytes("https://example.test/a.png", "image 1")
    with pytest.raises(MediaError, match="must be base64"):
        data_url_bytes("data:image/png,rawbytes", "image 1")
    with pytest.raises(MediaError, match="'text/plain' is not an image"):
        data_url_bytes("data:text/plain;base64,aGk=", "image 1")
    with pytest.raises(MediaError, match="not valid base64"):
        data_url_bytes("data:image/png;base64,@@@", "image 1")


def test_item_limits() -> None:
    assert item_limits("image=8,video=2") == {"image": 8, "video": 2}
    assert item_limits("") == {} and item_limits("image=x, audio=1") == {"audio": 1}


def test_parts_kept_for_a_vision_template() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is"}, image("data:x")]}]
    assert template_messages(messages, keep_parts=True)[0]["content"] == [
        {"type": "text", "text": "what is"},
        {"type": "image"},
    ]
    assert render_chat_template(VISION_TEMPLATE, messages, add_generation_prompt=False, keep_parts=True) == (
        "<|im_start|>user\nwhat is<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )
    with pytest.raises(ChatTemplateError, match="cannot carry images"):  # a text conversation's flattening
        template_messages(messages)
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    with pytest.raises(ChatTemplateError, match="'input_audio': this provider carries text and images only"):
        template_messages([{"role": "user", "content": [audio]}], keep_parts=True)


def test_what_each_protocol_takes() -> None:
    vllm, sglang, trtllm = PROTOCOLS["vllm"], PROTOCOLS["sglang"], PROTOCOLS["trtllm"]
    off = vllm.media_support(vpb.GetServerInfoResponse().SerializeToString())
    assert off.transport is None and "no mm_processor" in off.refusal
    assert vllm.media_support(None).transport is None
    on = vllm.media_support(
        vpb.GetServerInfoResponse(
            mm_processor="inprocess",
            mm_media_ref_schemes="http, https,data",
            mm_item_limits="image=4,video=1",
        ).SerializeToString()
    )
    assert (on.transport, on.schemes, on.max_images) == ("url", frozenset({"http", "https", "data"}), 4)
    assert sglang.media_support(None).transport is None
    assert trtllm.media_support(None).transport == "bytes"

    request = vpb.GenerateRequest.FromString(
        vllm.generate("r", [1, 9, 2], "", Sampling(max_tokens=5), images=["data:image/png;base64,A"])
    )
    assert [(m.modality, m.url) for m in request.media_refs.items] == [
        (common.Modality.Value("IMAGE"), "data:image/png;base64,A")
    ]
    assert list(request.tokenized.input_ids) == [1, 9, 2]
    request = tpb.GenerateRequest.FromString(
        trtllm.generate("r", [1, 9], "", Sampling(max_tokens=5), images=[b"\x89PNG"])
    )
    assert list(request.multimodal_input.image_data) == [b"\x89PNG"]
    text_only = tpb.GenerateRequest.FromString(trtllm.generate("r", [1], "", Sampling(max_tokens=5)))
    assert not text_only.HasField("multimodal_input")
