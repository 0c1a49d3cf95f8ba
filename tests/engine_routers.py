"""What the engine tests share: SMG, the reference router, started in front of a fake engine; the answer of a
chat request (unary or streamed) reduced to what two routers must agree on; a client that goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import openai

from llmgw_dev.fakes import FakeProvider

MODEL = "demo-model"
SMG = Path(sys.executable).parent / "smg"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def ready(client: openai.AsyncOpenAI, exited: Any, log: Any = None) -> None:
    """Until ``client`` answers a chat request (a router first registers the engine, fetches the tokenizer)."""
    deadline = time.monotonic() + 60
    while True:
        if exited() or time.monotonic() > deadline:
            output = ""
            if log is not None:
                log.seek(0)
                output = log.read()[-4000:].decode(errors="replace")
            raise AssertionError(f"the router did not get ready:\n{output}")
        with contextlib.suppress(openai.APIError, openai.APIConnectionError):
            probe = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "ready?"}], max_tokens=1
            )
            if probe.choices:
                return
        await asyncio.sleep(0.25)


@contextlib.asynccontextmanager
async def smg(worker: FakeProvider, backend: str | None = None) -> AsyncIterator[openai.AsyncOpenAI]:
    """SMG routing to ``worker``, bound to loopback only (its metrics too); an SDK client once it serves the
    model. Without ``backend`` SMG finds the engine's kind itself (by its health service), and is given a
    model path that does not exist, so that it fetches the tokenizer from the engine."""
    port, metrics = free_port(), free_port()
    kind = ["--backend", backend] if backend else ["--model-path", f"/nonexistent/llmgw-fake-engine/{MODEL}"]
    args: Sequence[str] = (
        *kind,
        "--worker-urls", f"grpc://{worker.target}",
        "--host", "127.0.0.1", "--port", str(port),
        "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics),
        "--tool-call-parser", "qwen", "--reasoning-parser", "qwen3",
        "--shutdown-grace-period-secs", "1",
    )  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = await asyncio.create_subprocess_exec(
            str(SMG), "launch", *args, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        try:
            await ready(client, lambda: process.returncode is not None, log)
            yield client
        finally:
            await client.close()
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def answer(client: openai.AsyncOpenAI, stream: bool, **request: Any) -> dict[str, Any]:
    """What a chat answer says, unary or streamed: per choice the content, reasoning, tool calls (names and
    parsed arguments) and finish reason; the usage (prompt, completion tokens)."""
    if not stream:
        reply = await client.chat.completions.create(model=MODEL, **request)
        choices = {}
        for choice in reply.choices:
            message = choice.message
            choices[choice.index] = {
                "content": message.content or "",
                "reasoning": (getattr(message, "reasoning_content", None) or "").strip(),
                "tools": [
                    (t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []
                ],
                "finish": choice.finish_reason,
            }
        assert reply.usage is not None
        return {"choices": choices, "usage": (reply.usage.prompt_tokens, reply.usage.completion_tokens)}
    events = await client.chat.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True}, **request
    )
    acc: dict[int, dict[str, Any]] = {}
    usage = None
    async for chunk in events:
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            state = acc.setdefault(
                choice.index, {"content": "", "reasoning": "", "calls": {}, "finish": None}
            )
            delta = choice.delta
            state["content"] += delta.content or ""
            state["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                entry = state["calls"].setdefault(call.index, {"name": "", "arguments": ""})
                if call.function is not None:
                    entry["name"] += call.function.name or ""
                    entry["arguments"] += call.function.arguments or ""
            state["finish"] = choice.finish_reason or state["finish"]
    return {
        "choices": {
            i: {
                "content": s["content"],
                "reasoning": s["reasoning"].strip(),
                "tools": [(c["name"], json.loads(c["arguments"])) for _, c in sorted(s["calls"].items())],
                "finish": s["finish"],
            }
            for i, s in sorted(acc.items())
        },
        "usage": usage,
    }


async def leave_mid_stream(engine: FakeProvider, events: Any) -> list[Any]:
    """Read three events of a stream (the engine slowed down first, so that it is still generating), then
    close it as a client that goes away does; wait (5 s at most) for the engine to count the request
    cancelled, and give the AbortRequest messages it received."""
    seen = 0
    async for _ in events:
        seen += 1
        if seen == 3:
            break
    await events.close()
    deadline = time.monotonic() + 5
    while engine.stats["cancelled"] == 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert engine.stats["cancelled"] == 1
    return [r for r in engine.received if type(r).__name__ == "AbortRequest"]


async def greedy_logprobs(client: openai.AsyncOpenAI, messages: Any) -> list[Any]:
    """The logprobs of a greedy 4-token answer with 2 alternatives each: (token, logprob, [(token, logprob)])
    per token, rounded to 5 places, for two servers to agree on."""
    reply = await client.chat.completions.create(
        model=MODEL, messages=messages, logprobs=True, top_logprobs=2, max_tokens=4, temperature=0.0
    )
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    return [
        (e.token, round(e.logprob, 5), [(t.token, round(t.logprob, 5)) for t in e.top_logprobs])
        for e in reply.choices[0].logprobs.content
    ]
