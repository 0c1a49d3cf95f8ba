"""Reading Server-Sent Events, the framing of OpenAI's and Anthropic's streaming responses."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


async def sse_events(lines: AsyncIterable[bytes]) -> AsyncIterator[tuple[str, bytes]]:
    """(event name, data) of each event: ``data:`` lines joined by newlines, dispatched on a blank line.

    Comments and the ``id:``/``retry:`` fields carry nothing an LLM client needs and are skipped.
    """
    event = ""
    data: list[bytes] = []
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data = "", []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
    if data:
        yield event, b"\n".join(data)
