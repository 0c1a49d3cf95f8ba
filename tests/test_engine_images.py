"""Images through the engine path end to end: the official ``openai`` and ``anthropic`` SDKs on the proxy, the
fake engines with ``vision`` on (:mod:`llmgw_dev.fakes.engine`), and the ``vllm-http`` fake (vLLM's own
OpenAI server on the same vision model) as the reference: both paths of a migration see the same images and
answer alike, usage counting the prompt the engine expanded them into."""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import openai
import pytest
from engine_routers import MODEL, answer
from test_engine_provider import Start, engine_proxy
from test_fake_engine_media import data_url, gif, png

from llmgw_dev.fakes import FakeProvider
from llmgw_dev.fakes.model import load

WIDE, SMALL = png(100, 60), gif(30, 20)  # 4 x 3 = 12 image tokens; 2 x 1 = 2


def look(*images: bytes, text: str = "What is in this picture?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    mime = {b"\x89P": "image/png", b"GI": "image/gif"}
    parts += [
        {"type": "image_url", "image_url": {"url": data_url(image, mime[image[:2]])}} for image in images
    ]
    return [{"role": "user", "content": parts}]


def generated(engine: FakeProvider) -> list[Any]:
    return [r for r in engine.received if type(r).__name__ == "GenerateRequest"]


@pytest.mark.parametrize("kind", ["vllm", "trtllm"])
async def test_images_answer_as_vllm_http_does(start_proxy: Start, kind: str) -> None:
    conversations = [
        look(WIDE),
        look(WIDE, SMALL, text="Compare these two."),
        [
            *look(SMALL),
            {"role": "assistant", "content": "A small GIF."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(WIDE)}}]},
        ],
    ]
    async with engine_proxy(start_proxy, kind, vision=True) as (engine, rest, client, _):
        direct = openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)
        for messages in conversations:
            for stream in (False, True):
                through = await answer(client, stream, messages=messages)
                assert through == await answer(direct, stream, messages=messages), (kind, stream)
                assert "a 100x60 PNG image" in str(through) or "a 30x20 GIF image" in str(through)
        await direct.close()
        # One placeholder per image in the ids, the images beside them: URLs for vLLM, bytes for TensorRT-LLM.
        sent = generated(engine)[-1]
        model = load(MODEL, 20)
        pad = model.encode("<|image_pad|>")[0]
        if kind == "vllm":
            assert list(sent.tokenized.input_ids).count(pad) == 2
            assert [item.url for item in sent.media_refs.items] == [
                data_url(SMALL, "image/gif"),
                data_url(WIDE),
            ]
        else:
            assert list(sent.tokenized.input_token_ids).count(pad) == 2
            assert list(sent.multimodal_input.image_data) == [SMALL, WIDE]


async def test_usage_counts_the_expanded_prompt(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, vision=True) as (_, _, client, _):
        text_only = await client.chat.completions.create(
            model=MODEL, messages=look(text="What is in this picture?")
        )
        with_image = await client.chat.completions.create(model=MODEL, messages=look(WIDE))
        assert text_only.usage is not None and with_image.usage is not None
        # The image adds its anchor and the two vision markers, then the engine expands the anchor to 12.
        assert with_image.usage.prompt_tokens == text_only.usage.prompt_tokens + 3 + 11
        assert (
            with_image.usage.total_tokens
            == with_image.usage.prompt_tokens + with_image.usage.completion_tokens
        )


async def test_anthropic_image_blocks_reach_the_engine(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, vision=True) as (_, _, client, server):
        messages = anthropic.AsyncAnthropic(
            base_url=f"http://127.0.0.1:{server.rest_port}", api_key="unused", max_retries=0
        )
        reply = await messages.messages.create(
            model=MODEL,
            max_tokens=200,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {
                            "type": "image",
                            "source": {
                                "type": "base64",
                                "media_type": "image/png",
                                "data": base64.b64encode(WIDE).decode(),
                            },
                        },
                    ],
                }
            ],
        )
        await messages.close()
        chat = await client.chat.completions.create(model=MODEL, messages=look(WIDE))
        text = "".join(block.text for block in reply.content if block.type == "text")
        assert text == chat.choices[0].message.content and "a 100x60 PNG image" in text


async def test_refusals(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, vision=True) as (engine, _, client, _):
        before = len(generated(engine))
        # The engine fetches data: URLs only (its mm_media_ref_schemes): said before the request leaves.
        remote = [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]}
        ]
        with pytest.raises(openai.BadRequestError, match="fetches images from data URLs only, not https"):
            await client.chat.completions.create(model=MODEL, messages=remote)
        # At most its mm_item_limits (image=4) in one prompt.
        with pytest.raises(openai.BadRequestError, match=r"5 images; .* takes at most 4"):
            await client.chat.completions.create(model=MODEL, messages=look(*[SMALL] * 5))
        assert len(generated(engine)) == before
        # What the engine itself refuses (not an image) comes back as a 400 with its words.
        bogus = [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
            }
        ]
        with pytest.raises(openai.BadRequestError, match="cannot identify image file"):
            await client.chat.completions.create(model=MODEL, messages=bogus)
    # A template that writes no placeholder (a text model's) loses no image: a 400.
    text_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    async with engine_proxy(start_proxy, vision=True, chatTemplate=text_template) as (engine, _, client, _):
        with pytest.raises(
            openai.BadRequestError, match=r"wrote 0 image placeholder\(s\) \(<\|image_pad\|>\)"
        ):
            await client.chat.completions.create(model=MODEL, messages=look(WIDE))
        assert generated(engine) == []
    async with engine_proxy(start_proxy, "sglang", vision=True) as (_, _, client, _):
        with pytest.raises(openai.BadRequestError, match="SGLang's engine takes images as pixel tensors"):
            await client.chat.completions.create(model=MODEL, messages=look(WIDE))
    async with engine_proxy(start_proxy, "trtllm", vision=True) as (_, _, client, _):
        with pytest.raises(openai.BadRequestError, match=r"image 1: .*does not fetch https URLs"):
            await client.chat.completions.create(model=MODEL, messages=remote)
    async with engine_proxy(start_proxy, "trtllm") as (_, _, client, _):
        with pytest.raises(openai.BadRequestError, match="is not a multimodal model"):
            await client.chat.completions.create(model=MODEL, messages=look(WIDE))
