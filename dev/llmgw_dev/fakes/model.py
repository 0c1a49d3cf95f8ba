"""The fake model behind the engine kinds (``vllm``, ``sglang``, ``trtllm``) and the ``vllm-http`` kind: a real
tokenizer, a Qwen3-like chat template and a deterministic "generation" over token ids.

**Tokenizer.** A byte-level BPE (Qwen2's pre-tokenizer regex and byte-level decoder, but no NFC normalizer:
any UTF-8 round-trips) trained with ``tokenizers`` on the small English corpus
``llmgw_dev/data/tokenizer_corpus.txt`` when the model is first built (about 15 ms, the same ids every run).
Special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` follow the BPE vocabulary, then the
ordinary (non-special) added tokens ``<tool_call>``, ``</tool_call>``, ``<think>``, ``</think>``, which survive
``skip_special_tokens`` as in Qwen3, then Qwen2-VL's special ``<|vision_start|>``, ``<|image_pad|>``,
``<|vision_end|>`` (the last ids: every other token keeps the id it had before them).
:meth:`FakeModel.files` are the model's files (``tokenizer.json``, ``tokenizer_config.json`` with the chat
template, ``config.json``, ``generation_config.json`` with the EOS ids); :meth:`FakeModel.tokenizer_zip` is
them as the deterministic ZIP archive an engine's ``GetTokenizer`` streams.

**Chat template.** Qwen3's layout: an optional system prompt, the tools in ``<tools></tools>`` with the
``<tool_call>`` instructions, user turns, assistant turns with ``tool_calls`` (thoughts before ``</think>``
dropped), tool results as ``<tool_response>`` in a user turn, and ``add_generation_prompt``. Thinking is off
unless ``enable_thinking`` is true (the template sets it to false when undefined, which routers read as a
thinking toggle that defaults off): the generation prompt then ends inside an open ``<think>\\n``; otherwise it
ends with the empty ``<think>\\n\\n</think>\\n\\n`` block. A message's ``content`` may be a list of parts
(Qwen2.5-VL's handling, any role): they render in order with nothing between them, a part of type "text" as
its text, a part of type "image" or "image_url" (or with an "image" or "image_url" key) as
``<|vision_start|><|image_pad|><|vision_end|>``, others as nothing; string content renders as it always did.

**Images** (``vision``, an option of the engines and of ``vllm-http``, not of the model: without it they refuse
images with "<model> is not a multimodal model"). :func:`image_facts` reads an image's format and size from its
header (PNG, JPEG's SOFn marker, GIF, WebP's VP8, VP8L and VP8X; anything else: ValueError "cannot identify
image file", PIL's words; no image library). :func:`image_tokens` is how many tokens it takes, as Qwen2-VL
counts them: ``ceil(height / 28) * ceil(width / 28)``, at least 1. :func:`fetch_media` resolves a media URL:
only ``data:<mime>;base64,<payload>`` (the fakes never go to the network); another scheme, a data URL that is
not base64 or bad base64 is a ValueError naming the allowed schemes or the fault. :meth:`FakeModel.expand` is
the prompt the model runs on: each ``<|image_pad|>`` anchor (one per image, in prompt order) repeated
``image_tokens`` times; the anchors and the images must be as many, at most :data:`MAX_IMAGES` (4) images, and
none may need more than :data:`ENCODER_BUDGET` (1024) tokens ("... exceeds the encoder budget of 1024 tokens"),
else ValueError. ``prompt_tokens``, the context length and the engines' prefix cache count the expanded prompt.

**Generation** (:meth:`FakeModel.generate`) reads the prompt ids back as text and answers:

- the subject is the last user turn's text (the whole prompt when it has no chat turns); when that turn is a
  tool result (``<tool_response>``) the subject is the result's text and no tool is called;
- **images**: with images, the model reads each ``<|vision_start|>...<|vision_end|>`` block of the prompt as
  the text ``a {width}x{height} {FORMAT} image`` of its image (the i-th block, the i-th image; FORMAT is PNG,
  JPEG, GIF or WEBP), set apart by one space from text next to it that does not already end or start with
  whitespace: parts [text "What is this?", a 4x2 PNG] read "What is this? a 4x2 PNG image", and the answer
  is "This is a fake reply to: What is this? a 4x2 PNG image ..."; two images in a row read "a 4x2 PNG
  image a 3x5 GIF image"; without images the prompt is read as text, as before;
- the answer is the other fakes' reply to the subject (:func:`~llmgw_dev.fakes.faults.make_reply`, ``words``
  words), then ``<|im_end|>`` (the EOS, in the output ids);
- **tool call trigger**: the system prompt declares tools (``<tools>``) and the last user message contains a
  declared tool's name: the answer is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  the arguments made from the tool's JSON schema (a string is the message's last capitalized word not
  opening a sentence, else its last word);
- **thinking trigger**: the prompt ends inside an open ``<think>`` (``enable_thinking``, or a raw prompt
  ending so): the output starts with a short reasoning, then ``\\n</think>\\n\\n`` and the answer;
- structured outputs: with a JSON schema the answer is an instance of it (made from the schema, strings
  as tool arguments are; an object schema without properties, json_object's, gets ``{"reply": ...}``),
  with choices the first of them; a tool-call array schema (``tool_choice: required``) thus calls the first
  tool; the reasoning, when thinking, comes first;
- choices: with temperature 0 every choice is the same; otherwise choice 0 without a seed is the plain
  answer, and any other (seed, index) shuffles its words deterministically (same seed, same text);
- ``max_tokens`` ("length"), the context length ("length"), ``stop`` strings (checked on the visible text
  once ``min_tokens`` are out; the output keeps the token that completed the string; ``matched_stop_str``),
  ``stop_token_ids`` and the extra EOS ids of ``generation_config.json`` (``matched_token_id``), EOS (no
  matched stop), ``min_tokens`` and ``ignore_eos`` (filler words instead of the EOS), ``logprobs``
  (negative floats from a hash, the sampled token first among ``k`` alternatives).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import dataclasses
import functools
import hashlib
import io
import json
import math
import random
import re
import struct
import zipfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmgw_dev.fakes.completions import example
from llmgw_dev.fakes.faults import make_reply

MODEL_TYPE: Final = "qwen3"
ARCHITECTURES: Final = ("Qwen3ForCausalLM",)
MAX_CONTEXT_LENGTH: Final = 8192
DEFAULT_SAMPLING: Final[Mapping[str, float | int]] = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
SPECIAL_TOKENS: Final = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ADDED_TOKENS: Final = ("<tool_call>", "</tool_call>", "<think>", "</think>")
VISION_TOKENS: Final = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")  # special, after the others
IMAGE_BLOCK: Final = (
    "<|vision_start|><|image_pad|><|vision_end|>"  # an image part, as the template renders it
)
PATCH: Final = 28  # an image token covers PATCH x PATCH pixels (Qwen2-VL: 14-pixel patches merged 2 x 2)
ENCODER_BUDGET: Final = 1024  # the most image tokens one image may have
MAX_IMAGES: Final = 4  # images one prompt may carry (vLLM's --limit-mm-per-prompt image=4)
_CORPUS: Final = Path(__file__).resolve().parents[1] / "data" / "tokenizer_corpus.txt"
_VOCAB_SIZE: Final = 1200  # the BPE's bound; the small corpus stops it earlier
# Qwen2's pre-tokenizer split.
_SPLIT: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_ZIP_TIME: Final = (2025, 1, 1, 0, 0, 0)
_FILLER: Final = " lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"
_TURN_RE: Final = re.compile(r"<\|im_start\|>(\w+)\n(.*?)(?:<\|im_end\|>|\Z)", re.S)
_TOOLS_RE: Final = re.compile(r"<tools>\n(.*?)\n</tools>", re.S)
_TOOL_RESPONSE_RE: Final = re.compile(r"<tool_response>\n(.*?)\n</tool_response>", re.S)
_VISION_RE: Final = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>", re.S)

CHAT_TEMPLATE: Final = """\
{%- macro render_content(content) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for part in content %}
            {%- if part is mapping and (part.type == 'image' or part.type == 'image_url' or 'image' in part
                or 'image_url' in part) %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif part is mapping and part.type == 'text' and part.text is string %}
                {{- part.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if enable_thinking is not defined %}
    {%- set enable_thinking = false %}
{%- endif %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render_content(messages[0].content) + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within " }}
    {{- "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": " }}
    {{- "<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking %}
        {{- '<think>\\n' }}
    {%- else %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


@dataclasses.dataclass(frozen=True, slots=True)
class Sampling:
    """What a request asks of generation (the engines' sampling parameters, normalized)."""

    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    temperature: float | None = None  # None: the model's default
    seed: int | None = None
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's and k alternatives
    json_schema: str | None = None  # structured output: the answer is an instance of this JSON schema
    choices: tuple[str, ...] = ()  # structured output: the answer is one of these (the first)


@dataclasses.dataclass(frozen=True, slots=True)
class Logprob:
    """One output position: the sampled token's logprob and the top alternatives (sampled token first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Generation:
    """One choice's output: its token ids (EOS and the stop token included) and why it stopped."""

    index: int
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" or "length"
    matched_token_id: int | None  # a stop token id (not the EOS) that ended generation
    matched_stop_str: str | None
    text: str  # the visible text: special tokens skipped, cut at the stop string
    logprobs: tuple[Logprob, ...] | None


@dataclasses.dataclass(frozen=True, slots=True)
class Prompt:
    """What the model reads in a prompt."""

    subject: str  # what the answer answers
    tools: tuple[Mapping[str, Any], ...]  # declared functions ({"name", "parameters", ...})
    tool: Mapping[str, Any] | None  # the function to call
    thinking: bool  # the prompt ends inside an open <think>


@dataclasses.dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the model sees of an image: its format (PIL's name: PNG, JPEG, GIF, WEBP) and size in pixels."""

    format: str
    width: int
    height: int

    def describe(self) -> str:
        """The image as the model reads it in a prompt: ``a 4x2 PNG image``."""
        return f"a {self.width}x{self.height} {self.format} image"


_NOT_AN_IMAGE: Final = "cannot identify image file"
# JPEG's start-of-frame markers (SOF0..SOF15 but DHT, JPG and DAC), which carry the frame's size.
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def image_facts(data: bytes) -> ImageFacts:
    """The format and size in an image's header (PNG, JPEG, GIF, WebP: VP8, VP8L, VP8X); ValueError
    ("cannot identify image file", PIL's words) for anything else, a truncated header or a zero size."""
    try:
        facts = _header(data)
    except (struct.error, IndexError):
        facts = None
    if facts is None or facts.width < 1 or facts.height < 1:
        raise ValueError(_NOT_AN_IMAGE)
    return facts


def _header(data: bytes) -> ImageFacts | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return ImageFacts("PNG", width, height)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        width, height = struct.unpack("<HH", data[6:10])
        return ImageFacts("GIF", width, height)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        chunk, body = data[12:16], data[20:]
        if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
            width, height = struct.unpack("<HH", body[6:10])
            return ImageFacts("WEBP", width & 0x3FFF, height & 0x3FFF)
        if chunk == b"VP8L" and body[:1] == b"\x2f":
            bits = int.from_bytes(body[1:5], "little")
            return ImageFacts("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        if chunk == b"VP8X" and len(body) >= 10:
            return ImageFacts(
                "WEBP", int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
            )
        return None
    if data[:2] == b"\xff\xd8":
        at = 2
        while at + 4 <= len(data):
            if data[at] != 0xFF:
                return None
            marker = data[at + 1]
            if marker == 0xFF:  # fill byte
                at += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # no length
                at += 2
                continue
            if marker in (0xD9, 0xDA):  # the end, or the scan before any frame
                return None
            (length,) = struct.unpack(">H", data[at + 2 : at + 4])
            if marker in _SOF:
                height, width = struct.unpack(">HH", data[at + 5 : at + 9])
                return ImageFacts("JPEG", width, height)
            at += 2 + length
    return None


def image_tokens(facts: ImageFacts) -> int:
    """How many ``<|image_pad|>`` an image's anchor expands to, as Qwen2-VL counts them: one per 28 x 28
    pixels, ``ceil(height / 28) * ceil(width / 28)``, at least 1."""
    return max(1, math.ceil(facts.height / PATCH) * math.ceil(facts.width / PATCH))


def fetch_media(url: str, schemes: Collection[str] = frozenset({"data"})) -> bytes:
    """The bytes behind a media URL. Only ``data:<mime>;base64,<payload>`` is fetched (the fakes never go to
    the network): any other scheme, or one not in ``schemes``, is a ValueError naming the allowed schemes, as
    is a data URL that is not base64 or whose payload is not valid base64."""
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower() if colon else ""
    allowed = sorted(s for s in schemes if s == "data")
    if scheme not in allowed:
        shown = f"{scheme}:" if scheme else repr(url[:40])
        raise ValueError(
            f"media URL scheme {shown} is not allowed: the allowed schemes are "
            f"{', '.join(allowed) or 'none'} (the fake engine never goes to the network)"
        )
    head, comma, payload = rest.partition(",")
    if not comma or not head.lower().endswith(";base64"):
        raise ValueError("Only base64 data URLs are supported for now.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the data URL's payload is not valid base64") from None


def _train() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(  # type: ignore[call-arg]
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tokenizer.train_from_iterator([_CORPUS.read_text(encoding="utf-8")], trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS])
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE's alphabet: each byte's printable stand-in (GPT-2's table)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _unit(*parts: object) -> float:
    """A deterministic float in [0, 1) from ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _f32(value: float) -> float:
    """``value`` rounded to float32, as an engine's logprobs are."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _json(value: Any) -> str:
    """JSON as Python's json.dumps writes it (HF's tojson): ", " and ": " separators, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class FakeModel:
    """The tokenizer, the template and the generation; see the module docstring. Build with :func:`load`."""

    def __init__(self, name: str = "fake-qwen3", words: int = 20) -> None:
        self.name = name
        self.words = words
        self.tokenizer = _train()
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        ids: dict[str, int] = {}
        for token in (*SPECIAL_TOKENS, *ADDED_TOKENS, *VISION_TOKENS):
            token_id = self.tokenizer.token_to_id(token)
            assert token_id is not None
            ids[token] = token_id
        self.endoftext_id: int = ids["<|endoftext|>"]
        self.eos_token_id: int = ids["<|im_end|>"]
        self.im_start_id: int = ids["<|im_start|>"]
        self.think_end_id: int = ids["</think>"]
        self.image_pad_id: int = ids["<|image_pad|>"]
        self.eos_token_ids: tuple[int, ...] = (self.eos_token_id,)  # config.json
        self.generation_eos_ids: tuple[int, ...] = (self.eos_token_id, self.endoftext_id)
        self.special_ids = frozenset(ids[t] for t in (*SPECIAL_TOKENS, *VISION_TOKENS))
        # The vocabulary before the vision tokens: logprobs' alternatives are drawn from it (as before them).
        self._text_vocab_size = ids[VISION_TOKENS[0]]
        self.max_context_length = MAX_CONTEXT_LENGTH
        self._filler = self.encode(_FILLER)
        inverse = {c: b for b, c in _bytes_to_unicode().items()}
        added = {*SPECIAL_TOKENS, *ADDED_TOKENS, *VISION_TOKENS}
        self.token_bytes: list[bytes] = []  # each id's bytes, for incremental decoding
        for token_id in range(self.vocab_size):
            token = self.tokenizer.id_to_token(token_id) or ""
            self.token_bytes.append(token.encode() if token in added else bytes(inverse[c] for c in token))
        self._env: Any = None
        self._zip: bytes | None = None

    # ---- tokens

    def encode(self, text: str) -> list[int]:
        """``text``'s ids, special tokens recognized, nothing added (no BOS)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    # ---- files

    def files(self) -> dict[str, bytes]:
        """The model's tokenizer and config files, by name."""
        added = {
            str(self.tokenizer.token_to_id(t)): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": t not in ADDED_TOKENS,
            }
            for t in (*SPECIAL_TOKENS, *ADDED_TOKENS, *VISION_TOKENS)
        }
        tokenizer_config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": self.max_context_length,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        config = {
            "architectures": list(ARCHITECTURES),
            "bos_token_id": self.endoftext_id,
            "eos_token_id": self.eos_token_id,
            "max_position_embeddings": self.max_context_length,
            "model_type": MODEL_TYPE,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "vocab_size": self.vocab_size,
        }
        generation_config = {
            "bos_token_id": self.endoftext_id,
            "do_sample": True,
            "eos_token_id": list(self.generation_eos_ids),
            "pad_token_id": self.endoftext_id,
            **DEFAULT_SAMPLING,
        }
        return {
            "tokenizer.json": self.tokenizer.to_str().encode(),
            "tokenizer_config.json": json.dumps(tokenizer_config, indent=2).encode(),
            "config.json": json.dumps(config, indent=2).encode(),
            "generation_config.json": json.dumps(generation_config, indent=2).encode(),
        }

    def save(self, directory: Path) -> None:
        """Write :meth:`files` into ``directory`` (created if missing): a model directory a router or
        ``transformers`` can load the tokenizer and chat template from."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            (directory / name).write_bytes(data)

    def tokenizer_zip(self) -> bytes:
        """:meth:`files` as a ZIP archive, byte for byte the same every run."""
        if self._zip is None:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                for name, data in self.files().items():
                    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    info.external_attr = 0o644 << 16
                    archive.writestr(info, data)
            self._zip = buffer.getvalue()
        return self._zip

    # ---- chat template

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        """The chat template rendered with jinja2, as transformers renders it (trim and lstrip blocks, HF's
        ``tojson``); ``kwargs`` are the template's (``enable_thinking``...)."""
        if self._env is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.filters["tojson"] = _tojson

            def raise_exception(message: str) -> None:
                raise ValueError(message)

            env.globals["raise_exception"] = raise_exception
            self._env = env.from_string(CHAT_TEMPLATE)
        context = {**kwargs, "messages": list(messages), "add_generation_prompt": add_generation_prompt}
        if tools:
            context["tools"] = list(tools)
        context.setdefault("eos_token", "<|im_end|>")
        return str(self._env.render(**context))

    # ---- images

    def expand(self, prompt_ids: Sequence[int], images: Sequence[ImageFacts]) -> list[int]:
        """The prompt the model runs on: each ``<|image_pad|>`` anchor of ``prompt_ids`` (one per image, in
        prompt order) repeated :func:`image_tokens` times for its image. ValueError when there are more than
        :data:`MAX_IMAGES` images, when the anchors and the images are not as many, or when an image needs
        more tokens than :data:`ENCODER_BUDGET`. Without images the prompt is as it is (a text prompt's
        ``<|image_pad|>`` is an ordinary special token)."""
        if not images:
            return list(prompt_ids)
        if len(images) > MAX_IMAGES:
            raise ValueError(f"At most {MAX_IMAGES} image(s) may be provided in one prompt.")
        anchors = sum(1 for t in prompt_ids if t == self.image_pad_id)
        if anchors != len(images):
            raise ValueError(
                f"The prompt has {anchors} image placeholder(s) (<|image_pad|>) but the request has "
                f"{len(images)} image(s)"
            )
        counts = [image_tokens(facts) for facts in images]
        for i, (facts, count) in enumerate(zip(images, counts, strict=True)):
            if count > ENCODER_BUDGET:
                raise ValueError(
                    f"The image item {i} ({facts.width}x{facts.height}) has {count} tokens, which exceeds "
                    f"the encoder budget of {ENCODER_BUDGET} tokens"
                )
        out: list[int] = []
        pending = iter(counts)
        for token in prompt_ids:
            if token == self.image_pad_id:
                out.extend([token] * next(pending))
            else:
                out.append(token)
        return out

    def _see(self, text: str, images: Sequence[ImageFacts]) -> str:
        """``text`` with each ``<|vision_start|>...<|vision_end|>`` block replaced by its image's description
        (:meth:`ImageFacts.describe`), set apart by one space from any text that does not already end or
        start with whitespace."""
        pieces = _VISION_RE.split(text)
        if len(pieces) - 1 != len(images):
            raise ValueError(
                f"The prompt has {len(pieces) - 1} image(s) (<|vision_start|>) but the request has "
                f"{len(images)} image(s)"
            )
        out = pieces[0]
        for facts, after in zip(images, pieces[1:], strict=True):
            if out and not out[-1].isspace():
                out += " "
            out += facts.describe()
            if after and not after[0].isspace():
                out += " "
            out += after
        return out

    # ---- generation

    def read(self, prompt_ids: Sequence[int], images: Sequence[ImageFacts] = ()) -> Prompt:
        """What the model reads in the prompt (see the module docstring); with ``images``, each vision block
        reads as its image's description."""
        text = self.decode(prompt_ids, skip_special_tokens=False)
        if images:
            text = self._see(text, images)
        turns = _TURN_RE.findall(text)
        thinking = text.rfind("<think>") > max(text.rfind("</think>"), text.rfind("<|im_end|>"))
        tools: list[Mapping[str, Any]] = []
        for role, content in turns:
            if role != "system":
                continue
            for block in _TOOLS_RE.findall(content):
                for line in block.splitlines():
                    try:
                        tool = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(tool, dict):
                        function = tool.get("function", tool)
                        if isinstance(function, dict) and isinstance(function.get("name"), str):
                            tools.append(function)
        users = [content for role, content in turns if role == "user"]
        if not turns:
            return Prompt(text.strip(), (), None, thinking)
        if not users:
            return Prompt("", tuple(tools), None, thinking)
        last = users[-1]
        results = _TOOL_RESPONSE_RE.findall(last)
        if results:
            return Prompt(" ".join(r.strip() for r in results), tuple(tools), None, thinking)
        tool = next((t for t in tools if t["name"] and t["name"] in last), None)
        return Prompt(last.strip(), tuple(tools), tool, thinking)

    def answer(
        self, prompt: Prompt, variant: tuple[int, int] | None = None, sampling: Sampling | None = None
    ) -> str:
        """The text the model means to write (before any stop), for one choice."""
        reply = make_reply(prompt.subject, self.words).text
        if variant is not None:
            head, tail = reply.split(":", 1) if ":" in reply else ("", reply)
            words = tail.split()
            random.Random(f"{variant[0]}:{variant[1]}").shuffle(words)
            variant_text = " ".join(words)
            if variant_text == tail.strip():  # too few words to shuffle: say which choice it is
                variant_text += f" (choice {variant[1]})"
            reply = f"{head}: {variant_text}" if head else variant_text
        if sampling is not None and sampling.choices:
            body = sampling.choices[0]
        elif sampling is not None and sampling.json_schema is not None:
            try:
                schema = json.loads(sampling.json_schema)
            except ValueError:
                raise ValueError(f"json_schema: not JSON: {sampling.json_schema[:100]!r}") from None
            if isinstance(schema, dict) and schema.get("type") == "object" and not schema.get("properties"):
                instance: Any = {"reply": reply}  # any object: json_object's answer
            else:
                instance = example(schema, self._value(prompt))
            body = _json(instance)
        elif prompt.tool is not None:
            arguments = example(prompt.tool.get("parameters") or {}, self._value(prompt))
            if not isinstance(arguments, dict):
                arguments = {}
            body = (
                f"<tool_call>\n{_json({'name': prompt.tool['name'], 'arguments': arguments})}\n</tool_call>"
            )
        else:
            body = reply
        if prompt.thinking:
            about = " ".join(prompt.subject.split()[:8])
            return f"The user wrote: {about}. I will answer briefly.\n</think>\n\n{body}"
        return body

    @staticmethod
    def _value(prompt: Prompt) -> str:
        """A string argument: the subject's last capitalized word not opening a sentence, else its last word."""
        tool_name = prompt.tool["name"] if prompt.tool is not None else None
        words, names = [], []
        opening = True
        for raw in prompt.subject.split():
            word = raw.strip(".,;:!?\"'()[]{}")
            if word and word != tool_name:
                words.append(word)
                if word[:1].isupper() and not opening:
                    names.append(word)
            opening = raw.endswith((".", "?", "!"))
        return names[-1] if names else words[-1] if words else "demo"

    def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, images: Sequence[ImageFacts] = ()
    ) -> list[Generation]:
        """The ``n`` choices for the prompt; raises ValueError for a prompt the model cannot take. With
        ``images`` (in prompt order), ``prompt_ids`` is the :meth:`expand`-ed prompt (the context length
        counts it), whose vision blocks read as the images."""
        if not prompt_ids:
            raise ValueError("The prompt cannot be empty")
        if len(prompt_ids) >= self.max_context_length:
            raise ValueError(
                f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum model length of "
                f"{self.max_context_length}. Make sure that `max_model_len` is no smaller than the number of "
                "text tokens."
            )
        if sampling.max_tokens is not None and sampling.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {sampling.max_tokens}.")
        if sampling.n < 1:
            raise ValueError(f"n must be at least 1, got {sampling.n}.")
        bad = [t for t in sampling.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids out of the vocabulary: {bad}")
        prompt = self.read(prompt_ids, images)
        temperature = (
            DEFAULT_SAMPLING["temperature"] if sampling.temperature is None else sampling.temperature
        )
        room = self.max_context_length - len(prompt_ids)
        limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
        out = []
        for index in range(sampling.n):
            variant: tuple[int, int] | None = None
            if temperature > 0 and (sampling.seed is not None or index > 0):
                variant = (sampling.seed if sampling.seed is not None else -1, index)
            planned = [*self.encode(self.answer(prompt, variant, sampling)), self.eos_token_id]
            out.append(self._run(index, planned, sampling, limit, variant))
        return out

    def _run(
        self,
        index: int,
        planned: list[int],
        sampling: Sampling,
        limit: int,
        variant: tuple[int, int] | None,
    ) -> Generation:
        stop_ids = set(sampling.stop_token_ids) | (set(self.generation_eos_ids) - {self.eos_token_id})
        ids: list[int] = []
        finish = "length"
        matched_id: int | None = None
        matched_str: str | None = None
        text = ""  # the visible text so far, when stop strings are looked for
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        cut: int | None = None
        filler = 0
        position = 0
        held_eos = False  # the EOS came before min_tokens: it comes again once they are out
        while len(ids) < limit:
            if position < len(planned):
                token = planned[position]
                position += 1
            elif held_eos and len(ids) >= sampling.min_tokens:
                token = self.eos_token_id
            else:
                token = self._filler[filler % len(self._filler)]
                filler += 1
            if token == self.eos_token_id and (sampling.ignore_eos or len(ids) < sampling.min_tokens):
                position = len(planned)  # the EOS is not sampled: more words instead
                held_eos = not sampling.ignore_eos
                continue
            ids.append(token)
            if len(ids) < sampling.min_tokens:
                continue
            if token == self.eos_token_id:
                finish = "stop"
                break
            if token in stop_ids:
                finish, matched_id = "stop", token
                break
            if sampling.stop:
                previous = len(text)
                if token not in self.special_ids:
                    text += decoder.decode(self.token_bytes[token])
                start = max(0, previous - max(len(s) for s in sampling.stop) + 1)
                found = [(text.find(s, start), s) for s in sampling.stop if s and text.find(s, start) >= 0]
                if found:
                    at, matched_str = min(found)
                    cut = at + len(matched_str) if sampling.include_stop_str_in_output else at
                    finish = "stop"
                    break
        visible = [t for t in ids if t not in self.special_ids and t != matched_id]
        final = self.decode(visible)
        if cut is not None:
            final = final[:cut]
        logprobs = None
        if sampling.logprobs is not None:
            logprobs = tuple(
                self._logprob(token, i, variant, sampling.logprobs) for i, token in enumerate(ids)
            )
        return Generation(index, tuple(ids), finish, matched_id, matched_str, final, logprobs)

    def _logprob(self, token: int, position: int, variant: object, top: int) -> Logprob:
        value = -0.02 - 1.2 * _unit("lp", token, position, variant)
        alternatives = [(token, value)]
        candidate = token
        step = 0
        while len(alternatives) < top:
            step += 1
            candidate = (candidate * 31 + 7 + step) % self._text_vocab_size
            if candidate in (t for t, _ in alternatives):
                continue
            alternatives.append((candidate, value - 0.5 * step - _unit("alt", token, position, step)))
        return Logprob(token, _f32(value), tuple((t, _f32(v)) for t, v in alternatives[: max(top, 0)]))

    def text_deltas(self, generation: Generation) -> list[str]:
        """The visible text each output token adds, as an incremental detokenizer streams it (a token that
        ends inside a UTF-8 character adds nothing until the character completes); they join to ``text``."""
        deltas = []
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        final = generation.text
        produced = 0
        for token in generation.token_ids:
            piece = ""
            if token not in self.special_ids and token != generation.matched_token_id:
                piece = decoder.decode(self.token_bytes[token])
            deltas.append(final[min(produced, len(final)) : min(produced + len(piece), len(final))])
            produced += len(piece)
        emitted = min(produced, len(final))
        if emitted < len(final):
            deltas[-1] += final[emitted:]
        return deltas


@functools.lru_cache(maxsize=8)
def load(name: str = "fake-qwen3", words: int = 20) -> FakeModel:
    """The model, built once per process for each (name, words)."""
    return FakeModel(name, words)
