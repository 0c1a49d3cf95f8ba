"""The ``trtllm`` provider type: TensorRT-LLM's ``trtllm.TrtllmService`` (``smg-grpc-proto``).

grpcio clients check the fake engine of kind ``trtllm`` (:mod:`llmgw_dev.fakes.engine`) RPC by RPC, as
TensorRT-LLM's own servicer answers; then the proxy with a ``trtllm`` provider answers as the ``vllm-http``
fake (vLLM's OpenAI server on the same model) does, unary and streamed; and the reference router SMG, which
finds the engine's protocol itself (it probes SGLang's, vLLM's, then TensorRT-LLM's HealthCheck: its
``--backend`` has no ``trtllm``), answers so too in front of the same fake.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest
from engine_routers import MODEL, SMG, answer, greedy_logprobs, leave_mid_stream, smg
from smg_grpc_proto.generated import common_pb2
from smg_grpc_proto.generated import trtllm_service_pb2 as tpb
from smg_grpc_proto.generated import trtllm_service_pb2_grpc as tpb_grpc
from test_engine_provider import (
    HELLO,
    REQUESTS,
    THINK,
    TOOLS,
    WEATHER,
    Start,
    engine_proxy,
)

from llmgw.providers import CLIENTS
from llmgw.providers._engine_protocol import PROTOCOLS, Sampling
from llmgw_common.providers import TYPES
from llmgw_dev.fakes import FakeProvider, make_reply
from llmgw_dev.fakes.model import FakeModel, load

GUIDE = tpb.GuidedDecodingParams
# The proxy's tests need the provider type (its settings, llmgw_common.providers.engine.TRTLLM) declared.
needs_type = pytest.mark.skipif("trtllm" not in TYPES, reason="the trtllm provider type is not declared yet")


def model() -> FakeModel:
    return load(MODEL, 20)


def chat_ids(messages: list[Any], **kwargs: Any) -> list[int]:
    return model().encode(model().render(messages, **kwargs))


def request(ids: list[int], *, streaming: bool = True, max_tokens: int = 200, **fields: Any) -> Any:
    sampling = fields.pop("sampling_config", tpb.SamplingConfig(beam_width=1, num_return_sequences=1))
    return tpb.GenerateRequest(
        request_id=fields.pop("request_id", "r-1"),
        tokenized=tpb.TokenizedInput(input_token_ids=ids),
        sampling_config=sampling,
        max_tokens=max_tokens,
        streaming=streaming,
        **fields,
    )


@pytest.fixture
async def trtllm() -> AsyncIterator[FakeProvider]:
    async with FakeProvider("trtllm", models=[MODEL]) as fake:
        yield fake


@contextlib.asynccontextmanager
async def stub(fake: FakeProvider) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(fake.target) as channel:
        yield tpb_grpc.TrtllmServiceStub(channel)


async def collect(s: Any, req: Any) -> list[Any]:
    return [r async for r in s.Generate(req)]


# ------------------------------------------------------------------------------------- the fake, by grpcio


async def test_generate_streams_deltas_then_every_id(trtllm: FakeProvider) -> None:
    ids = chat_ids(HELLO)
    text = make_reply("hello there wörld 😀").text
    async with stub(trtllm) as s:
        out = await collect(s, request(ids))
        chunks = [r.chunk for r in out if r.WhichOneof("response") == "chunk"]
        (complete,) = [r.complete for r in out if r.WhichOneof("response") == "complete"]
        assert out[-1].WhichOneof("response") == "complete" and {r.request_id for r in out} == {"r-1"}
        streamed = [t for c in chunks for t in c.token_ids]
        # The EOS ends the output ids (TensorRT-LLM keeps it); counts are cumulative; the Complete repeats all.
        assert streamed[-1] == model().eos_token_id
        assert model().decode(streamed) == text
        assert [c.completion_tokens for c in chunks] == list(range(1, len(chunks) + 1))
        assert list(complete.output_token_ids) == streamed
        assert (complete.finish_reason, complete.completion_tokens) == ("stop", len(streamed))
        assert complete.WhichOneof("matched_stop") is None and complete.prompt_tokens == len(ids)
        # Unary: only the Complete, the prompt now partly cached.
        (unary,) = await collect(s, request(ids, streaming=False))
        assert list(unary.complete.output_token_ids) == streamed
        assert unary.complete.cached_tokens == len(ids) // 16 * 16


async def test_stop_max_tokens_and_n(trtllm: FakeProvider) -> None:
    ids = chat_ids(HELLO)
    full = make_reply("hello there wörld 😀").text
    m = model()
    async with stub(trtllm) as s:
        # A stop string: its own tokens are cut from the ids (include_stop_token_in_output keeps them); one
        # that ended inside other tokens is reported, nothing cut.
        (r,) = await collect(s, request(ids, streaming=False, stop=[" reply"]))
        assert (r.complete.finish_reason, r.complete.matched_stop_str) == ("stop", " reply")
        assert m.decode(r.complete.output_token_ids) == full[: full.index(" reply")]
        (r,) = await collect(
            s, request(ids, streaming=False, stop=[" reply"], include_stop_token_in_output=True)
        )
        assert m.decode(r.complete.output_token_ids) == full[: full.index(" reply") + len(" reply")]
        (r,) = await collect(s, request(ids, streaming=False, stop=["eply"]))
        assert r.complete.matched_stop_str == "eply"
        assert m.decode(r.complete.output_token_ids) == full[: full.index("eply") + len("eply")]
        # A stop token: matched_token_id, cut too; streamed, the cut token is never sent.
        stop_id = m.encode(full)[3]
        out = await collect(s, request(ids, stop_token_ids=[stop_id]))
        complete = out[-1].complete
        assert complete.matched_token_id == stop_id and stop_id not in complete.output_token_ids
        assert [t for r in out[:-1] for t in r.chunk.token_ids] == list(complete.output_token_ids)
        # max_tokens: "length".
        (r,) = await collect(s, request(ids, streaming=False, max_tokens=5))
        assert (r.complete.finish_reason, len(r.complete.output_token_ids)) == ("length", 5)
        # n: num_return_sequences, the choices' chunks by sequence_index; every Complete after the last step.
        sampling = tpb.SamplingConfig(beam_width=1, num_return_sequences=2, temperature=1.0)
        out = await collect(s, request(ids, sampling_config=sampling))
        kinds = [r.WhichOneof("response") for r in out]
        assert kinds[-2:] == ["complete", "complete"] and "complete" not in kinds[:-2]
        texts = {}
        for i in (0, 1):
            streamed = [
                t
                for r in out
                if r.HasField("chunk") and r.chunk.sequence_index == i
                for t in r.chunk.token_ids
            ]
            (complete,) = [
                r.complete for r in out if r.HasField("complete") and r.complete.sequence_index == i
            ]
            assert list(complete.output_token_ids) == streamed
            texts[i] = m.decode(streamed)
        assert texts[0] == full and texts[1] != full
        # Invalid requests: INVALID_ARGUMENT, as TensorRT-LLM's ValueErrors are.
        for bad in (
            request(ids, max_tokens=0),
            request(chat_ids([{"role": "user", "content": "word " * 9000}])),
            request(ids, sampling_config=tpb.SamplingConfig(beam_width=2)),
            request(ids, embedding_bias=[0.5]),
            tpb.GenerateRequest(request_id="x", max_tokens=3),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(s, bad)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_logprobs_and_guided_decoding(trtllm: FakeProvider) -> None:
    ids = chat_ids(HELLO)
    async with stub(trtllm) as s:
        out = await collect(s, request(ids, max_tokens=4, output_config=tpb.OutputConfig(logprobs=2)))
        chunks = [r.chunk for r in out[:-1]]
        for c in chunks:
            (entry,) = c.logprobs
            assert entry.token_id == c.token_ids[0] and entry.logprob < 0
            assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token_id == entry.token_id
        complete = out[-1].complete
        assert [e.token_id for e in complete.logprobs] == list(complete.output_token_ids)
        assert [e.logprob for e in complete.logprobs] == [c.logprobs[0].logprob for c in chunks]
        # None asked, none sent.
        out = await collect(s, request(ids, max_tokens=4))
        assert not any(len(r.chunk.logprobs) for r in out[:-1]) and not len(out[-1].complete.logprobs)
        # A JSON schema and json_object shape the answer; the other guides are not followed.
        schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
        for guide, check in (
            (GUIDE(guide_type=GUIDE.GUIDE_TYPE_JSON_SCHEMA, guide=schema), lambda v: isinstance(v["a"], int)),
            (GUIDE(guide_type=GUIDE.GUIDE_TYPE_JSON, guide="{}"), lambda v: "reply" in v),
        ):
            (r,) = await collect(s, request(ids, streaming=False, guided_decoding=guide))
            assert check(json.loads(model().decode(r.complete.output_token_ids)))


async def test_abort_health_model_info_tokenizer_and_embed(trtllm: FakeProvider) -> None:
    ids = chat_ids(HELLO)
    trtllm.faults.token_delay_ms = 50
    async with stub(trtllm) as s:
        call = s.Generate(request(ids, request_id="slow"))
        seen = []
        async for r in call:
            seen.append(r)
            if len(seen) == 2:
                answer_ = await s.Abort(tpb.AbortRequest(request_id="slow"))
                assert answer_.success and "aborted" in answer_.message
        # No empty chunk: a Complete with the ids so far, "cancelled".
        assert [r.WhichOneof("response") for r in seen] == ["chunk", "chunk", "complete"]
        complete = seen[-1].complete
        assert complete.finish_reason == "cancelled"
        assert list(complete.output_token_ids) == [t for r in seen[:2] for t in r.chunk.token_ids]
        assert trtllm.stats["cancelled"] == 1
        missing = await s.Abort(tpb.AbortRequest(request_id="nope"))
        assert not missing.success and "not found" in missing.message
        trtllm.faults.token_delay_ms = 0
        assert (await s.HealthCheck(tpb.HealthCheckRequest())).status == "OK"
        info = await s.GetModelInfo(tpb.GetModelInfoRequest())
        m = model()
        assert (info.model_id, info.max_seq_len, info.max_input_len, info.vocab_size) == (
            MODEL,
            m.max_context_length,
            m.max_context_length - 1,
            m.vocab_size,
        )
        server = await s.GetServerInfo(tpb.GetServerInfoRequest())
        assert server.backend == "tensorrt-llm" and server.world_size == 1
        chunks = [c async for c in s.GetTokenizer(common_pb2.GetTokenizerRequest())]
        data = b"".join(c.data for c in chunks)
        assert chunks[-1].sha256 == hashlib.sha256(data).hexdigest()
        assert "tokenizer.json" in zipfile.ZipFile(io.BytesIO(data)).namelist()
        # TensorRT-LLM's servicer does not embed, nor stream KV events here.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.Embed(tpb.EmbedRequest(request_id="e", tokenized=tpb.TokenizedInput(input_token_ids=ids)))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect_kv(s)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def collect_kv(s: Any) -> list[Any]:
    return [b async for b in s.SubscribeKvEvents(common_pb2.SubscribeKvEventsRequest())]


# --------------------------------------------------------------------------------------------- the adapter


def test_adapter_maps_sampling_to_trtllm() -> None:
    assert CLIENTS["trtllm"] is CLIENTS["vllm"]
    protocol = PROTOCOLS["trtllm"]
    assert protocol.path("Generate") == "/trtllm.TrtllmService/Generate"
    s = Sampling(
        temperature=0.5,
        top_p=0.9,
        top_k=7,
        min_p=0.1,
        presence_penalty=0.2,
        frequency_penalty=0.3,
        repetition_penalty=1.1,
        max_tokens=30,
        min_tokens=2,
        stop=["x"],
        stop_token_ids=[5],
        ignore_eos=True,
        include_stop_str_in_output=True,
        n=3,
        seed=-1,
        logprobs=0,
        constraint=("choice", ["a.b", "c"]),
    )
    r = tpb.GenerateRequest.FromString(protocol.generate("id", [1, 2], "", s))
    c = r.sampling_config
    assert (r.request_id, list(r.tokenized.input_token_ids), r.max_tokens, r.streaming) == (
        "id",
        [1, 2],
        30,
        True,
    )
    assert (c.num_return_sequences, c.beam_width, c.top_k, c.min_tokens, c.seed) == (3, 1, 7, 2, 2**64 - 1)
    assert c.temperature == pytest.approx(0.5) and c.min_p == pytest.approx(0.1)
    assert (list(r.stop), list(r.stop_token_ids), r.ignore_eos, r.include_stop_token_in_output) == (
        ["x"],
        [5],
        True,
        True,
    )
    assert r.output_config.logprobs == 1 and r.output_config.exclude_input_from_output
    assert (r.guided_decoding.guide_type, r.guided_decoding.guide) == (GUIDE.GUIDE_TYPE_REGEX, r"(a\.b|c)")
    # Unset: no temperature (the engine's default), top_k off, no logprobs, no guide.
    r = tpb.GenerateRequest.FromString(protocol.generate("id", [1], "", Sampling(max_tokens=3)))
    assert not r.sampling_config.HasField("temperature") and not r.sampling_config.HasField("top_k")
    assert not r.output_config.HasField("logprobs") and not r.HasField("guided_decoding")


# ------------------------------------------------------------------------------------------ the proxy


@needs_type
async def test_proxy_answers_as_vllm_http_does(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, "trtllm") as (engine, rest, client, _):
        direct = openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)
        for req in REQUESTS:
            for stream in (False, True):
                through = await answer(client, stream, **req)
                expected = await answer(direct, stream, **req)
                assert through == expected, (stream, req)
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert sent.request_id.startswith("chatcmpl-") and sent.streaming
        assert sent.sampling_config.num_return_sequences == 2
        assert model().decode(
            list(sent.tokenized.input_token_ids), skip_special_tokens=False
        ) == model().render(HELLO)
        # Tool calls (hermes), reasoning (qwen3), usage.
        tool = await answer(client, True, messages=WEATHER, tools=TOOLS)
        assert tool["choices"][0]["tools"] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
        assert tool["choices"][0]["finish"] == "tool_calls"
        thought = await answer(client, False, messages=HELLO, extra_body=THINK)
        assert thought["choices"][0]["reasoning"].startswith("The user wrote: hello there")
        assert thought["choices"][0]["content"].strip() == make_reply("hello there wörld 😀").text
        # Logprobs: the same tokens and values as vLLM's server.
        values = [await greedy_logprobs(c, HELLO) for c in (client, direct)]
        assert values[0] == values[1] and len(values[0]) == 4
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO, logprobs=True, max_tokens=3)
        assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
        assert [len(e.top_logprobs) for e in reply.choices[0].logprobs.content] == [0, 0, 0]
        await direct.close()


@needs_type
async def test_proxy_refusals_bias_abort_and_embeddings(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, "trtllm") as (engine, _, client, _):
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "word " * 9000}]
            )
        # max_tokens is required by TensorRT-LLM: what is left of the context when the request sets none.
        reply = await client.chat.completions.create(model=MODEL, messages=HELLO)
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert sent.max_tokens == model().max_context_length - len(chat_ids(HELLO))
        assert reply.choices[0].finish_reason == "stop"
        # logit_bias travels as an embedding_bias of the vocabulary's size.
        await client.chat.completions.create(model=MODEL, messages=HELLO, logit_bias={"7": 5})
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert len(sent.embedding_bias) == model().vocab_size and sent.embedding_bias[7] == 5.0
        assert sum(sent.embedding_bias) == 5.0
        # A client that goes away: Abort by request id, the engine ends it "cancelled".
        engine.faults.token_delay_ms = 100
        events = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
        aborts = await leave_mid_stream(engine, events)
        assert aborts and aborts[-1].request_id.startswith("chatcmpl-")
        engine.faults.token_delay_ms = 0
        # TensorRT-LLM does not embed: its UNIMPLEMENTED reaches the client as an error, not a vector.
        with pytest.raises(openai.APIStatusError):
            await client.embeddings.create(model=MODEL, input="hello")


# ------------------------------------------------------------------------------------------ through SMG


@pytest.mark.slow
async def test_smg_in_front_of_the_fake_answers_as_vllm_http() -> None:
    assert SMG.exists()
    async with (
        FakeProvider("trtllm", models=[MODEL]) as engine,
        FakeProvider("vllm-http", models=[MODEL]) as rest,
        smg(engine) as router,
    ):
        direct = openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)
        for req in REQUESTS:
            if "seed" in req:
                continue  # SMG sends TensorRT-LLM no seed
            for stream in (False, True):
                through = await answer(router, stream, **req)
                expected = await answer(direct, stream, **req)
                if isinstance(req.get("tool_choice"), dict):
                    # A named function: the same call; vLLM reports the engine's "stop", SMG "tool_calls".
                    assert (through["choices"][0]["finish"], expected["choices"][0]["finish"]) == (
                        "tool_calls",
                        "stop",
                    )
                    through["choices"][0]["finish"] = "stop"
                assert through == expected, (stream, req)
        sent = [r for r in engine.received if type(r).__name__ == "GenerateRequest"][-1]
        assert sent.streaming and sent.max_tokens > 0
        await direct.close()
