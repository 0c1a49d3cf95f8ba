"""llmgw's engine providers (``vllm``, ``sglang``) cross-checked against SMG, the reference router.

One fake engine per kind; SMG (``smg launch --backend KIND --tool-call-parser qwen --reasoning-parser qwen3``)
and an llmgw proxy (a provider of that type with ``toolCallParser: hermes, reasoningParser: qwen3``) both in
front of it. The official ``openai`` SDK sends the same requests to both, unary and streamed, and what comes
back must be the same: per choice the text, the tool calls (names and parsed arguments), the reasoning and
the finish reason, and the usage (prompt and completion tokens); the engine must get the same prompt ids
from both. Logprobs and the requests the engine refuses (too long a prompt, ``max_tokens`` 0) are compared
too. Ids, ``created`` and ``system_fingerprint`` differ legitimately and are not compared; so does the finish
reason of a call forced by a named ``tool_choice`` (see ``FINISH_STOP_IN_LLMGW``).

Where llmgw differs from SMG and should not, the case is marked ``xfail(strict=True)`` with the difference
as its reason, so that the fix turns it into a failure to remove the mark.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import pytest_asyncio
import yaml
from engine_routers import MODEL, SMG, answer, ready, smg

from llmgw.providers import CLIENTS
from llmgw.server import ProxyServer
from llmgw_dev.fakes import FakeProvider

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
HELLO: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "hello there wörld 😀"},
]
ASK_TOOL: list[Any] = [{"role": "user", "content": "What is the weather in Paris? Use get_weather."}]
HISTORY: list[Any] = [
    *ASK_TOOL,
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
THINK = {"chat_template_kwargs": {"enable_thinking": True}}

# The issue's cases (name -> request), then more of the API where time allowed.
CASES: dict[str, dict[str, Any]] = {
    "plain": {"messages": HELLO},
    "tool-call": {"messages": ASK_TOOL, "tools": TOOLS},
    "tool-result": {"messages": HISTORY, "tools": TOOLS},
    "thinking": {"messages": HELLO, "extra_body": THINK},
    "max-tokens-length": {"messages": HELLO, "max_tokens": 7},
    "stop": {"messages": HELLO, "stop": ["fake"]},
    "n2-seed": {"messages": HELLO, "n": 2, "seed": 11, "temperature": 1.0},
    "thinking-tool-call": {"messages": ASK_TOOL, "tools": TOOLS, "extra_body": THINK},
    "thinking-max-tokens": {"messages": HELLO, "max_tokens": 5, "extra_body": THINK},
    "tools-declared-not-called": {"messages": HELLO, "tools": TOOLS},
    "temperature-0": {"messages": HELLO, "temperature": 0.0, "max_tokens": 12},
    "n2-no-seed": {"messages": HELLO, "n": 2, "temperature": 1.0},
    "tool-choice-required": {"messages": HELLO, "tools": TOOLS, "tool_choice": "required"},
    "tool-choice-named": {
        "messages": HELLO,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
    "json-object": {"messages": HELLO, "response_format": {"type": "json_object"}},
    "json-schema": {
        "messages": HELLO,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "a",
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
            },
        },
    },
    "stop-several": {"messages": HELLO, "stop": ["wörld", "fake"], "max_tokens": 30},
}

# Where llmgw differs from SMG and should not, by (backend, case, stream or None for both): how, for the
# provider's author. Each is an xfail(strict=True): a fix makes the test fail until its entry goes.
KNOWN_DIFFERENCES: dict[tuple[str, str, bool | None], str] = {}
# Where they differ by design: a call forced by a named tool_choice ends with finish reason "stop" in llmgw, as
# in OpenAI's API and vLLM's OpenAI server (the vllm-http fake), and "tool_calls" in SMG. Everything else of
# the answer is compared.
FINISH_STOP_IN_LLMGW = {"tool-choice-named"}


@contextlib.asynccontextmanager
async def llmgw(backend: str, worker: FakeProvider, tmp: Path) -> AsyncIterator[openai.AsyncOpenAI]:
    """An in-process llmgw proxy with a ``backend`` provider on ``worker``; an SDK client on its REST front."""
    config = {
        "generation": 1,
        "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "reloadIntervalSeconds": 30,
        "shutdown": {"drainSeconds": 0},
        "providers": [
            {
                "name": "engine",
                backend: {"target": worker.target, "toolCallParser": "hermes", "reasoningParser": "qwen3"},
            }
        ],
        "routes": [{"model": MODEL, "grpc": "engine"}],
    }
    path = tmp / f"llmgw-{backend}.yaml"
    path.write_text(yaml.safe_dump(config))
    server = ProxyServer(str(path))
    await server.start()
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{server.rest_port}/v1", api_key="unused", max_retries=0
    )
    try:
        await ready(client, lambda: False)
        yield client
    finally:
        await client.close()
        await server.drain()


class Routers:
    def __init__(
        self, backend: str, engine: FakeProvider, smg: openai.AsyncOpenAI, llmgw: openai.AsyncOpenAI
    ):
        self.backend, self.engine, self.smg, self.llmgw = backend, engine, smg, llmgw


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["vllm", "sglang"])
async def routers(request: pytest.FixtureRequest) -> AsyncIterator[Routers]:
    backend: str = request.param
    if backend not in CLIENTS:
        pytest.skip(
            f"llmgw has no {backend} provider yet (llmgw.providers.CLIENTS: {', '.join(sorted(CLIENTS))})"
        )
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            FakeProvider(backend, models=[MODEL]) as engine,
            smg(engine, backend) as reference,
            llmgw(backend, engine, Path(tmp)) as gateway,
        ):
            yield Routers(backend, engine, reference, gateway)


def last_generate(engine: FakeProvider) -> Any:
    """The last GenerateRequest the engine received."""
    return next(r for r in reversed(engine.received) if type(r).__name__ == "GenerateRequest")


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", list(CASES))
async def test_llmgw_answers_as_smg(
    routers: Routers, case: str, stream: bool, request: pytest.FixtureRequest
) -> None:
    reason = KNOWN_DIFFERENCES.get((routers.backend, case, stream)) or KNOWN_DIFFERENCES.get(
        (routers.backend, case, None)
    )
    if reason:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))
    body = CASES[case]
    if routers.backend == "sglang" and "seed" in body:
        pytest.skip("SGLang's protocol carries no seed (SMG drops it)")
    expected = await answer(routers.smg, stream, **body)
    smg_sent = last_generate(routers.engine)
    got = await answer(routers.llmgw, stream, **body)
    llmgw_sent = last_generate(routers.engine)
    # Both rendered the same prompt and tokenized it the same way: the engine got the same ids.
    assert llmgw_sent is not smg_sent
    assert list(llmgw_sent.tokenized.input_ids) == list(smg_sent.tokenized.input_ids)
    if case in FINISH_STOP_IN_LLMGW:
        assert [c["finish"] for c in expected["choices"].values()] == ["tool_calls"]
        assert [c["finish"] for c in got["choices"].values()] == ["stop"]
        for choice in got["choices"].values():
            choice["finish"] = "tool_calls"
    if routers.backend == "sglang" and "stop" in body:
        # SMG does not pass stop strings to SGLang: it cuts the text itself while the engine generates on (to
        # max_tokens or the EOS), so its completion tokens count what it never sent. llmgw passes them, and the
        # engine stops there.
        assert got["usage"][0] == expected["usage"][0] and got["usage"][1] < expected["usage"][1]
        got["usage"] = expected["usage"]
    assert got == expected, (routers.backend, case, stream)


def test_cases_cover_the_issue() -> None:
    """The issue's list: plain, a tool call, a tool result, thinking, length, stop, n=2 with a seed."""
    assert {"plain", "tool-call", "tool-result", "thinking", "max-tokens-length", "stop", "n2-seed"} <= set(
        CASES
    )
    assert os.path.exists(SMG)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_logprobs_as_smg(routers: Routers, stream: bool) -> None:
    """The engine's logprobs come back the same way: each token's text, value and top alternatives."""

    async def logprobs(client: openai.AsyncOpenAI) -> list[tuple[str, float, list[tuple[str, float]]]]:
        request: dict[str, Any] = {
            "model": MODEL,
            "messages": HELLO,
            "logprobs": True,
            "top_logprobs": 2,
            "max_tokens": 6,
            "temperature": 0.0,
        }
        entries: list[Any] = []
        if stream:
            async for chunk in await client.chat.completions.create(stream=True, **request):
                for choice in chunk.choices:
                    if choice.logprobs is not None and choice.logprobs.content:
                        entries += choice.logprobs.content
        else:
            reply = await client.chat.completions.create(**request)
            assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
            entries = reply.choices[0].logprobs.content
        return [(e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs]) for e in entries]

    expected = await logprobs(routers.smg)
    got = await logprobs(routers.llmgw)
    assert len(expected) == 6 and len(got) == len(expected)
    for (token, value, top), (token1, value1, top1) in zip(got, expected, strict=True):
        assert token == token1 and value == pytest.approx(value1, abs=1e-6)
        assert [t for t, _ in top] == [t for t, _ in top1]
        assert [v for _, v in top] == pytest.approx([v for _, v in top1], abs=1e-6)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, "maximum context length"),
        ({"messages": HELLO, "max_tokens": 0}, None),
    ],
    ids=["prompt-too-long", "max-tokens-0"],
)
async def test_refused_as_smg(routers: Routers, body: dict[str, Any], match: str | None) -> None:
    """A request the engine cannot take is a 400 from both (the messages may differ)."""
    for client in (routers.smg, routers.llmgw):
        with pytest.raises(openai.BadRequestError, match=match):
            await client.chat.completions.create(model=MODEL, **body)
