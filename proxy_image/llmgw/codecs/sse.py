"""Reading Server-Sent Events, the framing of OpenAI's and Anthropic's streaming responses."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator


class EventTooLarge(ValueError):
    """An event's data (its ``data:`` lines together) is larger than the reader's bound."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"a streamed event's data exceeds {limit} bytes")
        self.limit = limit


async def sse_events(
    lines: AsyncIterable[bytes], max_event_bytes: int | None = None
) -> AsyncIterator[tuple[str, bytes]]:
    """(event name, data) of each event: ``data:`` lines joined by newlines, dispatched on a blank line.

    Comments and the ``id:``/``retry:`` fields carry nothing an LLM client needs and are skipped. With
    ``max_event_bytes``, an event whose data grows beyond it raises :class:`EventTooLarge` (the lines
    themselves are bounded by whoever splits them).
    """
    event = ""
    data: list[bytes] = []
    size = 0
    async for raw in lines:
        line = raw.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, b"\n".join(data)
            event, data, size = "", [], 0
        elif line.startswith(b"data:"):
            value = line[5:]
            value = value[1:] if value.startswith(b" ") else value
            size += len(value) + 1
            if max_event_bytes is not None and size > max_event_bytes + 1:
                raise EventTooLarge(max_event_bytes)
            data.append(value)
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
    if data:
        yield event, b"\n".join(data)
