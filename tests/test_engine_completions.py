"""OpenAI's legacy Completions API (``POST /v1/completions``) on the engine provider types: the official ``openai``
SDK's ``completions.create`` through an in-process proxy in front of a fake engine answers as the ``vllm-http``
fake (vLLM's OpenAI server on the same model) does: text, finish and stop reasons, usage, logprobs; lists of
prompts, token prompts, echo, the refusals, and an Abort when the client leaves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from engine_routers import MODEL, SMG, leave_mid_stream, smg
from test_engine_provider import Start, engine_proxy

from llmgw_dev.fakes import make_reply
from llmgw_dev.fakes.model import load

PROMPT = "hello there wörld 😀"
REQUESTS: list[dict[str, Any]] = [
    {"prompt": PROMPT},  # OpenAI's default max_tokens, 16: "length"
    {"prompt": PROMPT, "max_tokens": 200},
    {"prompt": PROMPT, "max_tokens": 200, "stop": ["fake"]},
    {
        "prompt": PROMPT,
        "max_tokens": 200,
        "stop": ["fake"],
        "extra_body": {"include_stop_str_in_output": True},
    },
    {"prompt": PROMPT, "max_tokens": 5},
    {"prompt": "tell me a story", "max_tokens": 200, "n": 2, "seed": 11, "temperature": 1.0},
    {"prompt": "tell me a story", "max_tokens": 200, "n": 3, "temperature": 1.0},
    {"prompt": load(MODEL, 20).encode("a prompt of token ids"), "max_tokens": 200},
    {"prompt": [PROMPT], "max_tokens": 200, "extra_body": {"min_tokens": 30, "top_k": 5}},
]


async def completion(client: openai.AsyncOpenAI, stream: bool, **request: Any) -> dict[str, Any]:
    """What a completion says, unary or streamed (with include_usage): per choice the text, finish and stop
    reasons; the usage (prompt, completion tokens)."""
    if not stream:
        reply = await client.completions.create(model=MODEL, **request)
        assert reply.object == "text_completion" and reply.usage is not None
        choices = {
            c.index: {"text": c.text, "finish": c.finish_reason, "stop": getattr(c, "stop_reason", None)}
            for c in reply.choices
        }
        return {"choices": choices, "usage": (reply.usage.prompt_tokens, reply.usage.completion_tokens)}
    events = await client.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True}, **request
    )
    acc: dict[int, dict[str, Any]] = {}
    usage = None
    async for chunk in events:
        assert chunk.object == "text_completion"
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for c in chunk.choices:
            state = acc.setdefault(c.index, {"text": "", "finish": None, "stop": None})
            assert state["finish"] is None, "a chunk after the choice's finish"
            state["text"] += c.text
            state["finish"] = c.finish_reason
            state["stop"] = getattr(c, "stop_reason", None)
    return {"choices": dict(sorted(acc.items())), "usage": usage}


def direct(rest: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=rest.base_url, api_key="unused", max_retries=0)


def generate_requests(engine: Any) -> list[Any]:
    return [r for r in engine.received if type(r).__name__ == "GenerateRequest"]


# ------------------------------------------------------------------------------------------ the same answers


@pytest.mark.parametrize("kind", ["vllm", "sglang", "trtllm"])
async def test_completions_answer_as_vllm_http_does(start_proxy: Start, kind: str) -> None:
    async with engine_proxy(start_proxy, kind) as (engine, rest, client, _):
        reference = direct(rest)
        for request in REQUESTS:
            for stream in (False, True):
                through = await completion(client, stream, **request)
                expected = await completion(reference, stream, **request)
                assert through == expected, (kind, stream, request)
        await reference.close()
        # The prompt reached the engine as the tokenizer writes it, under a cmpl- id.
        sent = generate_requests(engine)[-1]
        assert sent.request_id.startswith("cmpl-")
        ids = sent.tokenized.input_token_ids if kind == "trtllm" else sent.tokenized.input_ids
        assert list(ids) == load(MODEL, 20).encode(PROMPT)


async def test_a_list_of_prompts_is_a_set_of_choices_each(start_proxy: Start) -> None:
    """Choice ``prompt_index * n + i``, each prompt a Generate of its own, the usage summed."""
    model = load(MODEL, 20)
    prompts: list[Any] = ["first prompt here", model.encode("second prompt here"), "third one"]
    async with engine_proxy(start_proxy) as (engine, rest, client, _):
        reference = direct(rest)
        request = {"max_tokens": 200, "n": 2, "seed": 5, "temperature": 1.0}
        alone = [await completion(reference, False, prompt=p, **request) for p in prompts]
        before = len(generate_requests(engine))
        for stream in (False, True):
            together = await completion(client, stream, prompt=prompts, **request)
            assert together["choices"] == {
                p * 2 + i: alone[p]["choices"][i] for p in range(len(prompts)) for i in range(2)
            }
            assert together["usage"] == tuple(sum(a["usage"][k] for a in alone) for k in (0, 1))
        sent = generate_requests(engine)[before:]
        assert len(sent) == 6 and len({r.request_id for r in sent}) == 6
        await reference.close()


@pytest.mark.slow
@pytest.mark.skipif(not SMG.exists(), reason="needs SMG (smg in the virtualenv's bin)")
async def test_completions_answer_as_smg_does(start_proxy: Start) -> None:
    """SMG, the reference router, serves /v1/completions from a gRPC engine too: the same text, finish
    reasons and usage. SMG sends no stop_reason, bounds a request without max_tokens by the context only
    (vLLM and OpenAI: 16 tokens), cuts the stop string despite include_stop_str_in_output (vLLM keeps it)
    and takes no prompt of token ids, so those requests are left out."""
    requests = [
        r
        for r in REQUESTS
        if "max_tokens" in r
        and "include_stop_str_in_output" not in r.get("extra_body", {})
        and all(isinstance(p, str) for p in ([r["prompt"]] if isinstance(r["prompt"], str) else r["prompt"]))
    ]
    requests.append({"prompt": ["first prompt", "second prompt"], "n": 2, "max_tokens": 200})
    async with engine_proxy(start_proxy) as (engine, _, client, _server), smg(engine, "vllm") as reference:
        for request in requests:
            for stream in (False, True):
                through = await completion(client, stream, **request)
                expected = await completion(reference, stream, **request)
                for answer in (through, expected):
                    for choice in answer["choices"].values():
                        del choice["stop"]
                assert through == expected, (stream, request)


# ----------------------------------------------------------------------------------------- stream layout


async def test_stream_layout(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        events = await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=200, n=2, temperature=1.0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in events]
        ids = {c.id for c in chunks}
        assert len(ids) == 1 and ids.pop().startswith("cmpl-")
        assert all(c.model == MODEL and c.object == "text_completion" for c in chunks)
        assert all(len(c.choices) == 1 for c in chunks[:-1])
        for index in (0, 1):
            mine = [c.choices[0] for c in chunks[:-1] if c.choices[0].index == index]
            assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + ["stop"]
            assert all(c.logprobs is None for c in mine)
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        usage = chunks[-1].usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        # Without include_usage, no usage chunk.
        events = await client.completions.create(model=MODEL, prompt=PROMPT, stream=True)
        assert all(c.usage is None and c.choices for c in [c async for c in events])


# ----------------------------------------------------------------------------------------------- logprobs


async def test_logprobs_in_the_legacy_layout(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, rest, client, _server):
        reference = direct(rest)
        request = {"prompt": PROMPT, "logprobs": 2, "max_tokens": 6, "temperature": 0.0}
        ours = (await client.completions.create(model=MODEL, **request)).choices[0]
        theirs = (await reference.completions.create(model=MODEL, **request)).choices[0]
        await reference.close()
        assert ours.logprobs is not None and theirs.logprobs is not None
        assert ours.logprobs.tokens == theirs.logprobs.tokens and len(ours.logprobs.tokens) == 6
        assert ours.logprobs.token_logprobs == pytest.approx(theirs.logprobs.token_logprobs, abs=1e-5)
        assert ours.logprobs.top_logprobs is not None and theirs.logprobs.top_logprobs is not None
        for mine, expected, token in zip(
            ours.logprobs.top_logprobs, theirs.logprobs.top_logprobs, ours.logprobs.tokens, strict=True
        ):
            assert list(mine) == list(expected) and next(iter(mine)) == token  # the sampled token first
            assert list(mine.values()) == pytest.approx(list(expected.values()), abs=1e-5)
        # text_offset: where each token's text starts, counted as vLLM counts it.
        offsets = [sum(len(t) for t in ours.logprobs.tokens[:i]) for i in range(6)]
        assert ours.logprobs.text_offset == offsets
        # Streamed: the same entries, a chunk's offsets starting at the text sent before it.
        events = await client.completions.create(model=MODEL, stream=True, **request)
        tokens, sent = [], 0
        async for chunk in events:
            c = chunk.choices[0]
            assert c.logprobs is not None and c.logprobs.text_offset is not None and c.logprobs.tokens
            assert c.logprobs.text_offset[0] == sent
            tokens += c.logprobs.tokens
            sent += len(c.text)
        assert tokens == ours.logprobs.tokens and sent == len(ours.text)


# ------------------------------------------------------------------------------------------------- echo


async def test_echo(start_proxy: Start) -> None:
    model = load(MODEL, 20)
    answer = make_reply(PROMPT).text
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        reply = await client.completions.create(model=MODEL, prompt=PROMPT, echo=True, max_tokens=200)
        assert reply.choices[0].text == PROMPT + answer
        ids = model.encode("token prompt")
        reply = await client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=200)
        assert reply.choices[0].text == "token prompt" + make_reply("token prompt").text
        events = await client.completions.create(
            model=MODEL, prompt=PROMPT, echo=True, max_tokens=200, n=2, stream=True
        )
        texts: dict[int, str] = {}
        firsts: dict[int, str] = {}
        async for chunk in events:
            for c in chunk.choices:
                firsts.setdefault(c.index, c.text)
                texts[c.index] = texts.get(c.index, "") + c.text
        assert all(first.startswith(PROMPT) for first in firsts.values()) and len(firsts) == 2
        assert texts[0] == PROMPT + answer
        with pytest.raises(openai.BadRequestError, match="echo with logprobs"):
            await client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1)


# ------------------------------------------------------------------------------------------- refusals


async def test_refusals_name_the_field(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"suffix": "the end"}, "suffix"),
            ({"best_of": 3}, "best_of"),
            ({"extra_body": {"frobnicate": True}}, "frobnicate"),
            ({"extra_body": {"prompt_logprobs": 2}}, "prompt_logprobs"),
            ({"logprobs": 21}, "logprobs"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"stop": [1, 2]}, "stop"),
            ({"extra_body": {"stream_options": {"include_usage": True}}}, "stream_options"),
        ]
        for request, field in refusals:
            with pytest.raises(openai.BadRequestError, match=field):
                await client.completions.create(model=MODEL, **{"prompt": PROMPT, **request})
        for prompt, field in (
            ([5, 10**6], r"prompt: token ids"),
            (["ok", [1, -1]], r"prompt\[1\]: token ids"),
            ([], "prompt"),
            ("word " * 9000, "maximum context length"),
        ):
            with pytest.raises(openai.BadRequestError, match=field):
                await client.completions.create(model=MODEL, prompt=prompt)
        assert generate_requests(engine) == []
        reply = await client.completions.create(model=MODEL, prompt=PROMPT, best_of=1, user="someone")
        assert reply.choices[0].finish_reason == "length"


async def test_sampling_reaches_the_engine(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        await client.completions.create(model=MODEL, prompt=PROMPT)
        sent = generate_requests(engine)[-1].sampling_params
        assert (sent.max_tokens, round(sent.temperature, 5), sent.top_k) == (
            16,
            0.7,
            20,
        )  # the model's defaults
        await client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=9, temperature=0.0, top_p=0.5, seed=7, stop="x",
            presence_penalty=0.5, frequency_penalty=0.25, logit_bias={"5": 1.5}, logprobs=3,
            extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "stop_token_ids": [9],
                        "ignore_eos": True, "guided_choice": ["a", "b"]},
        )  # fmt: skip
        sent = generate_requests(engine)[-1].sampling_params
        assert (sent.max_tokens, sent.temperature, round(sent.top_p, 5), sent.seed) == (9, 0.0, 0.5, 7)
        assert (list(sent.stop), list(sent.stop_token_ids), sent.ignore_eos, sent.logprobs) == (
            ["x"],
            [9],
            True,
            3,
        )
        assert (round(sent.presence_penalty, 5), round(sent.frequency_penalty, 5)) == (0.5, 0.25)
        assert (sent.top_k, round(sent.min_p, 5), round(sent.repetition_penalty, 5)) == (5, 0.1, 1.1)
        assert dict(sent.logit_bias) == {5: 1.5} and list(sent.choice.choices) == ["a", "b"]


async def test_text_prompts_get_the_models_special_tokens(start_proxy: Start, tmp_path: Path) -> None:
    """As vLLM tokenizes a completion's prompt: with the tokenizer's special tokens (a BOS for a model whose
    tokenizer adds one), unless add_special_tokens is false."""
    model = load(MODEL, 20)
    model.save(tmp_path / "model")
    tokenizer_file = tmp_path / "model" / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    bos = model.endoftext_id
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            "<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos], "tokens": ["<|endoftext|>"]}
        },
    }
    tokenizer_file.write_text(json.dumps(tokenizer))
    async with engine_proxy(start_proxy, tokenizerPath=str(tmp_path / "model")) as (engine, _, client, _s):
        reply = await client.completions.create(model=MODEL, prompt="hi", echo=True, max_tokens=200)
        assert list(generate_requests(engine)[-1].tokenized.input_ids) == [bos, *model.encode("hi")]
        assert reply.choices[0].text.startswith("hiThis is a fake reply")  # the prompt as sent, not its BOS
        await client.completions.create(model=MODEL, prompt="hi", extra_body={"add_special_tokens": False})
        assert list(generate_requests(engine)[-1].tokenized.input_ids) == model.encode("hi")


# ------------------------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
async def test_client_that_leaves_aborts_the_request(start_proxy: Start, kind: str) -> None:
    async with engine_proxy(start_proxy, kind) as (engine, _, client, _server):
        engine.faults.token_delay_ms = 100
        events = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True)
        aborts = await leave_mid_stream(engine, events)
        generate = generate_requests(engine)[-1]
        assert aborts and generate.request_id in str(aborts[-1])


async def test_a_stream_that_breaks_ends_with_an_error_event(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, "sglang") as (engine, _, client, _server):
        await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        engine.faults.update({"stream_error_after_tokens": 3})
        events = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True)
        text = ""
        with pytest.raises(openai.APIError, match="injected error"):
            async for chunk in events:
                text += "".join(c.text for c in chunk.choices)
        assert text and make_reply(PROMPT).text.startswith(text)
