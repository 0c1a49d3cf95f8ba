"""Separating a model's reasoning from its answer: ``<think>...</think>`` (DeepSeek-R1, Qwen 3, QwQ).

A reasoning model writes its thought between tags before the answer; the OpenAI-compatible API gives it
apart, as ``reasoning_content``. Two cases decide where the text starts:

* the model opens the thought itself (``<think>`` at the start of its output, Qwen 3 hybrid models);
* the chat template already wrote ``<think>`` at the end of the prompt (DeepSeek-R1, Qwen 3 thinking
  models, QwQ): the output starts inside the thought, and only ``</think>`` comes. :func:`reasoning_parser`
  sees this from the rendered prompt; ``deepseek_r1`` assumes it always, as vLLM's parser does.

A thought that is never closed (the output ran out) is all reasoning. Streaming holds back text that may be
the start of a tag until the next delta says; whitespace between ``</think>`` and the answer is dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from llmgw.engine._text import partial_marker

_MAX_OPENING = 256  # leading whitespace held while waiting to see whether the output opens a thought


@dataclasses.dataclass(frozen=True)
class ReasoningSplit:
    """The reasoning and answer text one delta adds (either may be empty); reasoning comes first."""

    reasoning: str = ""
    content: str = ""


class ThinkTagReasoningParser:
    """Splits a stream of text deltas into reasoning and content at ``<think>``/``</think>`` tags.

    ``in_reasoning``: the output starts inside the thought (the prompt opened it); an opening tag at the
    start of the output is still recognized and dropped.
    """

    def __init__(self, *, in_reasoning: bool, start: str = "<think>", end: str = "</think>") -> None:
        self.start_tag = start
        self.end_tag = end
        self._in_reasoning = in_reasoning
        self._state = "opening"
        self._held = ""

    @classmethod
    def parse(cls, text: str, *, in_reasoning: bool) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None for an empty part."""
        parser = cls(in_reasoning=in_reasoning)
        first, last = parser.feed(text), parser.finish()
        reasoning, content = first.reasoning + last.reasoning, first.content + last.content
        return reasoning or None, content or None

    def feed(self, delta: str) -> ReasoningSplit:
        """The reasoning and content ``delta`` makes certain."""
        return self._step(self._held + delta, final=False)

    def finish(self) -> ReasoningSplit:
        """What is still held, at the end of the output."""
        return self._step(self._held, final=True)

    def _step(self, text: str, *, final: bool) -> ReasoningSplit:
        self._held = ""
        reasoning: list[str] = []
        content: list[str] = []
        while text:
            if self._state == "opening":
                stripped = text.lstrip()
                if stripped.startswith(self.start_tag):
                    text = stripped[len(self.start_tag) :]
                    self._state = "reasoning"
                elif not final and len(text) < _MAX_OPENING and self.start_tag.startswith(stripped):
                    self._held = text
                    break
                else:
                    self._state = "reasoning" if self._in_reasoning else "content"
            elif self._state == "reasoning":
                at = text.find(self.end_tag)
                if at >= 0:
                    reasoning.append(text[:at])
                    text = text[at + len(self.end_tag) :]
                    self._state = "content"  # what follows is the answer as written ("\n\n" too, as vLLM)
                    continue
                keep = 0 if final else partial_marker(text, self.end_tag)
                reasoning.append(text[: len(text) - keep])
                self._held = text[len(text) - keep :]
                break
            else:
                content.append(text)
                break
        return ReasoningSplit("".join(reasoning), "".join(content))


def _deepseek_r1(*, prompt: str | None = None) -> ThinkTagReasoningParser:
    return ThinkTagReasoningParser(in_reasoning=True)


def _qwen3(*, prompt: str | None = None) -> ThinkTagReasoningParser:
    return ThinkTagReasoningParser(in_reasoning=prompt_opens_thought(prompt or ""))


def prompt_opens_thought(prompt: str, start: str = "<think>") -> bool:
    """Whether the rendered prompt ends inside an opened thought, so the output starts in reasoning."""
    return prompt.rstrip().endswith(start)


# Parsers by the names vLLM's --reasoning-parser uses; each takes the rendered prompt (keyword ``prompt``).
REASONING_PARSERS: dict[str, Callable[..., ThinkTagReasoningParser]] = {
    "deepseek_r1": _deepseek_r1,
    "qwen3": _qwen3,
}


def reasoning_parser(name: str, *, prompt: str | None = None) -> ThinkTagReasoningParser:
    """A new parser of the format ``name`` for one choice whose rendered prompt was ``prompt``."""
    try:
        factory = REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}"
        ) from None
    return factory(prompt=prompt)
