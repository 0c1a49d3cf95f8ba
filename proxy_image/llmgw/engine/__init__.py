"""The text side of an inference engine that speaks token ids (vLLM's and SGLang's gRPC servers).

Such an engine takes a prompt as token ids and streams generated token ids back; everything about text is
its client's job, as in vLLM's OpenAI server or the SMG router. This package is that job, without I/O: each
part is an object fed data that returns what may be sent, in the manner of h11. For one request:

1. **template** (:mod:`~llmgw.engine.chat_template`): the conversation and its tools become the prompt's
   text through the model's own chat template, rendered as transformers renders it;
2. **tokens** (:mod:`~llmgw.engine.tokenizer`): the model's tokenizer, from the files the engine hands
   out (:func:`read_tokenizer_archive`), turns the prompt into ids; the engine generates;
3. **detokenize and stop** (:mod:`~llmgw.engine.detokenize`): per choice, the generated ids become text
   deltas (never half a character, spaces as a whole decode writes them), cut at stop strings, stop
   tokens and end of sequence; text that may begin a stop string is held, never sent then retracted;
4. **reasoning** (:mod:`~llmgw.engine.reasoning`): a reasoning model's thought is split from its answer;
5. **tool calls** (:mod:`~llmgw.engine.tool_parsers`): calls the answer writes in the model's format become
   calls with a name and streamed arguments; the rest is content.

:class:`~llmgw.engine.choice.ChoicePipeline` runs stages 3 to 5 for one choice, and releases what each
holds when the choice ends.

Each stage holds back only what it cannot decide yet (a partial character, stop string, tag or marker)
and scans each character a bounded number of times, so a long output costs linear time.
"""

from llmgw.engine.chat_template import ChatTemplateError, render_chat_template, template_messages
from llmgw.engine.choice import ChoiceDelta, ChoicePipeline
from llmgw.engine.detokenize import ChoiceDecoder, Finish, IncrementalDetokenizer, Step, StopChecker
from llmgw.engine.reasoning import (
    REASONING_PARSERS,
    ReasoningSplit,
    ThinkTagReasoningParser,
    prompt_opens_thought,
    reasoning_parser,
)
from llmgw.engine.tokenizer import EngineTokenizer, TokenizerError, read_tokenizer_archive
from llmgw.engine.tool_parsers import (
    TOOL_PARSERS,
    ArgumentsDelta,
    ContentDelta,
    Event,
    ToolCall,
    ToolCallStart,
    ToolParser,
    tool_parser,
)

__all__ = [
    "REASONING_PARSERS",
    "TOOL_PARSERS",
    "ArgumentsDelta",
    "ChatTemplateError",
    "ChoiceDecoder",
    "ChoiceDelta",
    "ChoicePipeline",
    "ContentDelta",
    "EngineTokenizer",
    "Event",
    "Finish",
    "IncrementalDetokenizer",
    "ReasoningSplit",
    "Step",
    "StopChecker",
    "ThinkTagReasoningParser",
    "TokenizerError",
    "ToolCall",
    "ToolCallStart",
    "ToolParser",
    "prompt_opens_thought",
    "read_tokenizer_archive",
    "reasoning_parser",
    "render_chat_template",
    "template_messages",
    "tool_parser",
]
