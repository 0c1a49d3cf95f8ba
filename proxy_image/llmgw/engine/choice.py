"""One choice through the whole output side: token ids in; reasoning, content and tool calls out.

The stages hand text on in a fixed order (decode and stop, then reasoning, then tool calls from the
answer), and each holds back what it cannot decide yet; when the choice ends, every stage must release
what it holds, in the same order. :class:`ChoicePipeline` does that once, so a provider only maps its
engine's messages in and the deltas out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from llmgw.engine.detokenize import ChoiceDecoder, Finish
from llmgw.engine.reasoning import ThinkTagReasoningParser
from llmgw.engine.tool_parsers import ContentDelta, Event, ToolCallStart, ToolParser


@dataclasses.dataclass(frozen=True)
class ChoiceDelta:
    """What may be sent now: reasoning text, then the answer's events (content and tool calls, in order),
    and the finish once the choice ended."""

    reasoning: str = ""
    events: list[Event] = dataclasses.field(default_factory=list)
    finish: Finish | None = None


class ChoicePipeline:
    """A choice's :class:`ChoiceDecoder`, then its reasoning parser and tool parser when the request has
    them (without a tool parser, the answer is all content)."""

    def __init__(
        self,
        decoder: ChoiceDecoder,
        *,
        reasoning: ThinkTagReasoningParser | None = None,
        tools: ToolParser | None = None,
    ) -> None:
        self._decoder = decoder
        self._reasoning = reasoning
        self._tools = tools
        self._ended = False
        self.tool_calls = 0  # calls announced: a finish with calls is "tool_calls" in OpenAI's terms

    def feed(self, token_ids: Iterable[int]) -> ChoiceDelta:
        """The next ids from the engine; everything is released when they end the choice."""
        step = self._decoder.feed(token_ids)
        return self._pass(step.text, step.finish)

    def end(self) -> ChoiceDelta:
        """The engine ended the stream (its own stop, a length limit): what is still held."""
        text = self._decoder.flush()
        return self._pass(text, self._decoder.finish, ending=True)

    def _pass(self, text: str, finish: Finish | None, *, ending: bool = False) -> ChoiceDelta:
        if self._ended:
            return ChoiceDelta(finish=finish)
        final = ending or finish is not None
        self._ended = final
        reasoning, content = "", text
        if self._reasoning is not None:
            split = self._reasoning.feed(text)
            reasoning, content = split.reasoning, split.content
            if final:
                last = self._reasoning.finish()
                reasoning, content = reasoning + last.reasoning, content + last.content
        if self._tools is None:
            events: list[Event] = [ContentDelta(content)] if content else []
        else:
            events = self._tools.feed(content)
            if final:
                events += self._tools.finish()
            self.tool_calls += sum(isinstance(e, ToolCallStart) for e in events)
        return ChoiceDelta(reasoning, events, finish)
