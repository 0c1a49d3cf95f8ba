"""Images on the fake engines (``vision``): the model's image facts, placeholder expansion and description; the
``vllm`` engine's ``media_refs``, TensorRT-LLM's ``multimodal_input``, SGLang's refusal of preprocessed tensors;
and the ``vllm-http`` fake, which answers an ``image_url`` request as the vLLM engine answers the same rendered
prompt with ``media_refs``.

The images are built here, byte by byte: a real PNG (zlib + struct), and the headers of a JPEG, a GIF and the
three WebP kinds, which is all the fakes read.
"""

from __future__ import annotations

import argparse
import base64
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest
from engine_routers import MODEL
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import trtllm_service_pb2 as tpb
from smg_grpc_proto.generated import trtllm_service_pb2_grpc as tpb_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc
from test_fake_engine import HELLO, chat_ids, collect, model, vreq

from llmgw_dev.fakes import FakeProvider, configure_parser, make_reply, provider_from_args
from llmgw_dev.fakes.model import (
    ENCODER_BUDGET,
    ImageFacts,
    Sampling,
    fetch_media,
    image_facts,
    image_tokens,
)

# ------------------------------------------------------------------------------------------------- images


def png(width: int, height: int) -> bytes:
    """A valid RGB PNG of that size (all black)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x00" * 3 * width for _ in range(height))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def jpeg(width: int, height: int) -> bytes:
    """A baseline JPEG's header: SOI, a JFIF APP0, a fill byte, a DQT, then the frame (SOF0), EOI."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(range(64))
    sof = (
        b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    )
    return b"\xff\xd8" + app0 + b"\xff" + dqt + sof + b"\xff\xd9"


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + b";"


def riff(fourcc: bytes, body: bytes) -> bytes:
    data = b"WEBP" + fourcc + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", len(data)) + data


def webp_vp8(width: int, height: int) -> bytes:
    return riff(b"VP8 ", b"\x30\x01\x00\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 8)


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    return riff(b"VP8L", b"\x2f" + struct.pack("<I", bits) + b"\x00" * 4)


def webp_vp8x(width: int, height: int) -> bytes:
    size = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return riff(b"VP8X", b"\x10\x00\x00\x00" + size)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


PARTS: list[Any] = [
    {"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image"}]}
]
IMAGE = png(100, 60)  # 4 x 3 = 12 image tokens
SEEN = "What is this? a 100x60 PNG image"


def test_image_facts_read_the_headers() -> None:
    for data, facts in (
        (png(4, 2), ImageFacts("PNG", 4, 2)),
        (jpeg(640, 480), ImageFacts("JPEG", 640, 480)),
        (gif(3, 5), ImageFacts("GIF", 3, 5)),
        (webp_vp8(300, 200), ImageFacts("WEBP", 300, 200)),
        (webp_vp8l(16383, 1), ImageFacts("WEBP", 16383, 1)),
        (webp_vp8x(70000, 9), ImageFacts("WEBP", 70000, 9)),
    ):
        assert image_facts(data) == facts
    assert image_facts(png(4, 2)).describe() == "a 4x2 PNG image"
    for bad in (
        b"",
        b"not an image at all",
        png(4, 2)[:20],  # truncated IHDR
        png(0, 2),
        b"BM" + b"\x00" * 60,  # BMP: not read
        b"\xff\xd8\xff\xda" + b"\x00" * 20,  # a scan before any frame
        riff(b"VP8 ", b"\x00" * 10),  # no VP8 start code
    ):
        with pytest.raises(ValueError, match=r"^cannot identify image file$"):
            image_facts(bad)


def test_image_tokens_are_qwen2_vl_patches() -> None:
    def tokens(width: int, height: int) -> int:
        return image_tokens(ImageFacts("PNG", width, height))

    assert (tokens(4, 2), tokens(28, 28), tokens(29, 28), tokens(100, 60)) == (1, 1, 2, 12)
    assert tokens(896, 896) == ENCODER_BUDGET == 1024 and tokens(897, 896) == 33 * 32


def test_fetch_media_takes_data_urls_only() -> None:
    assert fetch_media(data_url(b"abc")) == b"abc"
    assert fetch_media("DATA:image/png;BASE64," + base64.b64encode(b"x").decode(), {"data"}) == b"x"
    for url, words in (
        ("https://example.com/cat.png", "scheme https: is not allowed: the allowed schemes are data"),
        ("file:///etc/passwd", "scheme file:"),
        ("cat.png", "the allowed schemes are data"),
        ("data:image/png,rawbytes", "Only base64 data URLs"),
        ("data:image/png;base64,***", "not valid base64"),
        ("data:image/png;base64,abc", "not valid base64"),  # bad padding
    ):
        with pytest.raises(ValueError, match=words):
            fetch_media(url)
    with pytest.raises(ValueError, match="allowed schemes are none"):
        fetch_media(data_url(b"abc"), set())


# --------------------------------------------------------------------------------------------- the model


def test_vision_tokens_follow_the_others_and_are_special() -> None:
    m = model()
    ids = m.encode("<|vision_start|><|image_pad|><|vision_end|>")
    assert ids == [m.vocab_size - 3, m.vocab_size - 2, m.vocab_size - 1] and ids[1] == m.image_pad_id
    assert m.encode("</think>") == [m.vocab_size - 4]  # the last token before them keeps its id
    assert m.decode(ids) == "" and m.decode(ids, skip_special_tokens=False).count("<|image_pad|>") == 1
    config = m.files()["tokenizer_config.json"].decode()
    assert '"content": "<|image_pad|>"' in config


def test_template_renders_content_parts() -> None:
    m = model()
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image"},
                {"type": "image_url", "image_url": {"url": "data:,"}},
                {"image": "a.png"},
                {"type": "text", "text": " please."},
            ],
        },
    ]
    block = "<|vision_start|><|image_pad|><|vision_end|>"
    assert m.render(parts) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        f"<|im_start|>user\nCompare{block}{block}{block} please.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # String content renders as before; the string equivalent of text parts renders the same.
    assert m.render([{"role": "user", "content": [{"type": "text", "text": "hi"}]}]) == m.render(
        [{"role": "user", "content": "hi"}]
    )


def test_model_generates_from_the_expanded_prompt() -> None:
    m = model()
    ids = chat_ids(PARTS)
    facts = image_facts(IMAGE)
    expanded = m.expand(ids, [facts])
    assert len(expanded) == len(ids) - 1 + 12 and expanded.count(m.image_pad_id) == 12
    (g,) = m.generate(expanded, Sampling(temperature=0.0), [facts])
    assert g.text == make_reply(SEEN).text
    assert m.read(expanded, [facts]).subject == SEEN
    # Two images, one after the other and before text: a space on each side that has none.
    two = [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}
    ]
    pair = [facts, image_facts(gif(3, 5))]
    prompt = m.read(m.expand(chat_ids(two), pair), pair)
    assert prompt.subject == "a 100x60 PNG image a 3x5 GIF image Same?"
    # Without images the prompt is read as text, as before.
    (plain,) = m.generate(chat_ids(HELLO), Sampling())
    assert plain.text == make_reply("hello there wörld 😀").text
    with pytest.raises(ValueError, match="1 image placeholder"):
        m.expand(ids, [facts, facts])
    with pytest.raises(ValueError, match="0 image placeholder"):
        m.expand(chat_ids(HELLO), [facts])
    with pytest.raises(ValueError, match="exceeds the encoder budget of 1024 tokens"):
        m.expand(ids, [ImageFacts("PNG", 1000, 1000)])
    with pytest.raises(ValueError, match="At most 4 image"):
        m.expand(ids, [facts] * 5)


# ------------------------------------------------------------------------------------------- vLLM over gRPC


@pytest.fixture
async def vision_vllm() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("vllm", models=[MODEL], vision=True) as fake:
        yield fake


@pytest.fixture
async def vstub(vision_vllm: FakeProvider) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(vision_vllm.target) as channel:
        yield vpb_grpc.VllmEngineStub(channel)


def with_media(request: vpb.GenerateRequest, *urls: str, modality: int = common_pb2.IMAGE) -> Any:
    request.media_refs.CopyFrom(vpb.MediaRefs(items=[vpb.MediaRef(modality=modality, url=u) for u in urls]))
    return request


async def refused(call: Any) -> str:
    """The details of a Generate refused with INVALID_ARGUMENT."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return caught.value.details() or ""


async def test_vllm_vision_info(vstub: Any) -> None:
    info = await vstub.GetModelInfo(vpb.GetModelInfoRequest())
    assert info.supports_vision
    server = await vstub.GetServerInfo(vpb.GetServerInfoRequest())
    assert (
        server.mm_processor,
        server.mm_media_ref_schemes,
        server.mm_item_limits,
        server.mm_encoder_budget,
    ) == ("inprocess", "data", "image=4", 1024)
    async with (
        FakeProvider("vllm", models=[MODEL]) as text_only,
        grpc.aio.insecure_channel(text_only.target) as channel,
    ):
        stub = vpb_grpc.VllmEngineStub(channel)
        assert not (await stub.GetModelInfo(vpb.GetModelInfoRequest())).supports_vision
        server = await stub.GetServerInfo(vpb.GetServerInfoRequest())
        assert (
            server.mm_processor,
            server.mm_media_ref_schemes,
            server.mm_processor_source,
            server.mm_item_limits,
            server.mm_encoder_budget,
        ) == ("", "", "", "", 0)
        details = await refused(stub.Generate(with_media(vreq(chat_ids(PARTS)), data_url(IMAGE))))
        assert details == f"{MODEL} is not a multimodal model"
        assert text_only.stats["rejected"] == 1


async def test_vllm_generate_with_media_refs(vision_vllm: FakeProvider, vstub: Any) -> None:
    m = model()
    ids = chat_ids(PARTS)
    url = data_url(IMAGE)
    prompt = len(ids) - 1 + 12
    chunks, (complete,) = await collect(vstub.Generate(with_media(vreq(ids), url)))
    streamed = [t for c in chunks for t in c.token_ids]
    assert m.decode(streamed) == make_reply(SEEN).text and "a 100x60 PNG image" in m.decode(streamed)
    assert {c.prompt_tokens for c in chunks} == {complete.prompt_tokens} == {prompt}
    assert complete.cached_tokens == 0
    # Unary: the same answer; the prefix cache works on the expanded prompt.
    _, (unary,) = await collect(vstub.Generate(with_media(vreq(ids, stream=False, rid="r2"), url)))
    assert list(unary.output_ids) == streamed and unary.prompt_tokens == prompt
    assert unary.cached_tokens == (prompt - 1) // 16 * 16 > 0
    sent = vision_vllm.received[-1]
    assert [(i.modality, i.url) for i in sent.media_refs.items] == [(common_pb2.IMAGE, url)]
    # A text request to the vision engine is answered as before.
    chunks, _ = await collect(vstub.Generate(vreq(chat_ids(HELLO), rid="r3")))
    assert m.decode([t for c in chunks for t in c.token_ids]) == make_reply("hello there wörld 😀").text


async def test_vllm_refuses_what_it_cannot_see(vision_vllm: FakeProvider, vstub: Any) -> None:
    ids = chat_ids(PARTS)
    url = data_url(IMAGE)
    text_input = vpb.GenerateRequest(request_id="t", text=model().render(PARTS))
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]
    preprocessed = vreq(ids)
    preprocessed.mm_inputs.SetInParent()
    cases = [
        (with_media(text_input, url), "media_refs requires tokenized input"),
        (with_media(vreq(ids), url, modality=common_pb2.VIDEO), "modality VIDEO is not supported"),
        (with_media(vreq(ids), url, modality=common_pb2.AUDIO), "modality AUDIO is not supported"),
        (with_media(vreq(ids), url, modality=0), "modality MODALITY_UNSPECIFIED"),
        (with_media(vreq(chat_ids(two * 3)), *[url] * 5), "At most 4 image(s)"),
        (with_media(vreq(ids), "https://example.com/a.png"), "the allowed schemes are data"),
        (with_media(vreq(ids), "data:image/png;base64,!!"), "not valid base64"),
        (with_media(vreq(ids), data_url(b"plain text")), "cannot identify image file"),
        (with_media(vreq(ids), url, url), "1 image placeholder(s) (<|image_pad|>) but the request has 2"),
        (with_media(vreq(chat_ids(two)), url), "2 image placeholder(s)"),
        (with_media(vreq(ids), data_url(gif(1000, 1000))), "exceeds the encoder budget of 1024 tokens"),
        (preprocessed, "preprocessed multimodal tensors"),
    ]
    for request, words in cases:
        assert words in await refused(vstub.Generate(request))
    assert vision_vllm.stats["rejected"] == len(cases) and vision_vllm.stats["completed"] == 0


# --------------------------------------------------------------------------------- TensorRT-LLM and SGLang


def trt_request(ids: list[int], *images: bytes, streaming: bool = False) -> Any:
    request = tpb.GenerateRequest(
        request_id="t-1",
        tokenized=tpb.TokenizedInput(input_token_ids=ids),
        sampling_config=tpb.SamplingConfig(beam_width=1, num_return_sequences=1, temperature=0.0),
        max_tokens=200,
        streaming=streaming,
    )
    if images:
        request.multimodal_input.CopyFrom(tpb.MultimodalInput(image_data=list(images)))
    return request


async def test_trtllm_generate_with_image_data() -> None:
    m = model()
    ids = chat_ids(PARTS)
    async with (
        FakeProvider("trtllm", models=[MODEL], vision=True) as fake,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        stub = tpb_grpc.TrtllmServiceStub(channel)
        out = [r async for r in stub.Generate(trt_request(ids, IMAGE, streaming=True))]
        complete = out[-1].complete
        assert m.decode(complete.output_token_ids) == make_reply(SEEN).text
        assert {r.chunk.prompt_tokens for r in out[:-1]} == {complete.prompt_tokens} == {len(ids) - 1 + 12}
        jpg = [{"role": "user", "content": [{"type": "text", "text": "And"}, {"type": "image"}]}]
        (r,) = [r async for r in stub.Generate(trt_request(chat_ids(jpg), jpeg(56, 56)))]
        assert m.decode(r.complete.output_token_ids) == make_reply("And a 56x56 JPEG image").text
        assert r.complete.prompt_tokens == len(chat_ids(jpg)) - 1 + 4
        for request, words in (
            (trt_request(ids, b"GIF8"), "cannot identify image file"),
            (trt_request(ids, IMAGE, IMAGE), "but the request has 2 image(s)"),
            (trt_request(ids, gif(1000, 1000)), "exceeds the encoder budget"),
        ):
            assert words in await refused(stub.Generate(request))
    async with (
        FakeProvider("trtllm", models=[MODEL]) as fake,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        details = await refused(tpb_grpc.TrtllmServiceStub(channel).Generate(trt_request(ids, IMAGE)))
        assert details == f"{MODEL} is not a multimodal model"


@pytest.mark.parametrize("vision", [False, True])
async def test_sglang_refuses_preprocessed_tensors(vision: bool) -> None:
    async with (
        FakeProvider("sglang", models=[MODEL], vision=vision) as fake,
        grpc.aio.insecure_channel(fake.target) as channel,
    ):
        stub = sgl_grpc.SglangSchedulerStub(channel)
        request = sgl.GenerateRequest(
            request_id="s", tokenized=sgl.TokenizedInput(input_ids=chat_ids(PARTS)), stream=True
        )
        request.mm_inputs.SetInParent()
        details = await refused(stub.Generate(request))
        assert details == "this engine takes preprocessed multimodal tensors, which the fake does not model"
        assert not (await stub.GetModelInfo(sgl.GetModelInfoRequest())).supports_vision


# -------------------------------------------------------------------------------------- vLLM's HTTP server


def image_chat(url: str, text: str = "What is this?") -> list[Any]:
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]


async def test_vllm_http_answers_as_the_engine(vision_vllm: FakeProvider, vstub: Any) -> None:
    m = model()
    url = data_url(IMAGE)
    async with FakeProvider("vllm-http", models=[MODEL], vision=True) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="unused", max_retries=0)
        reply = await client.chat.completions.create(model=MODEL, messages=image_chat(url), temperature=0)
        # The engine, given the prompt the template renders with HF parts and the image as media_refs.
        _, (complete,) = await collect(
            vstub.Generate(with_media(vreq(chat_ids(PARTS), stream=False, temperature=0.0), url))
        )
        assert reply.choices[0].message.content == m.decode(complete.output_ids) == make_reply(SEEN).text
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
            complete.prompt_tokens,
            complete.completion_tokens,
        )
        assert reply.usage.prompt_tokens == len(chat_ids(PARTS)) - 1 + 12
        # Streamed: the same text, the same usage.
        stream = await client.chat.completions.create(
            model=MODEL, messages=image_chat(url), stream=True, stream_options={"include_usage": True}
        )
        text, usage = [], None
        async for chunk in stream:
            usage = chunk.usage or usage
            text.extend(c.delta.content or "" for c in chunk.choices)
        assert "".join(text) == make_reply(SEEN).text and usage is not None
        assert usage.prompt_tokens == reply.usage.prompt_tokens
        # Every list content is passed as parts once a request has images; two images, in prompt order.
        messages = [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": " brief."}],
            },
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(gif(3, 5))}}]},
            {"role": "assistant", "content": "A GIF."},
            *image_chat(data_url(webp_vp8l(56, 28), "image/webp"), "And this?"),
        ]
        reply = await client.chat.completions.create(model=MODEL, messages=messages, temperature=0)
        assert reply.choices[0].message.content == make_reply("And this? a 56x28 WEBP image").text
        hf = [
            {
                "role": "system",
                "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": " brief."}],
            },
            {"role": "user", "content": [{"type": "image"}]},
            {"role": "assistant", "content": "A GIF."},
            {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
        ]
        assert reply.usage is not None and reply.usage.prompt_tokens == len(chat_ids(hf)) - 2 + 1 + 2
        assert m.render(hf).startswith("<|im_start|>system\nBe brief.<|im_end|>")
        # Without images, text parts are joined with newlines, as before.
        parts = [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}],
            }
        ]
        reply = await client.chat.completions.create(model=MODEL, messages=parts)
        assert reply.usage is not None
        assert reply.usage.prompt_tokens == len(chat_ids([{"role": "user", "content": "hello\nthere"}]))
        for messages, words in (
            (image_chat("https://example.com/cat.png"), "the allowed schemes are data"),
            (image_chat("data:image/png;base64,%%%"), "not valid base64"),
            (image_chat(data_url(b"GIF8")), "cannot identify image file"),
            (image_chat(data_url(gif(2000, 2000), "image/gif")), "exceeds the encoder budget"),
            ([image_chat(url)[0]] * 5, "At most 4 image(s)"),
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model=MODEL, messages=messages)
            body: Any = caught.value.body
            assert words in body["message"] and body["type"] == "BadRequestError" and body["code"] == 400
        await client.close()
    async with FakeProvider("vllm-http", models=[MODEL]) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=image_chat(url))
        body = caught.value.body
        assert body["message"] == f"{MODEL} is not a multimodal model"
        await client.close()


# ------------------------------------------------------------------------------------------------ options


def test_vision_option() -> None:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    for kind in ("vllm", "trtllm", "vllm-http"):
        assert provider_from_args(parser.parse_args(["--kind", kind, "--vision"])).vision
        assert not provider_from_args(parser.parse_args(["--kind", kind])).vision
    with pytest.raises(ValueError, match="vision: kind 'openai'"):
        FakeProvider("openai", vision=True)
    with pytest.raises(ValueError, match="vision"):
        provider_from_args(parser.parse_args(["--kind", "grpc", "--vision"]))
