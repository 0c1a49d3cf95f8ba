"""The fake inference engines (kinds ``vllm``, ``sglang``) and vLLM's HTTP server (kind ``vllm-http``).

grpcio clients with smg-grpc-proto's stubs check each RPC of the engines; then the reference router SMG
(``smg launch``, the ``smg`` package) runs against each engine kind and the official ``openai`` SDK checks that
what comes out of the router (text, tool calls, reasoning, finish reasons, usage) is what the ``vllm-http`` fake
answers to the same requests.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from engine_routers import MODEL, answer, free_port, leave_mid_stream, smg
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import sglang_scheduler_pb2 as sgl
from smg_grpc_proto.generated import sglang_scheduler_pb2_grpc as sgl_grpc
from smg_grpc_proto.generated import vllm_engine_pb2 as vpb
from smg_grpc_proto.generated import vllm_engine_pb2_grpc as vpb_grpc
from tokenizers import Tokenizer

from llmgw_dev.fakes import FakeProvider, make_reply
from llmgw_dev.fakes.engine import tokenizer_chunks
from llmgw_dev.fakes.model import FakeModel, Sampling, load

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    }
]


def model() -> FakeModel:
    return load(MODEL, 20)


def chat_ids(messages: list[Any], **kwargs: Any) -> list[int]:
    return model().encode(model().render(messages, **kwargs))


@pytest.fixture
async def vllm() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("vllm", models=[MODEL]) as fake:
        yield fake


@pytest.fixture
async def vstub(vllm: FakeProvider) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(vllm.target) as channel:
        yield vpb_grpc.VllmEngineStub(channel)


@pytest.fixture
async def sglang() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("sglang", models=[MODEL]) as fake:
        yield fake


@pytest.fixture
async def sstub(sglang: FakeProvider) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(sglang.target) as channel:
        yield sgl_grpc.SglangSchedulerStub(channel)


def vreq(ids: list[int], stream: bool = True, rid: str = "req-1", **sampling: Any) -> vpb.GenerateRequest:
    return vpb.GenerateRequest(
        request_id=rid,
        tokenized=vpb.TokenizedInput(original_text="", input_ids=ids),
        sampling_params=vpb.SamplingParams(**sampling),
        stream=stream,
    )


async def collect(call: Any) -> tuple[list[Any], list[Any]]:
    """(chunks, completes) of a Generate stream, in order."""
    chunks, completes = [], []
    async for response in call:
        kind = response.WhichOneof("response")
        (chunks if kind == "chunk" else completes).append(getattr(response, kind))
    return chunks, completes


HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello there wörld 😀"}]


# ------------------------------------------------------------------------------------------------ the model


def test_model_builds_fast_and_the_same_every_time() -> None:
    started = time.perf_counter()
    first = FakeModel()
    assert time.perf_counter() - started < 1.0
    second = FakeModel()
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    assert first.tokenizer_zip() == second.tokenizer_zip()
    for text in (
        "plain ascii",
        "wörld 😀 今日は Привет \u200b\x00 é\u0301 e\u0301 \ufb01 \U0010ffff",
        '{"a": [1, 2]}\n\t',
    ):
        assert first.decode(first.encode(text)) == text
    # Specials are single tokens and skipped; the tool and think markers are ordinary added tokens.
    ids = first.encode("<|im_start|>user\nhi<|im_end|><tool_call></tool_call><think></think>")
    assert ids[0] == first.im_start_id and first.eos_token_id in ids
    assert first.decode(ids) == "user\nhi<tool_call></tool_call><think></think>"
    assert len(first.encode("<tool_call>")) == 1


def test_model_files_saved(tmp_path: Path) -> None:
    model().save(tmp_path / "m")
    tokenizer = Tokenizer.from_file(str(tmp_path / "m" / "tokenizer.json"))
    assert tokenizer.encode("hello <|im_end|>", add_special_tokens=False).ids == model().encode(
        "hello <|im_end|>"
    )
    assert json.loads((tmp_path / "m" / "config.json").read_text())["eos_token_id"] == model().eos_token_id


def test_incremental_decoding_matches_the_tokenizer() -> None:
    import codecs
    import random

    m = model()
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.randrange(m.vocab_size) for _ in range(rng.randrange(1, 12))]
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = "".join(decoder.decode(m.token_bytes[t]) for t in ids if t not in m.special_ids)
        text += decoder.decode(b"", final=True)
        assert text == m.decode(ids)
    # Long outputs stay cheap: 4000 tokens with a stop string that never comes, streamed as deltas.
    started = time.perf_counter()
    (g,) = m.generate(chat_ids(HELLO), Sampling(ignore_eos=True, max_tokens=4000, stop=("never",)))
    assert len(g.token_ids) == 4000 and "".join(m.text_deltas(g)) == g.text
    assert time.perf_counter() - started < 2.0


def test_template_and_generation_triggers() -> None:
    m = model()
    plain = m.render(HELLO)
    assert plain.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    thinking = m.render(HELLO, enable_thinking=True)
    assert thinking.endswith("<|im_start|>assistant\n<think>\n")
    with_tools = m.render([{"role": "user", "content": "weather in Paris? get_weather"}], tools=TOOLS)
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in with_tools

    (out,) = m.generate(m.encode(plain), Sampling())
    assert out.text == make_reply("hello there wörld 😀").text
    assert (
        out.finish_reason == "stop" and out.token_ids[-1] == m.eos_token_id and out.matched_token_id is None
    )
    (out,) = m.generate(m.encode(thinking), Sampling())
    reasoning, _, answer = out.text.partition("\n</think>\n\n")
    assert (
        reasoning.startswith("The user wrote: hello there")
        and answer == make_reply("hello there wörld 😀").text
    )
    (out,) = m.generate(m.encode(with_tools), Sampling())
    assert (
        out.text
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    )
    # A tool result is answered, not called again.
    history = [
        {"role": "user", "content": "weather in Paris? get_weather"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "sunny"},
    ]
    (out,) = m.generate(m.encode(m.render(history, tools=TOOLS)), Sampling())
    assert out.text.startswith("This is a fake reply to: sunny")


# ------------------------------------------------------------------------------------------- vLLM over gRPC


async def test_vllm_info_rpcs(vllm: FakeProvider, vstub: Any) -> None:
    m = model()
    health = await vstub.HealthCheck(vpb.HealthCheckRequest())
    assert health.healthy
    info = await vstub.GetModelInfo(vpb.GetModelInfoRequest())
    assert info.served_model_name == MODEL and info.is_generation and info.model_type == "qwen3"
    assert info.max_context_length == m.max_context_length and info.vocab_size == m.vocab_size
    assert list(info.eos_token_ids) == [m.eos_token_id]
    assert not os.path.exists(info.tokenizer_path)
    assert json.loads(info.default_sampling_params_json)["temperature"] == 0.7
    server = await vstub.GetServerInfo(vpb.GetServerInfoRequest())
    assert server.server_type == "vllm-grpc" and server.active_requests == 0
    loads = await vstub.GetLoads(vpb.GetLoadsRequest())
    assert loads.dp_rank_count == 1 and loads.loads[0].num_running_reqs == 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in vstub.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest()):
            pass
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (await vstub.FlushCache(common_pb2.FlushCacheRequest())).success
    ids = m.encode("embed me")
    embedded = await vstub.Embed(
        vpb.EmbedRequest(request_id="e", tokenized=vpb.TokenizedInput(input_ids=ids))
    )
    assert embedded.embedding_dim == len(embedded.embedding) > 0 and embedded.prompt_tokens == len(ids)
    assert abs(sum(v * v for v in embedded.embedding) - 1.0) < 1e-3


async def test_vllm_get_tokenizer_archive(vstub: Any) -> None:
    chunks = [c async for c in vstub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    assert all(len(c.data) <= 64 * 1024 for c in chunks)
    assert [bool(c.sha256) for c in chunks] == [False] * (len(chunks) - 1) + [True]
    data = b"".join(c.data for c in chunks)
    assert hashlib.sha256(data).hexdigest() == chunks[-1].sha256
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        assert len(names) <= 50
        assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= set(
            names
        )
        tokenizer = Tokenizer.from_str(archive.read("tokenizer.json").decode())
        config = json.loads(archive.read("tokenizer_config.json"))
        generation = json.loads(archive.read("generation_config.json"))
    text = model().render(HELLO)
    assert tokenizer.encode(text, add_special_tokens=False).ids == model().encode(text)
    assert "enable_thinking" in config["chat_template"] and config["eos_token"] == "<|im_end|>"
    assert generation["eos_token_id"] == [model().eos_token_id, model().endoftext_id]
    # Bigger archives are split in 64 KiB chunks, the digest on the last only.
    big = tokenizer_chunks(b"x" * (150 * 1024))
    assert [len(c.data) for c in big] == [65536, 65536, 150 * 1024 - 131072]
    assert [c.sha256 for c in big[:-1]] == ["", ""] and big[-1].sha256 == hashlib.sha256(
        b"x" * 153600
    ).hexdigest()


async def test_vllm_generate_stream_and_unary(vllm: FakeProvider, vstub: Any) -> None:
    m = model()
    ids = chat_ids(HELLO)
    chunks, completes = await collect(vstub.Generate(vreq(ids)))
    out = [t for c in chunks for t in c.token_ids]
    assert all(len(c.token_ids) == 1 and c.completion_tokens == 1 and c.index == 0 for c in chunks)
    assert all(c.prompt_tokens == len(ids) for c in chunks)
    (complete,) = completes
    assert complete.finish_reason == "stop" and complete.WhichOneof("matched_stop") is None
    assert list(complete.output_ids) == [out[-1]] == [m.eos_token_id]  # the last step's tokens only
    assert m.decode(out) == make_reply("hello there wörld 😀").text
    assert vllm.received[-1].request_id == "req-1"
    # Unary: only the Complete, with every output id; the repeated prompt is found in the prefix cache.
    chunks, completes = await collect(vstub.Generate(vreq(ids, stream=False)))
    assert chunks == [] and list(completes[0].output_ids) == out
    assert completes[0].completion_tokens == len(out) and completes[0].prompt_tokens == len(ids)
    assert completes[0].cached_tokens == (len(ids) - 1) // 16 * 16 > 0
    # Text input is tokenized by the engine.
    text = vpb.GenerateRequest(
        request_id="t", text=m.render(HELLO), sampling_params=vpb.SamplingParams(max_tokens=3), stream=False
    )
    _, (complete,) = await collect(vstub.Generate(text))
    assert list(complete.output_ids) == out[:3] and complete.finish_reason == "length"


async def test_vllm_n_interleaves_and_seed_decides(vstub: Any) -> None:
    m = model()
    ids = chat_ids(HELLO)
    chunks, completes = await collect(vstub.Generate(vreq(ids, n=3, temperature=1.0, seed=7)))
    assert [c.index for c in chunks[:6]] == [0, 1, 2, 0, 1, 2]
    assert sorted(c.index for c in completes) == [0, 1, 2]
    texts = [m.decode([t for c in chunks if c.index == i for t in c.token_ids]) for i in range(3)]
    assert len(set(texts)) == 3
    again, _ = await collect(vstub.Generate(vreq(ids, n=3, temperature=1.0, seed=7)))
    assert [list(c.token_ids) for c in again] == [list(c.token_ids) for c in chunks]
    other, _ = await collect(vstub.Generate(vreq(ids, n=1, temperature=1.0, seed=8)))
    assert m.decode([t for c in other for t in c.token_ids]) != texts[0]
    greedy, _ = await collect(vstub.Generate(vreq(ids, n=2, temperature=0.0)))
    assert [t for c in greedy if c.index == 0 for t in c.token_ids] == [
        t for c in greedy if c.index == 1 for t in c.token_ids
    ]


async def test_vllm_stops_lengths_and_logprobs(vstub: Any) -> None:
    m = model()
    ids = chat_ids(HELLO)
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, stop=["fake"])))
    assert complete.finish_reason == "stop" and complete.matched_stop_str == "fake"
    assert m.decode(complete.output_ids).endswith("fake")  # the engine keeps the token; routers cut the text
    reply = m.encode(make_reply("hello there wörld 😀").text)
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, stop_token_ids=[reply[3]])))
    assert complete.matched_token_id == reply[3] and list(complete.output_ids) == reply[:4]
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, max_tokens=5)))
    assert complete.finish_reason == "length" and list(complete.output_ids) == reply[:5]
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, min_tokens=len(reply) + 10)))
    assert complete.finish_reason == "stop" and len(complete.output_ids) == len(reply) + 11
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, ignore_eos=True, max_tokens=90)))
    assert complete.finish_reason == "length" and len(complete.output_ids) == 90
    assert m.eos_token_id not in complete.output_ids
    chunks, (complete,) = await collect(vstub.Generate(vreq(ids, logprobs=3, max_tokens=4)))
    for chunk in chunks:
        lp = chunk.output_logprobs
        assert list(lp.token_ids) == list(chunk.token_ids) and all(v < 0 for v in lp.token_logprobs)
        (top,) = lp.top_logprobs
        assert (
            len(top.values) == 3
            and top.token_ids[0] == chunk.token_ids[0]
            and list(top.values) == sorted(top.values, reverse=True)
        )


async def test_vllm_structured_outputs(vstub: Any) -> None:
    m = model()
    ids = chat_ids(HELLO)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, json_schema=json.dumps(schema))))
    assert json.loads(m.decode(complete.output_ids)) == {"n": 42, "s": "😀"}
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, json_object=True)))
    assert json.loads(m.decode(complete.output_ids)) == {"reply": make_reply("hello there wörld 😀").text}
    choice = vpb.ChoiceConstraint(choices=["yes", "no"])
    _, (complete,) = await collect(vstub.Generate(vreq(ids, stream=False, choice=choice)))
    assert m.decode(complete.output_ids) == "yes"


async def test_vllm_refuses_what_vllm_refuses(vllm: FakeProvider, vstub: Any) -> None:
    too_long = [model().encode("hello")[0]] * model().max_context_length
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(vstub.Generate(vreq(too_long)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum model length" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(vstub.Generate(vreq(chat_ids(HELLO), max_tokens=0)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert vllm.stats["rejected"] == 2


async def test_vllm_abort_finishes_running_requests(vllm: FakeProvider, vstub: Any) -> None:
    vllm.faults.token_delay_ms = 20
    call = vstub.Generate(vreq(chat_ids(HELLO), rid="to-abort", n=2, temperature=1.0))
    seen: list[Any] = []
    async for response in call:
        seen.append(response)
        if len(seen) == 4:
            server = await vstub.GetServerInfo(vpb.GetServerInfoRequest())
            assert server.active_requests == 1
            await vstub.Abort(vpb.AbortRequest(request_ids=["to-abort"]))
    completes = [r.complete for r in seen if r.WhichOneof("response") == "complete"]
    assert sorted((c.index, c.finish_reason) for c in completes) == [(0, "abort"), (1, "abort")]
    assert len(seen) < 20


async def test_engine_control_api_and_command_line(tmp_path: Path) -> None:
    async with FakeProvider("sglang", models=[MODEL], control_port=0) as fake:
        assert fake.control_url is not None
        async with aiohttp.ClientSession() as session:
            async with session.put(f"{fake.control_url}/_fake/faults", json={"fail_next": 1}) as response:
                assert response.status == 200 and fake.faults.fail_next == 1
            async with grpc.aio.insecure_channel(fake.target) as channel:
                stub = sgl_grpc.SglangSchedulerStub(channel)
                request = sgl.GenerateRequest(
                    request_id="x", tokenized=sgl.TokenizedInput(input_ids=chat_ids(HELLO)), stream=True
                )
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await collect(stub.Generate(request))
                assert caught.value.code() == grpc.StatusCode.INTERNAL
            async with session.get(f"{fake.control_url}/_fake/stats") as response:
                assert (await response.json())["injected_errors"] == 1
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("llmgw")),
        "fake-provider",
        "--kind",
        "vllm",
        "--listen",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert f"kind=vllm listening on 127.0.0.1:{port}" in line.decode()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = await vpb_grpc.VllmEngineStub(channel).GetModelInfo(vpb.GetModelInfoRequest())
            assert info.served_model_name == "demo-model"
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 10)


async def test_vllm_faults(vllm: FakeProvider, vstub: Any) -> None:
    ids = chat_ids(HELLO)
    vllm.faults.update({"fail_next": 1, "error_status": 503})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(vstub.Generate(vreq(ids)))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    vllm.faults.stream_error_after_tokens = 3
    got: list[Any] = []
    with pytest.raises(grpc.aio.AioRpcError):
        async for response in vstub.Generate(vreq(ids)):
            got.append(response)
    assert len(got) == 3
    vllm.faults.stream_error_after_tokens = -1
    await collect(vstub.Generate(vreq(ids)))
    assert vllm.stats["injected_errors"] == 2 and vllm.stats["completed"] == 1


# ----------------------------------------------------------------------------------------- SGLang over gRPC


async def test_sglang_generate_and_info(sstub: Any) -> None:
    m = model()
    ids = chat_ids(HELLO)
    server = await sstub.GetServerInfo(sgl.GetServerInfoRequest())
    assert server.server_type == "grpc" and server.server_args["served_model_name"] == MODEL
    info = await sstub.GetModelInfo(sgl.GetModelInfoRequest())
    assert info.served_model_name == MODEL and list(info.eos_token_ids) == [m.eos_token_id]
    request = sgl.GenerateRequest(
        request_id="s1",
        tokenized=sgl.TokenizedInput(input_ids=ids),
        sampling_params=sgl.SamplingParams(temperature=0.0, max_new_tokens=100),
        stream=True,
    )
    chunks, (complete,) = await collect(sstub.Generate(request))
    assert [c.completion_tokens for c in chunks] == list(range(1, len(chunks) + 1))  # cumulative
    assert complete.completion_tokens == len(chunks) and list(complete.output_ids) == list(
        chunks[-1].token_ids
    )
    assert complete.matched_token_id == m.eos_token_id  # SGLang reports the EOS it matched
    assert m.decode([t for c in chunks for t in c.token_ids]) == make_reply("hello there wörld 😀").text
    request.stream = False
    request.sampling_params.max_new_tokens = 4
    _, (complete,) = await collect(sstub.Generate(request))
    assert complete.finish_reason == "length" and complete.completion_tokens == 4
    thinking = sgl.GenerateRequest(
        request_id="s2",
        tokenized=sgl.TokenizedInput(input_ids=chat_ids(HELLO, enable_thinking=True)),
        sampling_params=sgl.SamplingParams(temperature=0.0),
        stream=True,
        require_reasoning=True,
    )
    chunks, (complete,) = await collect(sstub.Generate(thinking))
    out = [t for c in chunks for t in c.token_ids]
    assert complete.reasoning_tokens == out.index(m.think_end_id) == chunks[-1].reasoning_tokens > 0
    aborted = await sstub.Abort(sgl.AbortRequest(request_id="nothing-running"))
    assert not aborted.success
    chunks = [c async for c in sstub.GetTokenizer(common_pb2.GetTokenizerRequest())]
    assert chunks[-1].sha256 == hashlib.sha256(b"".join(c.data for c in chunks)).hexdigest()


# -------------------------------------------------------------------------------------- vLLM's HTTP server


async def test_vllm_http_with_the_sdk() -> None:
    async with FakeProvider("vllm-http", models=[MODEL]) as fake:
        client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="unused", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
        assert reply.choices[0].message.content == make_reply("hello there wörld 😀").text
        assert reply.usage is not None and reply.usage.prompt_tokens == len(chat_ids(HELLO))
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, stream=True, stream_options={"include_usage": True}, max_tokens=6
        )
        parts, finish, usage = [], None, None
        async for chunk in stream:
            usage = chunk.usage or usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert finish == "length" and usage is not None and usage.completion_tokens == 6
        assert "".join(parts) == model().decode(model().encode(make_reply("hello there wörld 😀").text)[:6])
        completion = await client.completions.create(model=MODEL, prompt="hello there", max_tokens=50)
        assert completion.choices[0].text == make_reply("hello there").text
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]
            )
        fake.faults.fail_next = 1
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=MODEL, messages=HELLO)


# ----------------------------------------------------------------------------------------- through SMG


HISTORY: list[Any] = [
    {"role": "user", "content": "What is the weather in Paris? Use get_weather."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny and 21 degrees"},
]
REQUESTS: list[dict[str, Any]] = [
    {"messages": HELLO},
    {
        "messages": [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}],
        "tools": TOOLS,
    },
    {"messages": HISTORY, "tools": TOOLS},
    {"messages": HELLO, "extra_body": {"chat_template_kwargs": {"enable_thinking": True}}},
    {
        "messages": [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}],
        "tools": TOOLS,
        "extra_body": {"chat_template_kwargs": {"enable_thinking": True}},
    },
    {"messages": HELLO, "tools": TOOLS, "tool_choice": "required"},
    {"messages": HELLO, "response_format": {"type": "json_object"}},
    {
        "messages": HELLO,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "a",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        },
    },
    {"messages": HELLO, "max_tokens": 7},
    {"messages": HELLO, "stop": ["fake"]},
    {"messages": HELLO, "n": 2, "seed": 11, "temperature": 1.0},
    {"messages": HELLO, "n": 2, "temperature": 1.0},
]


async def cross_check(backend: str, kind: str) -> None:
    async with (
        FakeProvider(kind, models=[MODEL]) as engine,
        FakeProvider("vllm-http", models=[MODEL]) as rest,
        smg(engine, backend) as router,
    ):
        direct = openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)
        for request in REQUESTS:
            for stream in (False, True):
                if backend == "sglang" and "seed" in request:
                    continue  # SGLang's protocol carries no seed
                through = await answer(router, stream, **request)
                expected = await answer(direct, stream, **request)
                if backend == "sglang" and "stop" in request:
                    # SMG does not pass stop strings to SGLang: it cuts the text itself while the engine
                    # generates on, so only the usage differs.
                    assert through["usage"][1] > expected["usage"][1]
                    through["usage"] = expected["usage"]
                assert through == expected, (backend, stream, request)
        tool = await answer(router, False, **REQUESTS[1])
        assert tool["choices"][0]["tools"] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
        assert tool["choices"][0]["finish"] == "tool_calls"
        thought = await answer(router, True, **REQUESTS[3])
        assert thought["choices"][0]["reasoning"].startswith("The user wrote: hello there")
        assert thought["choices"][0]["content"].strip() == make_reply("hello there wörld 😀").text
        # What the router sent: the rendered prompt, tokenized, and the engine's id.
        sent = engine.received[-1]
        assert model().decode(sent.tokenized.input_ids, skip_special_tokens=False) == model().render(
            HELLO, enable_thinking=True
        )
        # A named function: the same call both ways; vLLM reports the engine's finish reason ("stop"), SMG
        # "tool_calls".
        named = {
            "messages": HELLO,
            "tools": TOOLS,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        }
        for stream in (False, True):
            through = await answer(router, stream, **named)
            expected = await answer(direct, stream, **named)
            assert through["choices"][0]["tools"] == expected["choices"][0]["tools"] != []
            assert (through["choices"][0]["finish"], expected["choices"][0]["finish"]) == (
                "tool_calls",
                "stop",
            )
        # Logprobs come from the model: the same values both ways.
        for client in (router, direct):
            reply = await client.chat.completions.create(
                model=MODEL, messages=HELLO, logprobs=True, top_logprobs=2, max_tokens=4, temperature=0.0
            )
            assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
            values = [
                (e.logprob, [t.logprob for t in e.top_logprobs]) for e in reply.choices[0].logprobs.content
            ]
            assert len(values) == 4 and all(v < 0 and len(top) == 2 for v, top in values)
            if client is router:
                first = values
        assert len(values) == len(first)
        for (value, top), (value1, top1) in zip(values, first, strict=True):  # float32 on the wire of one
            assert value == pytest.approx(value1, abs=1e-6) and top == pytest.approx(top1, abs=1e-6)
        # /v1/completions: a raw prompt, tokenized by the router.
        texts = []
        for client in (router, direct):
            completion = await client.completions.create(model=MODEL, prompt="hello there", max_tokens=30)
            stream = await client.completions.create(
                model=MODEL, prompt="hello there", max_tokens=30, stream=True
            )
            streamed = "".join([c.choices[0].text async for c in stream if c.choices])
            assert completion.usage is not None
            texts.append((completion.choices[0].text, streamed, completion.usage.completion_tokens))
        assert texts[0] == texts[1] == (make_reply("hello there").text[: len(texts[0][0])],) * 2 + (30,)
        # A client that goes away: the router aborts the request and the engine ends it with "abort".
        engine.faults.token_delay_ms = 100
        events = await router.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        aborts = await leave_mid_stream(engine, events)
        assert aborts and engine.received[-2].request_id in str(aborts[-1])
        # Too long a prompt, max_tokens 0: a 400 both ways; a max_tokens above the context is clamped.
        for client in (router, direct):
            with pytest.raises(openai.BadRequestError, match="maximum context length"):
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]
                )
            with pytest.raises(openai.BadRequestError):
                await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=0)
            reply = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
            assert reply.choices[0].finish_reason == "stop"
        # An engine's error reaches the client as the router's 500.
        engine.faults.update({"token_delay_ms": 0, "fail_next": 1, "error_status": 500})
        with pytest.raises(openai.InternalServerError, match="injected error"):
            await router.chat.completions.create(model=MODEL, messages=HELLO)
        await direct.close()


@pytest.mark.slow
async def test_smg_vllm_backend_matches_vllm_http() -> None:
    await cross_check("vllm", "vllm")


@pytest.mark.slow
async def test_smg_sglang_backend_matches_vllm_http() -> None:
    await cross_check("sglang", "sglang")
