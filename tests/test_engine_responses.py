"""OpenAI's Responses API (``POST /v1/responses``) on the engine provider types: the official ``openai`` SDK's
``responses.create``, ``parse`` and ``stream`` through an in-process proxy in front of a fake engine, answered on
top of the chat path: the same text, tool calls, reasoning, logprobs and usage as the chat path's answer to the
same conversation; a stream's events in the API's order, ending with the unary answer; the refusals by name;
and the same answer as SMG's, the reference router, when it is there.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest
from engine_routers import MODEL, SMG, answer, leave_mid_stream, smg
from test_engine_provider import HELLO, HISTORY, THINK, TOOLS, WEATHER, Start, engine_proxy
from test_fake_engine_media import data_url, png

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.codecs.openai_responses import ResponseWriter
from llmgw_dev.fakes.model import load

# The chat tests' tools, flattened as the Responses API has them.
RESPONSES_TOOLS: list[Any] = [{"type": "function", **t["function"]} for t in TOOLS]
# HELLO as Responses items: its system message as instructions.
HELLO_INPUT = {"instructions": HELLO[0]["content"], "input": HELLO[1]["content"]}
CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
# HISTORY as items: the call, and its output.
HISTORY_INPUT: list[Any] = [
    *WEATHER,
    CALL,
    {"type": "function_call_output", "call_id": "call_1", "output": HISTORY[-1]["content"]},
]
# A Responses request and the chat request of the same conversation, by case.
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "plain": (HELLO_INPUT, {"messages": HELLO}),
    "tool-call": ({"input": WEATHER, "tools": RESPONSES_TOOLS}, {"messages": WEATHER, "tools": TOOLS}),
    "tool-result": (
        {"input": HISTORY_INPUT, "tools": RESPONSES_TOOLS},
        {"messages": HISTORY, "tools": TOOLS},
    ),
    "thinking": ({**HELLO_INPUT, "extra_body": THINK}, {"messages": HELLO, "extra_body": THINK}),
    "thinking-tool-call": (
        {"input": WEATHER, "tools": RESPONSES_TOOLS, "extra_body": THINK},
        {"messages": WEATHER, "tools": TOOLS, "extra_body": THINK},
    ),
    "tool-choice-required": (
        {**HELLO_INPUT, "tools": RESPONSES_TOOLS, "tool_choice": "required"},
        {"messages": HELLO, "tools": TOOLS, "tool_choice": "required"},
    ),
    "json-schema": (
        {
            **HELLO_INPUT,
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "a",
                    "schema": {"type": "object", "properties": {"a": {"type": "integer"}}},
                }
            },
        },
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
    ),
    "max-output-tokens": ({**HELLO_INPUT, "max_output_tokens": 7}, {"messages": HELLO, "max_tokens": 7}),
}


def said(response: Any) -> dict[str, Any]:
    """What a Response says, in the terms of :func:`engine_routers.answer`'s choice: the text, reasoning,
    tool calls (names and parsed arguments), how it finished; and the usage."""
    reasoning = "".join(c.text for i in response.output if i.type == "reasoning" for c in i.content or [])
    calls = [(i.name, json.loads(i.arguments)) for i in response.output if i.type == "function_call"]
    finish = "length" if response.status == "incomplete" else "tool_calls" if calls else "stop"
    assert response.usage is not None
    return {
        "content": response.output_text,
        "reasoning": reasoning.strip(),
        "tools": calls,
        "finish": finish,
        "usage": (response.usage.input_tokens, response.usage.output_tokens),
    }


async def chat_said(client: openai.AsyncOpenAI, request: dict[str, Any]) -> dict[str, Any]:
    reply = await answer(client, False, **request)
    return {**reply["choices"][0], "usage": reply["usage"]}


def without_ids(response: Any) -> dict[str, Any]:
    """A Response's JSON but for what differs between two answers: ids, timestamps and the tokens the engine
    found in its prefix cache."""
    body = response.model_dump(mode="json", exclude_none=True)
    for key in ("id", "created_at", "completed_at"):
        body.pop(key, None)
    body["usage"]["input_tokens_details"].pop("cached_tokens")
    for item in body["output"]:
        item.pop("id", None)
        item.pop("call_id", None)
    return body


def expected_events(response: Any) -> list[str]:
    """The event types a stream of ``response`` sends, a run of deltas written once."""
    types = ["response.created", "response.in_progress"]
    for item in response.output:
        types.append("response.output_item.added")
        if item.type == "reasoning":
            types += ["response.reasoning_text.delta", "response.reasoning_text.done"]
        elif item.type == "message":
            types += [
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
            ]
        else:
            types += ["response.function_call_arguments.delta", "response.function_call_arguments.done"]
        types.append("response.output_item.done")
    return [*types, f"response.{response.status}"]


def runs(types: list[str]) -> list[str]:
    return [t for i, t in enumerate(types) if i == 0 or t != types[i - 1]]


def generate_requests(engine: Any) -> list[Any]:
    return [r for r in engine.received if type(r).__name__ == "GenerateRequest"]


# ------------------------------------------------------------------------------- as the chat path answers


@pytest.mark.parametrize("kind", ["vllm", "sglang", "trtllm"])
async def test_plain_text_as_the_chat_path_answers(start_proxy: Start, kind: str) -> None:
    async with engine_proxy(start_proxy, kind) as (engine, _, client, _server):
        response = await client.responses.create(model=MODEL, **HELLO_INPUT)
        assert said(response) == await chat_said(client, {"messages": HELLO})
        assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL
        assert (response.status, response.store, response.instructions) == (
            "completed",
            False,
            "You are terse.",
        )
        [message] = response.output
        assert message.type == "message" and message.id.startswith("msg_") and message.status == "completed"
        assert message.content[0].type == "output_text" and message.content[0].annotations == []
        assert response.usage is not None and response.usage.total_tokens == sum(said(response)["usage"])
        # What reached the engine: the conversation through the chat template, as a chat request.
        sent = generate_requests(engine)[-2]
        ids = sent.tokenized.input_token_ids if kind == "trtllm" else sent.tokenized.input_ids
        model = load(MODEL, 20)
        assert model.decode(list(ids), skip_special_tokens=False) == model.render(HELLO)


@pytest.mark.parametrize("case", list(CASES))
async def test_each_case_as_the_chat_path_answers(start_proxy: Start, case: str) -> None:
    request, chat = CASES[case]
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        response = await client.responses.create(model=MODEL, **request)
        expected = await chat_said(client, chat)
        assert said(response) == expected, case


async def test_instructions_and_a_multi_turn_conversation(start_proxy: Start) -> None:
    conversation: list[Any] = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi, what do you need?"},
        {"role": "user", "content": "tell me a story"},
    ]
    items: list[Any] = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello there"}]},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "hi, what do you need?", "annotations": []}],
        },
        {"role": "user", "content": "tell me a story"},
    ]
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        response = await client.responses.create(model=MODEL, instructions="You are terse.", input=items)
        prompt = generate_requests(engine)[-1].tokenized.input_ids
        assert said(response) == await chat_said(client, {"messages": conversation})
        model = load(MODEL, 20)
        assert model.decode(list(prompt), skip_special_tokens=False) == model.render(conversation)


async def test_images_as_the_chat_path_sees_them(start_proxy: Start) -> None:
    image = data_url(png(100, 60))
    items = [
        {
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this picture?"},
                {"type": "input_image", "image_url": image, "detail": "auto"},
            ],
        }
    ]
    conversation = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": image, "detail": "auto"}},
            ],
        }
    ]
    async with engine_proxy(start_proxy, vision=True) as (engine, _, client, _server):
        response = await client.responses.create(model=MODEL, input=items)
        assert "a 100x60 PNG image" in response.output_text
        assert [item.url for item in generate_requests(engine)[-1].media_refs.items] == [image]
        assert said(response) == await chat_said(client, {"messages": conversation})


async def test_a_tool_call_round_trip(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        first = await client.responses.create(model=MODEL, input=WEATHER, tools=RESPONSES_TOOLS)
        [call] = first.output
        assert call.type == "function_call" and call.status == "completed"
        assert call.id is not None and call.id.startswith("fc_") and call.call_id.startswith("call_")
        assert (call.name, json.loads(call.arguments)["city"]) == ("get_weather", "Paris")
        # The call and its output sent back (the SDK's own output item, as a client does): answered.
        history = [
            *WEATHER,
            call,
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ]
        second = await client.responses.create(model=MODEL, input=history, tools=RESPONSES_TOOLS)
        chat = [
            *WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": call.arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        ]
        assert said(second) == await chat_said(client, {"messages": chat, "tools": TOOLS})
        assert second.output_text and second.output[0].type == "message"


async def test_parse_with_a_pydantic_format(start_proxy: Start) -> None:
    class Weather(pydantic.BaseModel):
        city: str
        degrees: int

    async with engine_proxy(start_proxy) as (_, _, client, _server):
        response = await client.responses.parse(
            model=MODEL, input="What is the weather in Paris?", text_format=Weather
        )
        assert isinstance(response.output_parsed, Weather)
        assert response.text is not None and response.text.format is not None
        assert response.text.format.type == "json_schema"


async def test_reasoning_is_an_item_of_its_own(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        response = await client.responses.create(model=MODEL, **HELLO_INPUT, extra_body=THINK)
        reasoning, message = response.output
        assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
        assert reasoning.content is not None and reasoning.content[0].type == "reasoning_text"
        expected = await chat_said(client, {"messages": HELLO, "extra_body": THINK})
        assert expected["reasoning"] and said(response)["reasoning"] == expected["reasoning"]
        assert message.type == "message" and response.output_text == expected["content"]
        # Sent back, the reasoning item is the assistant turn's reasoning_content (this template drops it).
        again = await client.responses.create(
            model=MODEL,
            input=[
                {"role": "user", "content": "hi"},
                reasoning,
                message,
                {"role": "user", "content": "more"},
            ],
        )
        assert again.status == "completed" and again.output_text


async def test_max_output_tokens_makes_it_incomplete(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        response = await client.responses.create(model=MODEL, **HELLO_INPUT, max_output_tokens=7)
        assert response.status == "incomplete" and response.incomplete_details is not None
        assert response.incomplete_details.reason == "max_output_tokens" and response.max_output_tokens == 7
        assert response.output[-1].status == "incomplete" and response.usage is not None
        assert response.usage.output_tokens == 7
        events = [
            e
            async for e in await client.responses.create(
                model=MODEL, **HELLO_INPUT, max_output_tokens=7, stream=True
            )
        ]
        assert events[-1].type == "response.incomplete"
        assert without_ids(events[-1].response) == without_ids(response)


async def test_logprobs_of_the_text(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        request: dict[str, Any] = {
            **HELLO_INPUT,
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 2,
            "temperature": 0.0,
            "max_output_tokens": 4,
        }
        response = await client.responses.create(model=MODEL, **request)
        logprobs = response.output[0].content[0].logprobs
        chat = await client.chat.completions.create(
            model=MODEL, messages=HELLO, logprobs=True, top_logprobs=2, temperature=0.0, max_tokens=4
        )
        assert chat.choices[0].logprobs is not None and chat.choices[0].logprobs.content is not None
        expected = [e.model_dump() for e in chat.choices[0].logprobs.content]
        assert logprobs is not None and [e.model_dump() for e in logprobs] == expected and len(expected) == 4
        streamed = []
        async for event in await client.responses.create(model=MODEL, stream=True, **request):
            if event.type == "response.output_text.delta":
                streamed += [e.model_dump() for e in event.logprobs]
        assert streamed == expected
        # Without include, none.
        plain = await client.responses.create(model=MODEL, **HELLO_INPUT, top_logprobs=2)
        assert plain.output[0].content[0].logprobs == [] and plain.top_logprobs == 2


def test_the_writer_makes_an_item_per_kind_as_chunks_come() -> None:
    """Reasoning, text, calls in the order they come, a new item when the kind changes; whitespace between
    calls dropped (as the chat path drops it from a reply with calls), kept in a reply of text only."""

    def chunk(**delta: Any) -> pb.ChatChunk:
        calls = delta.pop("calls", [])
        out = pb.ChatChunk(id="chatcmpl-1", model=MODEL)
        out.choices.add(index=0, delta=pb.ChunkDelta(**delta, tool_calls=calls))
        return out

    def call(index: int, name: str = "", arguments: str = "") -> pb.ToolCallDelta:
        fields = {"id": f"call_{index}", "type": "function", "name": name} if name else {}
        return pb.ToolCallDelta(index=index, arguments=arguments, **fields)

    writer = ResponseWriter({"model": MODEL, "input": "hi"}, logprobs=False)
    chunks = [
        chunk(role="assistant", content=""),
        chunk(reasoning_content="Let me see."),
        chunk(content="\n\n"),
        chunk(content="Checking."),
        chunk(calls=[call(0, "get_weather", '{"city": ')]),
        chunk(calls=[call(0, arguments='"Paris"}')]),
        chunk(content="\n"),
        chunk(calls=[call(1, "get_time", "{}")]),
        chunk(content="\n"),
    ]
    events = writer.start() + [e for c in chunks for e in writer.feed(c)] + writer.end()
    output = writer.response["output"]
    assert [i["type"] for i in output] == ["reasoning", "message", "function_call", "function_call"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "Let me see."}]
    assert output[1]["content"][0]["text"] == "\n\nChecking."
    assert [(i["call_id"], i["name"], i["arguments"]) for i in output[2:]] == [
        ("call_0", "get_weather", '{"city": "Paris"}'),
        ("call_1", "get_time", "{}"),
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed" and writer.response["status"] == "completed"
    # Whitespace only, no calls: the reply is that text.
    writer = ResponseWriter({"model": MODEL, "input": "hi"}, logprobs=False)
    writer.feed(chunk(content=" "))
    writer.end()
    assert [i["content"][0]["text"] for i in writer.response["output"]] == [" "]


# ------------------------------------------------------------------------------------------------ streams


@pytest.mark.parametrize("case", ["plain", "tool-call", "tool-result", "thinking", "thinking-tool-call"])
async def test_a_stream_ends_with_the_unary_answer(start_proxy: Start, case: str) -> None:
    request = CASES[case][0]
    async with engine_proxy(start_proxy) as (_, _, client, _server):
        unary = await client.responses.create(model=MODEL, **request)
        async with client.responses.stream(model=MODEL, **request) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
        assert without_ids(final) == without_ids(unary)
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert runs([e.type for e in events]) == expected_events(final)
        assert events[0].response.status == "in_progress" and events[0].response.output == []
        # Each item's deltas add up to what its done events say.
        for index, item in enumerate(final.output):
            mine = [e for e in events if getattr(e, "output_index", None) == index]
            added, done = mine[0], mine[-1]
            assert added.item.status == "in_progress" and done.item.id == item.id
            deltas = "".join(e.delta for e in mine if e.type.endswith(".delta"))
            if item.type == "function_call":
                assert deltas == item.arguments and added.item.call_id == item.call_id
                assert json.loads(deltas)["city"] == "Paris"
            elif item.type == "message":
                assert deltas == item.content[0].text
            else:
                assert item.content is not None and deltas == item.content[0].text
            assert all(getattr(e, "item_id", item.id) == item.id for e in mine)


async def test_usage_is_counted(start_proxy: Start) -> None:
    """The gateway counts a Response's tokens, unary and streamed, as the chat path's for that conversation."""
    labels = {"route": MODEL, "path": "grpc", "provider": "engine", "token_type": "output"}

    def counted(server: Any) -> float:
        return server.metrics.registry.get_sample_value("gen_ai_client_token_usage_sum", labels) or 0.0

    async with engine_proxy(start_proxy) as (_, _, client, server):
        expected = (await chat_said(client, {"messages": HELLO}))["usage"]
        before = counted(server)
        response = await client.responses.create(model=MODEL, **HELLO_INPUT)
        assert said(response)["usage"] == expected
        async for _ in await client.responses.create(model=MODEL, **HELLO_INPUT, stream=True):
            pass
        assert counted(server) - before == 2 * expected[1]


async def test_a_stream_that_breaks_ends_with_an_error_event(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy, "sglang") as (engine, _, client, _server):
        await client.responses.create(model=MODEL, input="warm up", max_output_tokens=2)
        engine.faults.update({"stream_error_after_tokens": 3})
        events = [e async for e in await client.responses.create(model=MODEL, **HELLO_INPUT, stream=True)]
        types = [e.type for e in events]
        assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
        # The API's own error event, which the SDK yields (it raises on none of a Responses stream's).
        assert types[-1] == "error" and "injected error" in events[-1].message
        assert not any(t.startswith(("response.completed", "response.output_item.done")) for t in types)


async def test_a_client_that_leaves_aborts_the_request(start_proxy: Start) -> None:
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        engine.faults.token_delay_ms = 100
        events = await client.responses.create(model=MODEL, **HELLO_INPUT, stream=True)
        aborts = await leave_mid_stream(engine, events)
        assert aborts and generate_requests(engine)[-1].request_id in str(aborts[-1])


# ------------------------------------------------------------------------------------------------ refusals


async def test_refusals_name_the_field(start_proxy: Start) -> None:
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"previous_response_id": "resp_1"}, "previous_response_id: the gateway keeps no responses"),
        ({"conversation": "conv_1"}, "conversation: the gateway keeps no conversations"),
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt: stored prompts"),
        ({"include": ["reasoning.encrypted_content"]}, "include: 'reasoning.encrypted_content'"),
        ({"truncation": "auto"}, "truncation"),
        ({"max_tool_calls": 2}, "max_tool_calls"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"extra_body": {"n": 2}}, "'n': not a field"),
        ({"tools": [{"type": "web_search"}]}, r"tools\[0\]: a tool of type 'web_search'.*built-in"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "'file_search'"),
        ({"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}, "'code_interpreter'"),
        ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]}, "'mcp'"),
        ({"tools": [{"type": "image_generation"}]}, "'image_generation'"),
        ({"tools": [{"type": "computer_use_preview", "environment": "linux"}]}, "'computer_use_preview'"),
        ({"tool_choice": {"type": "web_search_preview"}, "tools": RESPONSES_TOOLS}, "tool_choice"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, r"input\[0\]: an item_reference"),
        (
            {"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]},
            "'computer_call_output'",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file_1"}]}]},
            r"input\[0\]\.content\[0\]: a part of type 'input_file'",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "file_id": "f", "detail": "auto"}]}
                ]
            },
            r"input\[0\]\.content\[0\]\.file_id",
        ),
        (
            {"input": [{"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAA"}]},
            r"input\[0\]\.encrypted_content",
        ),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ]
    async with engine_proxy(start_proxy) as (engine, _, client, _server):
        for request, message in refusals:
            body = {"input": "hi", **request}
            with pytest.raises(openai.BadRequestError, match=message):
                await client.responses.create(model=MODEL, **body)
            with pytest.raises(openai.BadRequestError, match=message):
                await client.responses.create(model=MODEL, stream=True, **body)
        assert generate_requests(engine) == []
        # What the gateway accepts and lets be.
        response = await client.responses.create(
            model=MODEL, input="hi", store=True, background=False, truncation="disabled", metadata={"a": "b"},
            user="someone", safety_identifier="s", prompt_cache_key="k", service_tier="auto",
            reasoning={"effort": "low", "summary": "auto"}, parallel_tool_calls=False,
            text={"format": {"type": "text"}, "verbosity": "low"}, extra_body={"top_k": 5},
        )  # fmt: skip
        assert response.status == "completed" and response.store is False and response.metadata == {"a": "b"}
        assert generate_requests(engine)[-1].sampling_params.top_k == 5


# ---------------------------------------------------------------------------------------------- SMG


@pytest.mark.slow
@pytest.mark.skipif(not SMG.exists(), reason="needs SMG (smg in the virtualenv's bin)")
async def test_responses_answer_as_smg_does(start_proxy: Start) -> None:
    """SMG, the reference router, serves /v1/responses from a gRPC engine too: the same output text, tool
    calls, finish and usage, unary and streamed. (SMG's Responses API takes no chat_template_kwargs, so the
    thinking cases are left out.)"""
    cases = ["plain", "tool-call", "tool-result", "tool-choice-required", "json-schema", "max-output-tokens"]
    async with engine_proxy(start_proxy) as (engine, _, client, _server), smg(engine, "vllm") as reference:
        for case in cases:
            request = {**CASES[case][0], "store": False}
            through = said(await client.responses.create(model=MODEL, **request))
            expected = said(await reference.responses.create(model=MODEL, **request))
            assert through == expected, case
            if case != "max-output-tokens":  # (an incomplete stream has no final response for the SDK)
                streamed = []
                for router in (client, reference):
                    async with router.responses.stream(model=MODEL, **request) as stream:
                        streamed.append(said(await stream.get_final_response()))
                assert streamed == [expected, expected], case
