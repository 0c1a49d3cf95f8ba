"""The engine text pipeline (llmgw.engine), without sockets: small real tokenizers built here with the
``tokenizers`` library, chat templates rendered as transformers renders them, and the tool-call and
reasoning parsers fed every way a stream may split their text."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import zipfile
from collections.abc import Iterator, Sequence
from typing import Any

import hypothesis
import pytest
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from llmgw.engine import (
    TOOL_PARSERS,
    ArgumentsDelta,
    ChatTemplateError,
    ChoiceDecoder,
    ChoiceDelta,
    ChoicePipeline,
    ContentDelta,
    EngineTokenizer,
    Finish,
    IncrementalDetokenizer,
    Step,
    StopChecker,
    ThinkTagReasoningParser,
    TokenizerError,
    ToolCall,
    ToolCallStart,
    read_tokenizer_archive,
    reasoning_parser,
    render_chat_template,
    tool_parser,
)
from llmgw.engine.detokenize import CONTEXT_TOKENS

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Tool calls: get_weather, get_time. The weather in Paris is sunny and 22 degrees.",
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    "Les élèves étudient à l'école. Ça va? Naïve café, déjà vu.",
    "日本語のテキストです。東京は晴れ。中文文本, 北京天气很好。한국어 텍스트",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 and combining: e\u0301 a\u0308 n\u0303",
    "def f(x):\n    return x * 2\n\nprint(f(21))",
] * 3
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>"]


def _files(tokenizer: Tokenizer, **extra: Any) -> dict[str, bytes]:
    files = {"tokenizer.json": tokenizer.to_str().encode()}
    for name, value in extra.items():
        files[name.replace("__", ".")] = value if isinstance(value, bytes) else json.dumps(value).encode()
    return files


def _byte_level() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    return tokenizer


def _sentencepiece(style: str) -> Tokenizer:
    """A SentencePiece-like BPE with byte fallback: Llama 2's layout (normalizer prepends and replaces
    spaces, the decoder strips the first space) or the Metaspace pre-tokenizer and decoder."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if style == "llama":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁")])
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(
        [line.replace(" ", "▁") for line in CORPUS] if style == "llama" else CORPUS, trainer
    )
    # Byte-fallback tokens, as a SentencePiece model has them: every byte is encodable.
    spec = json.loads(tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def qwen() -> EngineTokenizer:
    return EngineTokenizer.from_files(
        _files(
            _byte_level(),
            tokenizer_config__json={
                "eos_token": {"content": "<|im_end|>", "special": True},
                "chat_template": QWEN_TEMPLATE,
            },
            generation_config__json={"eos_token_id": [2, 0]},
        )
    )


@pytest.fixture(scope="module", params=["llama", "metaspace"])
def sentencepiece(request: pytest.FixtureRequest) -> EngineTokenizer:
    return EngineTokenizer.from_files(
        _files(
            _sentencepiece(request.param), special_tokens_map__json={"bos_token": "<s>", "eos_token": "</s>"}
        )
    )


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_files(qwen: EngineTokenizer) -> None:
    assert qwen.eos_token == "<|im_end|>"
    assert qwen.eos_token_ids == {qwen.token_id("<|im_end|>"), qwen.token_id("<|endoftext|>")}
    assert qwen.special_token_ids == {qwen.token_id(t) for t in SPECIAL}
    assert qwen.token_id("<tool_call>") not in qwen.special_token_ids  # added, not special (as in Qwen)
    ids = qwen.encode("<|im_start|>user\nHi<|im_end|>")
    assert ids[0] == qwen.token_id("<|im_start|>") and ids[-1] == qwen.token_id("<|im_end|>")
    assert qwen.decode(ids) == "<|im_start|>user\nHi<|im_end|>"
    assert qwen.decode(ids, skip_special_tokens=True) == "user\nHi"
    assert qwen.chat_template() == QWEN_TEMPLATE


def test_tokenizer_templates_and_errors() -> None:
    files = _files(
        _byte_level(),
        tokenizer_config__json={
            "bos_token": "<|endoftext|>",
            "chat_template": [{"name": "default", "template": "A"}, {"name": "tool_use", "template": "T"}],
        },
        generation_config__json={"eos_token_id": 1},
    )
    tok = EngineTokenizer.from_files(files)
    assert tok.bos_token == "<|endoftext|>" and tok.eos_token is None and tok.eos_token_ids == {1}
    assert (tok.chat_template(), tok.chat_template(with_tools=True), tok.chat_template("tool_use")) == (
        "A",
        "T",
        "T",
    )
    with pytest.raises(TokenizerError, match="no chat template named 'rag'"):
        tok.chat_template("rag")
    files["chat_template.jinja"] = b"J"
    assert EngineTokenizer.from_files(files).chat_template() == "J"
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        EngineTokenizer.from_files({"tokenizer_config.json": b"{}"})
    with pytest.raises(TokenizerError, match=r"tokenizer\.json cannot be loaded"):
        EngineTokenizer.from_files({"tokenizer.json": b"{not json"})
    with pytest.raises(TokenizerError, match="eos_token_id"):
        EngineTokenizer.from_files({**files, "generation_config.json": b'{"eos_token_id": "x"}'})


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return out.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_tokenizer_archive() -> None:
    data = _zip({"model/tokenizer.json": b"{}", "model/tokenizer_config.json": b"{}", "model/": b""})
    assert read_tokenizer_archive(data, _sha(data).upper(), max_bytes=100) == {
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
    }
    with pytest.raises(TokenizerError, match="SHA-256"):
        read_tokenizer_archive(data, _sha(b"other"), max_bytes=100)
    many = _zip({f"f{i}.json": b"{}" for i in range(51)})
    with pytest.raises(TokenizerError, match="51 entries"):
        read_tokenizer_archive(many, _sha(many), max_bytes=10**6)
    bomb = _zip({"tokenizer.json": b"\0" * 5_000_000})
    assert len(bomb) < 10_000
    with pytest.raises(TokenizerError, match="more than 1000000 bytes"):
        read_tokenizer_archive(bomb, _sha(bomb), max_bytes=1_000_000)
    for name in ("../tokenizer.json", "a/../../etc/passwd", "/etc/passwd", "C:\\x.json", "..\\x.json"):
        bad = _zip({name: b"{}"})
        with pytest.raises(TokenizerError, match=r"absolute|climbs"):
            read_tokenizer_archive(bad, _sha(bad), max_bytes=100)
    twice = _zip({"a/tokenizer.json": b"{}", "b/tokenizer.json": b"{}"})
    with pytest.raises(TokenizerError, match="two files"):
        read_tokenizer_archive(twice, _sha(twice), max_bytes=100)
    with pytest.raises(TokenizerError, match="not a readable ZIP"):
        read_tokenizer_archive(b"nope", _sha(b"nope"), max_bytes=100)


def test_tokenizer_archive_sizes_counted_while_reading() -> None:
    """A bomb that understates its sizes in the headers is caught by the bytes actually read."""
    data = bytearray(_zip({"tokenizer.json": b"\0" * 100_000}))
    # Patch both the local header's and the central directory's uncompressed size to 10 bytes.
    local = data.index(b"PK\x03\x04")
    data[local + 22 : local + 26] = (10).to_bytes(4, "little")
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (10).to_bytes(4, "little")
    blob = bytes(data)
    with pytest.raises(TokenizerError):  # cut at the declared size, then the CRC is wrong: unreadable
        read_tokenizer_archive(blob, _sha(blob), max_bytes=1000)


# ------------------------------------------------------------------------------------------- detokenizer


def _incremental(tok: EngineTokenizer, ids: Sequence[int], batch: int = 1, **options: Any) -> list[str]:
    """The deltas of ``ids`` fed ``batch`` at a time (an engine message's ids, or several messages')."""
    detokenizer = IncrementalDetokenizer(tok, **options)
    deltas = [detokenizer.feed(ids[i : i + batch]) for i in range(0, len(ids), batch)]
    deltas.append(detokenizer.flush())
    return deltas


TEXTS = st.lists(
    st.one_of(
        st.sampled_from(
            [*"abc xyz.,!\n\t", "hello", " world", "😀", "👍🏽", "🇫🇷", "東京", "é", "e\u0301", "한"]
        ),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=30,
).map("".join)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(text=TEXTS, batch=st.integers(1, 70))
def test_incremental_decode_is_the_whole_decode(qwen: EngineTokenizer, text: str, batch: int) -> None:
    ids = qwen.encode(text)
    deltas = _incremental(qwen, ids, batch)
    assert "".join(deltas) == qwen.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(text=TEXTS, batch=st.integers(1, 70))
def test_incremental_decode_sentencepiece(sentencepiece: EngineTokenizer, text: str, batch: int) -> None:
    ids = sentencepiece.encode(text)
    deltas = _incremental(sentencepiece, ids, batch)
    whole = sentencepiece.decode(ids)
    assert "".join(deltas) == whole
    if "\ufffd" not in whole:
        assert not any("\ufffd" in d for d in deltas)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(data=st.data(), skip=st.booleans())
def test_incremental_decode_of_any_ids(
    qwen: EngineTokenizer, sentencepiece: EngineTokenizer, data: st.DataObject, skip: bool
) -> None:
    """Ids a model may produce in any order (half characters, bytes that never complete, specials).

    Except SentencePiece byte tokens in an order that is not UTF-8: its decoder makes each byte of such a
    run U+FFFD, also the valid beginning already sent (as with vLLM); a byte-level BPE has no such rule."""
    for tok in (qwen, sentencepiece):
        byte_tokens = {tok.token_id(f"<0x{b:02X}>") for b in range(256)} if tok is sentencepiece else set()
        ids = [
            i
            for i in data.draw(st.lists(st.integers(0, tok.vocab_size + 2), max_size=30))
            if i not in byte_tokens
        ]
        batch = data.draw(st.integers(1, 40))
        deltas = _incremental(tok, ids, batch, skip_special_tokens=skip)
        assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


def test_spaces_at_token_boundaries(sentencepiece: EngineTokenizer) -> None:
    text = "Hello world, the weather in Paris"
    ids = sentencepiece.encode(text)
    deltas = _incremental(sentencepiece, ids)
    assert "".join(deltas) == text
    assert any(d.startswith(" ") for d in deltas)  # a word's space comes with it, not lost at the boundary


def test_special_tokens_in_text(qwen: EngineTokenizer) -> None:
    ids = qwen.encode("<|im_start|>hi<tool_call>x<|im_end|>")
    assert "".join(_incremental(qwen, ids)) == "hi<tool_call>x"
    assert (
        "".join(_incremental(qwen, ids, skip_special_tokens=False)) == "<|im_start|>hi<tool_call>x<|im_end|>"
    )
    spaced = "".join(_incremental(qwen, ids, skip_special_tokens=False, spaces_between_special_tokens=True))
    assert spaced == "<|im_start|> hi<tool_call>x <|im_end|>"


def test_half_characters_are_held(qwen: EngineTokenizer) -> None:
    ids = qwen.encode("😀")
    assert len(ids) > 1  # byte-level: the emoji is several tokens
    deltas = _incremental(qwen, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and "".join(deltas) == "😀"


# ------------------------------------------------------------------------------------------------- stops


def _stop_run(
    pieces: Sequence[str], stop: Sequence[str], include: bool = False
) -> tuple[list[str], str | None]:
    checker = StopChecker(stop, include_stop_str_in_output=include)
    out = [checker.feed(p) for p in pieces]
    out.append(checker.flush())
    return out, checker.matched


def test_stop_strings_across_pieces() -> None:
    out, matched = _stop_run(["Hello ST", "O", "P there"], ["STOP"])
    assert out == ["Hello ", "", "", ""] and matched == "STOP"
    out, matched = _stop_run(["Hello ST", "O", "P there"], ["STOP"], include=True)
    assert "".join(out) == "Hello STOP" and matched == "STOP"
    out, matched = _stop_run(["a S", "TO", "x b"], ["STOP"])  # a near miss is released
    assert out == ["a ", "", "STOx b", ""] and matched is None
    out, matched = _stop_run(["end S", "T"], ["STOP"])  # the stream ends on a partial match: flush
    assert out == ["end ", "", "ST"] and matched is None
    out, matched = _stop_run(["x yz abc"], ["abc", "yz"])  # the earliest match wins
    assert out == ["x ", ""] and matched == "yz"


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    text=st.text(alphabet="abS T", max_size=30),
    stops=st.lists(st.text(alphabet="abS T", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_stop_strings_any_split(text: str, stops: list[str], cuts: list[int]) -> None:
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    out, matched = _stop_run(pieces, stops)
    # the stop string that completes first, then the one that starts first
    first = min(
        ((text.find(s), s) for s in stops if s in text),
        default=None,
        key=lambda f: (f[0] + len(f[1]), f[0]),
    )
    if first is None:
        assert "".join(out) == text and matched is None
    else:
        assert "".join(out) == text[: first[0]] and matched is not None
        assert text.find(matched) == first[0]
    # Nothing sent is ever part of a stop string that completes later (no retraction).
    sent = ""
    for piece in out:
        sent += piece
        assert all(not text.startswith(sent) or s not in sent for s in stops)


def test_choice_decoder_stops(qwen: EngineTokenizer) -> None:
    eos = qwen.token_id("<|im_end|>")
    assert eos is not None
    ids = qwen.encode("Hello world. The end")
    decoder = ChoiceDecoder(qwen)
    steps = [decoder.feed([i]) for i in [*ids, eos, *qwen.encode("more")]]
    assert "".join(s.text for s in steps) == "Hello world. The end"
    assert steps[len(ids)].finish == Finish("stop", None) and decoder.tokens == len(ids) + 1

    decoder = ChoiceDecoder(qwen, stop=["world"])
    text = "".join(decoder.feed([i]).text for i in ids)
    assert text == "Hello " and decoder.finish == Finish("stop", "world")

    decoder = ChoiceDecoder(qwen, stop=["The end!"])  # held back, then released by flush
    step = decoder.feed(ids)
    assert step.text == "Hello world. " and step.finish is None
    assert decoder.flush() == "The end" and decoder.finish is None

    decoder = ChoiceDecoder(qwen, ignore_eos=True, skip_special_tokens=False, max_tokens=len(ids) + 2)
    step = decoder.feed([*ids, eos, *qwen.encode("xyz")])
    assert step.text.startswith("Hello world. The end<|im_end|>") and step.finish == Finish("length")

    stop_id = qwen.token_id("<|endoftext|>")
    assert stop_id is not None
    decoder = ChoiceDecoder(qwen, stop_token_ids=[stop_id], ignore_eos=True)
    assert decoder.feed([*ids, stop_id]) == Step("Hello world. The end", Finish("stop", stop_id))
    decoder = ChoiceDecoder(qwen, stop=["end"], stop_token_ids=[stop_id])  # the stop string in flushed text
    assert decoder.feed([*ids]).text == "Hello world. The "
    assert decoder.finish == Finish("stop", "end")


def _decoded(decoder: ChoiceDecoder, ids: Sequence[int], batch: int) -> tuple[str, Finish | None]:
    text = "".join(decoder.feed(ids[i : i + batch]).text for i in range(0, len(ids), batch))
    return text + decoder.flush(), decoder.finish


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    text=st.text(alphabet="ab T.é😀", max_size=40),
    stops=st.lists(st.text(alphabet="ab T", min_size=1, max_size=3), max_size=2),
    max_tokens=st.none() | st.integers(1, 40),
    end=st.sampled_from(["eos", "stop_id", None]),
    include=st.booleans(),
    batch=st.integers(2, 50),
)
def test_choice_decoder_same_whatever_the_batches(
    qwen: EngineTokenizer,
    text: str,
    stops: list[str],
    max_tokens: int | None,
    end: str | None,
    include: bool,
    batch: int,
) -> None:
    """Ids fed as the engine's messages come (one each) or as a batch of several messages give the same
    text and finish."""
    eos, stop_id = qwen.token_id("<|im_end|>"), qwen.token_id("<|endoftext|>")
    assert eos is not None and stop_id is not None
    ending = {"eos": [eos], "stop_id": [stop_id], None: []}[end]
    ids = [*qwen.encode(text), *ending, *qwen.encode(" more")]

    def decoder() -> ChoiceDecoder:
        return ChoiceDecoder(
            qwen,
            stop=stops,
            stop_token_ids=[stop_id],
            max_tokens=max_tokens,
            include_stop_str_in_output=include,
        )

    assert _decoded(decoder(), ids, batch) == _decoded(decoder(), ids, 1)


# ---------------------------------------------------------------------------------------- chat templates

QWEN_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Météo d'une ville",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_qwen_template_with_tools() -> None:
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Zürich?"}],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18°C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
    ]
    prompt = render_chat_template(QWEN_TEMPLATE, messages, tools=[WEATHER_TOOL])
    expected = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Météo d\'une ville", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in\nZürich?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18°C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt == expected


def test_qwen_template_without_tools() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_chat_template(QWEN_TEMPLATE, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    messages.append({"role": "assistant", "content": "Hello there  "})
    assert render_chat_template(
        QWEN_TEMPLATE, messages, add_generation_prompt=False, continue_final_message=True
    ) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there  "
    )


def test_template_semantics() -> None:
    def render(template: str, **kwargs: Any) -> str:
        return render_chat_template(template, [{"role": "user", "content": "x"}], **kwargs)

    assert render("{{ {'é': [1, 2]} | tojson }}") == '{"é": [1, 2]}'
    assert (
        render("{{ {'b': 1, 'a': '<&>'} | tojson(indent=2, sort_keys=true) }}")
        == '{\n  "a": "<&>",\n  "b": 1\n}'
    )
    assert render("{{ [1, 2] | tojson(separators=(',', ':')) }}") == "[1,2]"
    assert render("{{ 'é' | tojson(ensure_ascii=true) }}") == '"\\u00e9"'
    # trim_blocks and lstrip_blocks: block tags leave no newline or indentation behind
    assert (
        render("{% for m in messages %}\n  {% if true %}\n{{ m.content }}\n  {% endif %}\n{% endfor %}")
        == "x\n"
    )
    assert render("{% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}") == "1"
    assert (
        render("{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}", bos_token="<s>") == "<s>||True"
    )
    assert render("{{ enable_thinking }}", template_kwargs={"enable_thinking": False}) == "False"
    assert render("{{ messages | length }}", template_kwargs={"messages": "replaced?"}) == "1"
    assert len(render("{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render("{% generation %}{{ 'kept' }}{% endgeneration %}") == "kept"
    assert render("{{ tools is none }} {{ documents is none }}") == "True True"


def test_template_errors() -> None:
    def render(template: str) -> str:
        return render_chat_template(template, [{"role": "user", "content": "x"}])

    with pytest.raises(ChatTemplateError, match="refused the conversation: Only user and assistant"):
        render("{{ raise_exception('Only user and assistant roles are supported!') }}")
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render("{{ ''.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render("{{ messages.append(1) }}")  # immutable: the template cannot change the conversation
    with pytest.raises(ChatTemplateError, match="sandbox"):
        render("{{ cycler.__init__.__globals__ }}")
    with pytest.raises(ChatTemplateError, match="undefined"):
        render("{{ nothing.here }}")
    with pytest.raises(ChatTemplateError, match=r"does not compile \(line 1\)"):
        render("{% if %}")
    parts = [{"type": "text", "text": "a"}, "b", {"type": "refusal", "refusal": "no"}]
    assert (
        render_chat_template("{{ messages[0].content }}", [{"role": "assistant", "content": parts}])
        == "a\nb\nno"
    )
    with pytest.raises(ChatTemplateError, match="cannot carry images"):
        render_chat_template(
            "{{ messages }}",
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:..."}}]}],
        )
    with pytest.raises(ChatTemplateError, match="cannot both be set"):
        render_chat_template("x", [{"role": "assistant", "content": "a"}], continue_final_message=True)


# -------------------------------------------------------------------------------------------- tool calls


def _ids() -> Iterator[str]:
    n = 0
    while True:
        n += 1
        yield f"call_{n}"


def _collect(events: Sequence[Any]) -> tuple[str, list[ToolCall]]:
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    calls: list[ToolCall] = []
    for e in events:
        if isinstance(e, ToolCallStart):
            assert e.index == len(calls)
            calls.append(ToolCall(e.id, e.name, ""))
        elif isinstance(e, ArgumentsDelta):
            call = calls[e.index]
            calls[e.index] = ToolCall(call.id, call.name, call.arguments + e.text)
    return content, calls


def _stream(name: str, pieces: Sequence[str], **options: Any) -> tuple[str, list[ToolCall]]:
    counter = _ids()
    parser = TOOL_PARSERS[name](new_id=lambda: next(counter), **options)
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    return _collect(events)


def _splits(text: str) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    for size in (3, 7):
        yield [text[i : i + size] for i in range(0, len(text), size)]


def _check_every_split(name: str, text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    counter = _ids()
    unary = TOOL_PARSERS[name].parse(text, new_id=lambda: next(counter))
    assert unary[0] == content
    assert [(c.name, c.arguments) for c in unary[1]] == calls
    for pieces in _splits(text):
        streamed_content, streamed_calls = _stream(name, pieces)
        assert [(c.name, c.arguments) for c in streamed_calls] == calls, pieces
        expected_content = content or ""
        assert streamed_content == expected_content or (calls and not streamed_content.strip()), pieces
    for call in unary[1]:
        json.loads(call.arguments)


HERMES_CASES = [
    (
        '<tool_call>\n{"name": "get_current_weather", "arguments": {"city": "Dallas", "state": "TX", "unit": '
        '"fahrenheit"}}\n</tool_call>',
        None,
        [("get_current_weather", '{"city": "Dallas", "state": "TX", "unit": "fahrenheit"}')],
    ),
    (
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京 \\"x\\" {}"}}\n'
        '</tool_call>\n<tool_call>\n{"arguments": {"n": [1, {"a": null}]}, "name": "count"}\n</tool_call>',
        "Let me check both.\n",
        [("get_weather", '{"city": "東京 \\"x\\" {}"}'), ("count", '{"n": [1, {"a": null}]}')],
    ),
    ('<tool_call>{"name": "now", "arguments": {}}</tool_call> Done.', "Done.", [("now", "{}")]),
    ('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', None, [("f", '{"a": 1}')]),
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n', None, [("f", '{"a": 1}')]),  # no closing tag
    ("No tools here, just <tool> talk and a < sign.", "No tools here, just <tool> talk and a < sign.", []),
    # Malformed: left as content, whole.
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}, oops}\n</tool_call>', None, []),
    ('<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>', None, []),
    ('<tool_call>\n{"name": "f", "arguments": {"a": tru}}\n</tool_call>', None, []),
    ('<tool_call>\n{"name": "f", "arguments": {"a": ', None, []),
    ('<tool_call>\n{"name": "f", "arguments": [1, 2]}\n</tool_call>', None, []),  # never announced
    ('<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>', None, []),
]


@pytest.mark.parametrize(("text", "content", "calls"), HERMES_CASES)
def test_hermes(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    if not calls and content is None:
        content = text  # malformed: the whole text is content
        # Streaming announces a call once its name and arguments key are read; a break after that cannot
        # be withdrawn, so only the unary reading is checked for those.
        assert TOOL_PARSERS["hermes"].parse(text) == (text, [])
        if '"name": "f", "arguments": {' in text:
            return
    _check_every_split("hermes", text, content, calls)


def test_hermes_streaming_timing() -> None:
    parser = tool_parser("hermes")
    assert parser.feed("Hi <tool") == [ContentDelta("Hi ")]
    assert parser.feed("_call>\n{") == []
    assert parser.feed('"name": "get_weather", ') == []
    events = parser.feed('"arguments": {"city": "Pa')
    assert (
        isinstance(events[0], ToolCallStart) and events[0].id.startswith("call_") and len(events[0].id) == 29
    )
    assert events[1:] == [ArgumentsDelta(0, '{"city": "Pa')]
    assert parser.feed('ris"}') == [ArgumentsDelta(0, 'ris"}')]
    assert parser.feed("}\n</tool_call>") == []
    assert parser.finish() == []
    parser = tool_parser("hermes")
    assert parser.feed("a <tool") == [ContentDelta("a ")]
    assert parser.feed("box>") == [ContentDelta("<toolbox>")]


def test_tool_names_hook() -> None:
    text = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    assert TOOL_PARSERS["hermes"].parse(text, tool_names={"get_weather"}) == (text, [])
    for pieces in _splits(text):
        assert _stream("hermes", pieces, tool_names={"get_weather"}) == (text, [])
    assert TOOL_PARSERS["hermes"].parse(text, tool_names={"rm_rf"})[1][0].name == "rm_rf"


LLAMA_CASES = [
    (
        '{"name": "get_current_weather", "parameters": {"city": "San Francisco", "state": "CA", "unit": '
        '"fahrenheit"}}',
        None,
        [("get_current_weather", '{"city": "San Francisco", "state": "CA", "unit": "fahrenheit"}')],
    ),
    (
        '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"type": "function", "name": "b", "arguments": '
        '{"y": "z;"}}',
        None,
        [("a", '{"x": 1}'), ("b", '{"y": "z;"}')],
    ),
    ('  {"name": "a", "parameters": {}} and then text', "and then text", [("a", "{}")]),
    ("The answer is 42.", "The answer is 42.", []),
    ('{"name": "Bob", "age": 42}', '{"name": "Bob", "age": 42}', []),  # JSON as an answer stays content
    ('{"answer": [1, 2]}', '{"answer": [1, 2]}', []),
    ("<|python_tag|>brave_search.call(query='x')", "<|python_tag|>brave_search.call(query='x')", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), LLAMA_CASES)
def test_llama3_json(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    _check_every_split("llama3_json", text, content, calls)


MISTRAL_CASES = [
    (
        '[TOOL_CALLS][{"name": "add", "arguments":{"a": 3.5, "b": 4}}, {"name": "get_current_weather", '
        '"arguments":{"city": "San Francisco", "state": "CA", "unit": "celsius"}}]',
        None,
        [
            ("add", '{"a": 3.5, "b": 4}'),
            ("get_current_weather", '{"city": "San Francisco", "state": "CA", "unit": "celsius"}'),
        ],
    ),
    (
        '[TOOL_CALLS]get_current_weather[ARGS]{"city": "San Francisco", "state": "CA"}[TOOL_CALLS]add[ARGS]'
        '{"a": 1, "b": [2]}',
        None,
        [("get_current_weather", '{"city": "San Francisco", "state": "CA"}'), ("add", '{"a": 1, "b": [2]}')],
    ),
    ('Sure. [TOOL_CALLS] [{"name": "f", "arguments": {}}]', "Sure. ", [("f", "{}")]),
    ("[TOOL_CALLS] not really", "[TOOL_CALLS] not really", []),
    ("Use [TOOL] tags [TOOL_CALLS", "Use [TOOL] tags [TOOL_CALLS", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), MISTRAL_CASES)
def test_mistral(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    _check_every_split("mistral", text, content, calls)


def test_mistral_ids_and_flags() -> None:
    content, calls = TOOL_PARSERS["mistral"].parse('[TOOL_CALLS]f[ARGS]{"a": 1}')
    assert content is None and len(calls[0].id) == 9 and calls[0].id.isalnum()
    text = '[TOOL_CALLS]f[CALL_ID]abc123XYZ[ARGS]{"a": 1}[TOOL_CALLS]g[CALL_ID]k2[ARGS]{}'
    for pieces in _splits(text):
        assert _stream("mistral", pieces) == (
            "",
            [ToolCall("abc123XYZ", "f", '{"a": 1}'), ToolCall("k2", "g", "{}")],
        )
    bad = '[TOOL_CALLS]f[CALL_ID]no way![ARGS]{"a": 1}'
    assert TOOL_PARSERS["mistral"].parse(bad) == (bad, [])
    assert TOOL_PARSERS["mistral"].needs_special_tokens and not TOOL_PARSERS["hermes"].needs_special_tokens
    with pytest.raises(
        ValueError, match="unknown tool parser 'nope'; known: hermes, llama3_json, llama4_json, mistral"
    ):
        tool_parser("nope")


# Pieces of the three formats, near-calls and plain text: random strings of them are mostly broken calls.
FRAGMENTS = [
    *("<tool_call>", "</tool_call>", "<tool", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[TOOL"),
    *("{", "}", "[", "]", '"name"', '"arguments"', '"parameters"', ": ", ", ", ";", '"f"', '"x\\"y"'),
    *("1", "tru", "true", " ", "\n", "x", '"', "\\", "é😀"),
]


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    name=st.sampled_from(sorted(TOOL_PARSERS)),
    text=st.lists(st.sampled_from(FRAGMENTS), max_size=25).map("".join),
    cuts=st.lists(st.integers(0, 200), max_size=8),
)
def test_tool_parsers_never_lose_text(name: str, text: str, cuts: list[int]) -> None:
    """Whatever the text, content and calls are the same however it is split, and nothing but markers
    and the whitespace around calls is dropped."""
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    content, calls = _stream(name, pieces, stream_arguments=False)
    whole_content, whole_calls = _stream(name, [text], stream_arguments=False)
    assert (content, calls) == (whole_content, whole_calls)
    if not calls:
        assert content == text or content == text.lstrip()
    content, calls = _stream(name, pieces)  # streamed: a call announced before it broke stands
    if not calls:
        assert content == text or content == text.lstrip()


# ------------------------------------------------------------------------------------------------ reasoning

REASONING_CASES = [
    # (in_reasoning, text, reasoning, content)
    # the answer as written after </think>, its opening "\n\n" too (as vLLM's parsers and SMG keep it)
    (
        False,
        "<think>\nLet me think.\n</think>\n\nThe answer is 4.",
        "\nLet me think.\n",
        "\n\nThe answer is 4.",
    ),
    (True, "Let me think.\n</think>\n\nThe answer is 4.", "Let me think.\n", "\n\nThe answer is 4."),
    (True, "<think>Hmm</think>4", "Hmm", "4"),  # an opening tag the prompt also wrote
    (True, "Still thinking about <thi", "Still thinking about <thi", None),  # never closed: all reasoning
    (False, "Plain answer, no thought. </think>?", None, "Plain answer, no thought. </think>?"),
    (False, "<think></think>Empty", None, "Empty"),
    (False, "  <th", None, "  <th"),
]


@pytest.mark.parametrize(("in_reasoning", "text", "reasoning", "content"), REASONING_CASES)
def test_reasoning(in_reasoning: bool, text: str, reasoning: str | None, content: str | None) -> None:
    assert ThinkTagReasoningParser.parse(text, in_reasoning=in_reasoning) == (reasoning, content)
    for pieces in _splits(text):
        parser = ThinkTagReasoningParser(in_reasoning=in_reasoning)
        splits = [parser.feed(p) for p in pieces] + [parser.finish()]
        assert "".join(s.reasoning for s in splits) == (reasoning or ""), pieces
        assert "".join(s.content for s in splits) == (content or ""), pieces


def test_reasoning_holds_partial_tags_and_reads_the_prompt() -> None:
    parser = reasoning_parser("qwen3", prompt="<|im_start|>assistant\n<think>\n")
    assert parser.feed("I should add. </thi").reasoning == "I should add. "
    split = parser.feed("nk>\n\n4")
    assert (split.reasoning, split.content) == ("", "\n\n4")
    parser = reasoning_parser("qwen3", prompt="<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert parser.feed("<thin").content == "" and parser.feed("g>").content == "<thing>"
    assert reasoning_parser("deepseek_r1").feed("thought").reasoning == "thought"
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        reasoning_parser("o1")


def test_hermes_call_broken_after_it_was_announced() -> None:
    """Streaming: a call announced, its arguments sent, then broken JSON: the call stands, and the text
    after its arguments is content (when the break comes in the same delta as the start, it is all
    content)."""
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}, oops}\n</tool_call>'
    for pieces in _splits(text):
        content, calls = _stream("hermes", pieces)
        if calls:
            assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
            assert content == ", oops}\n</tool_call>"
        else:  # the break arrived with the arguments: never announced, all content
            assert content == text


# -------------------------------------------------------------------------------------------- the pipeline


def test_window_stays_short_on_endless_invalid_bytes(qwen: EngineTokenizer) -> None:
    lone = [i for i in range(qwen.vocab_size) if qwen.decode([i]) == "\ufffd"]
    ids = [lone[0]] * 300 + qwen.encode("ok 😀") + [lone[-1]] * 7
    deltas = _incremental(qwen, ids)
    assert "".join(deltas) == qwen.decode(ids)
    assert max(len(d) for d in deltas) <= 64


def test_special_tokens_map(qwen: EngineTokenizer) -> None:
    files = _files(
        _byte_level(),
        tokenizer_config__json={"eos_token": "<|im_end|>", "pad_token": {"content": "<|endoftext|>"}},
        special_tokens_map__json={"unk_token": "<|endoftext|>"},
    )
    tok = EngineTokenizer.from_files(files)
    assert tok.special_tokens_map == {
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    assert (
        render_chat_template("{{ pad_token }}", [], template_kwargs=tok.special_tokens_map) == "<|endoftext|>"
    )


def test_pipeline_ids_to_reasoning_content_and_calls(qwen: EngineTokenizer) -> None:
    """What a provider does with one Qwen 3 choice: ids through the decoder, the reasoning parser and the
    hermes parser, token by token; ids after the end are ignored."""
    prompt = (
        render_chat_template(QWEN_TEMPLATE, [{"role": "user", "content": "Weather?"}], tools=[WEATHER_TOOL])
        + "<think>\n"
    )
    output = (
        "The user wants the weather.\n</think>\n\nChecking.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Zürich 😀"}}\n</tool_call><|im_end|>'
    )
    ids = qwen.encode(output)
    assert qwen.token_id("<tool_call>") in ids  # the added token is one id, and kept when decoding
    pipeline = ChoicePipeline(
        ChoiceDecoder(qwen, context_ids=qwen.encode(prompt)),
        reasoning=reasoning_parser("qwen3", prompt=prompt),
        tools=TOOL_PARSERS["hermes"](new_id=lambda: "call_0"),
    )
    deltas = [pipeline.feed([token_id]) for token_id in [*ids, *qwen.encode("ignored")]]
    deltas.append(pipeline.end())
    reasoning = [d.reasoning for d in deltas]
    events = [e for d in deltas for e in d.events]
    assert next(d.finish for d in deltas if d.finish) == Finish("stop", None) and pipeline.tool_calls == 1
    assert "".join(reasoning) == "The user wants the weather.\n"
    assert _collect(events) == (
        "\n\nChecking.\n",
        [ToolCall("call_0", "get_weather", '{"city": "Zürich 😀"}')],
    )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
CALLS = st.lists(
    st.tuples(
        st.from_regex(r"[a-z_][a-z0-9_.]{0,12}", fullmatch=True),
        st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3),
        st.booleans(),  # ensure_ascii
    ),
    min_size=1,
    max_size=3,
)


def _write_calls(
    name: str, calls: list[tuple[str, dict[str, Any], bool]], variant: bool
) -> tuple[str, list[tuple[str, str]]]:
    expected = [(n, json.dumps(a, ensure_ascii=ascii_only)) for n, a, ascii_only in calls]
    if name == "hermes":
        text = "".join(
            f'<tool_call>\n{{"name": "{n}", "arguments": {a}}}\n</tool_call>\n' for n, a in expected
        )
    elif name == "llama3_json":
        text = ("<|python_tag|>" if variant else "") + "; ".join(
            f'{{"name": "{n}", "parameters": {a}}}' for n, a in expected
        )
    elif variant:
        text = "".join(f"[TOOL_CALLS]{n}[ARGS]{a}" for n, a in expected)
    else:
        text = "[TOOL_CALLS][" + ", ".join(f'{{"name": "{n}", "arguments": {a}}}' for n, a in expected) + "]"
    return text, expected


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    name=st.sampled_from(sorted(TOOL_PARSERS)),
    calls=CALLS,
    variant=st.booleans(),
    before=st.text(alphabet="ab <>{}[]\n", max_size=8),
    cuts=st.lists(st.integers(0, 400), max_size=12),
)
def test_tool_calls_any_arguments_any_split(
    name: str, calls: list[tuple[str, dict[str, Any], bool]], variant: bool, before: str, cuts: list[int]
) -> None:
    """Calls with any JSON arguments, split anywhere: the streamed fragments join to the model's
    arguments text, and the content before the calls is kept."""
    name = TOOL_PARSERS[name].name  # an alias writes as the parser it names
    text, expected = _write_calls(name, calls, variant)
    if name != "llama3_json":  # Llama's calls are the whole output
        text = before + text
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    content, streamed = _stream(name, [text[a:b] for a, b in itertools.pairwise(points)])
    assert [(c.name, c.arguments) for c in streamed] == expected
    unary_content, unary_calls = TOOL_PARSERS[name].parse(text)
    assert [(c.name, c.arguments) for c in unary_calls] == expected
    if name != "llama3_json":
        assert content == before
        assert unary_content == (before if before.strip() else None)
    assert len({c.id for c in unary_calls}) == len(unary_calls)


@hypothesis.settings(max_examples=150, deadline=None)
@hypothesis.given(text=TEXTS, data=st.data(), include=st.booleans())
def test_choice_decoder_cuts_at_a_stop_string(
    qwen: EngineTokenizer, text: str, data: st.DataObject, include: bool
) -> None:
    """Token by token, with a stop string taken from the text (split across tokens or not): the text sent
    is the text up to it, never more, and the text held back is released when there is no match."""
    start = data.draw(st.integers(0, len(text)))
    stop = text[start : start + data.draw(st.integers(1, 6))] or "never"
    hypothesis.assume("\ufffd" not in stop)
    at = text.find(stop)
    expected = text if at < 0 else text[: at + (len(stop) if include else 0)]
    decoder = ChoiceDecoder(qwen, stop=[stop], include_stop_str_in_output=include)
    sent = ""
    for token_id in qwen.encode(text):
        sent += decoder.feed([token_id]).text
        assert expected.startswith(sent)  # nothing sent is ever taken back
    sent += decoder.flush()
    assert sent == expected
    assert decoder.finish == (None if at < 0 else Finish("stop", stop))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    name=st.sampled_from(sorted(TOOL_PARSERS)),
    calls=CALLS,
    variant=st.booleans(),
    edits=st.lists(
        st.tuples(st.integers(0, 400), st.integers(0, 3), st.sampled_from(["", *FRAGMENTS])), max_size=3
    ),
    cuts=st.lists(st.integers(0, 400), max_size=10),
)
def test_tool_calls_damaged_anywhere(
    name: str,
    calls: list[tuple[str, dict[str, Any], bool]],
    variant: bool,
    edits: list[tuple[int, int, str]],
    cuts: list[int],
) -> None:
    """Well-formed calls with pieces cut out or put in: however the text is split, the whole reading finds
    the same calls and content, and a text read as no call at all comes back whole as content."""
    text, _ = _write_calls(TOOL_PARSERS[name].name, calls, variant)
    for at, drop, insert in edits:
        at = min(at, len(text))
        text = text[:at] + insert + text[at + drop :]
    points = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(points)]
    held = _stream(name, pieces, stream_arguments=False)
    assert held == _stream(name, [text], stream_arguments=False)
    for call in held[1]:
        json.loads(call.arguments)
    for content, found in (held, _stream(name, pieces)):
        if not found:
            assert content in (text, text.lstrip())


QWEN3_TEMPLATE = """{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def test_qwen3_template_namespace_string_methods_and_thinking_switch() -> None:
    """The constructs of Qwen 3's template work in the sandbox (namespace, reversed slices, string
    methods), and chat_template_kwargs reach it: enable_thinking=False closes the thought in the prompt."""
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    head = "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
    off = render_chat_template(QWEN3_TEMPLATE, messages, template_kwargs={"enable_thinking": False})
    assert off == head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    on = render_chat_template(QWEN3_TEMPLATE, messages)
    assert on == head + "<|im_start|>assistant\n"
    assert not reasoning_parser("qwen3", prompt=off).feed("A2").reasoning
    messages.append({"role": "assistant", "content": "A2", "reasoning_content": "r2"})
    assert render_chat_template(QWEN3_TEMPLATE, messages, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("name", "opening"),
    [
        ("hermes", "<tool_call>"),
        ("hermes", '<tool_call>{"name": "f", "arguments": {}}'),
        ("llama3_json", ""),
        ("llama3_json", '{"name": "f", "parameters": {}};'),
        ("mistral", "[TOOL_CALLS]"),
        ("mistral", "[TOOL_CALLS]["),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {}}'),
    ],
)
def test_tool_parsers_hold_little_of_endless_whitespace(name: str, opening: str) -> None:
    """A model that writes whitespace on and on where a format expects its next part: what the parser
    holds stays small, so each delta costs the same."""
    parser = TOOL_PARSERS[name]()
    parser.feed(opening)
    for _ in range(2000):
        parser.feed(" ")
        assert len(parser._buffer) <= 300
    thinking = ThinkTagReasoningParser(in_reasoning=False)
    for _ in range(2000):
        thinking.feed("\n")
        assert len(thinking._held) <= 300


@hypothesis.settings(max_examples=100, deadline=None)
@hypothesis.given(text=TEXTS, data=st.data())
def test_decoding_after_the_prompt(
    qwen: EngineTokenizer, sentencepiece: EngineTokenizer, text: str, data: st.DataObject
) -> None:
    """With the prompt's last ids as context, the output's text is what the whole decode adds after the
    prompt: a SentencePiece output's first space is kept."""
    for tok in (qwen, sentencepiece):
        ids = tok.encode(text)
        cut = data.draw(st.integers(0, len(ids)))
        before, whole = tok.decode(ids[:cut]), tok.decode(ids)
        hypothesis.assume(whole.startswith(before) and not before.endswith("\ufffd"))
        # A prompt ends with its template's text, never inside a character: the context the detokenizer
        # takes (its last CONTEXT_TOKENS ids) decodes cleanly. (Byte-fallback tokens of half a character
        # decode to a different number of U+FFFD alone than before more bytes; vLLM's window has the same.)
        hypothesis.assume("\ufffd" not in tok.decode(ids[max(0, cut - CONTEXT_TOKENS) : cut]))
        deltas = _incremental(tok, ids[cut:], context_ids=ids[:cut])
        assert "".join(deltas) == whole[len(before) :]


def test_first_space_after_the_prompt(sentencepiece: EngineTokenizer) -> None:
    ids = sentencepiece.encode("Hello world, the weather in Paris is sunny")
    cut = next(i for i in range(1, len(ids)) if sentencepiece.tokenizer.id_to_token(ids[i]).startswith("▁"))
    after = "".join(_incremental(sentencepiece, ids[cut:], context_ids=ids[:cut]))
    assert after.startswith(" ") and sentencepiece.decode(ids[:cut]) + after == sentencepiece.decode(ids)
    assert "".join(_incremental(sentencepiece, ids[cut:])) == after[1:]  # the output alone: no first space


def test_pipeline_releases_held_text_at_the_end(qwen: EngineTokenizer) -> None:
    """The engine stops (a length limit) with text held in every stage: a partial stop string, a partial
    tag, a partial marker; end() releases them in order."""
    pipeline = ChoicePipeline(
        ChoiceDecoder(qwen, stop=["<tool_call>x"]),
        reasoning=ThinkTagReasoningParser(in_reasoning=True),
        tools=tool_parser("hermes"),
    )
    first = pipeline.feed(qwen.encode("hmm </think>answer <tool_call>"))
    assert (first.reasoning, first.events, first.finish) == ("hmm ", [ContentDelta("answer ")], None)
    last = pipeline.end()
    assert (last.reasoning, last.events, last.finish) == ("", [ContentDelta("<tool_call>")], None)
    assert pipeline.end() == ChoiceDelta() and pipeline.tool_calls == 0
    plain = ChoicePipeline(ChoiceDecoder(qwen))
    assert plain.feed(qwen.encode("just text")).events == [ContentDelta("just text")]


def test_llama3_json_broken_second_call_is_content_verbatim() -> None:
    text = '{"name": "a", "parameters": {}};{"name": "b", "parameters": {"x": }}'
    content, calls = TOOL_PARSERS["llama3_json"].parse(text)
    assert content == ';{"name": "b", "parameters": {"x": }}' and [c.name for c in calls] == ["a"]
    # Streamed, "b" is announced as soon as its arguments open; their JSON breaks too late to withdraw it.
    for pieces in _splits(text):
        content, calls = _stream("llama3_json", pieces)
        assert [(c.name, c.arguments) for c in calls][:1] == [("a", "{}")]
        if len(calls) == 1:
            assert content == ';{"name": "b", "parameters": {"x": }}'
