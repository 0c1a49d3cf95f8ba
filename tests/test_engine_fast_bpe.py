"""The tiktoken fast path of EngineTokenizer (llmgw.engine._fast_bpe): the same ids as ``tokenizers`` for any
text on the tokenizers it accepts, and ``tokenizers`` itself for those it refuses."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import pytest
import tiktoken
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

import llmgw_dev
from llmgw.engine import EngineTokenizer
from llmgw.engine._fast_bpe import (
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    O200K_PATTERN,
    QWEN2_PATTERN,
    FastBPE,
    NotExpressible,
    fast_bpe,
)
from llmgw_dev.fakes.model import load

CORPUS = [
    *(Path(llmgw_dev.__file__).parent / "data" / "tokenizer_corpus.txt")
    .read_text(encoding="utf-8")
    .splitlines(),
    "Les élèves étudient à l'école. Ça va? Naïve café, déjà vu. ÉCOLE Œuvre",
    "日本語のテキストです。東京は晴れ。中文文本, 北京天气很好。한국어 텍스트",
    "Emoji: 😀 🎉 👍🏽 🇫🇷 and combining: e\u0301 a\u0308 n\u0303 Å Å",
    "def f(x):\n    return x * 2\n\n\tprint(f(21))  # 123456789 1,000,000\r\n",
    "I'm sure they'll say it's fine; we've DONE it, you'd SEE'S",
]
SPECIAL = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
ADDED = ["<tool_call>", "</tool_call>", "<think>", "</think>", "\u01d8"]  # ǘ: NFC of u, U+0308, U+0301
# Text that trips splitters and normalizers: contractions in any case (and the long s, which folds to s),
# runs of spaces and line breaks, digits, combining marks NFC composes, a Hangul syllable in jamo.
TRICKY = [
    "'s",
    "'S",
    "'\u017f",
    "'LL",
    "'Re",
    "  ",
    "\n\n",
    " \r\n ",
    "\t",
    "12345",
    "e\u0301",
    "u\u0308\u0301",
    "\u0301",
    "\u1100\u1161",
    "\U00011935\U00011930",  # NFC makes U+11938 of it in Python 3.11, not in tokenizers
]


def _texts(tokens: list[str]) -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.text(max_size=24),
        st.sampled_from(tokens + TRICKY),
        st.text(alphabet="  \t\n\r'sSlLmMdDeEvVrRtT0123456789é\u0301\u0308\u017f<>|/", max_size=24),
    )
    return st.lists(piece, max_size=12).map("".join)


def _trained(
    pre_tokenizer: Any,
    *,
    normalizer: Any = None,
    added: list[AddedToken] | None = None,
    vocab_size: int = 2000,
    corpus: list[str] = CORPUS,
    special_in_vocab: bool = False,
) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL if special_in_vocab else [],  # then also BPE vocabulary entries no merge makes
    )
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.add_tokens(added or [AddedToken(t, special=False, normalized=False) for t in ADDED])
    return tokenizer


def _split_then_bytes(pattern: str) -> Any:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _engine(tokenizer: Tokenizer) -> EngineTokenizer:
    return EngineTokenizer.from_files({"tokenizer.json": tokenizer.to_str().encode()})


def _fake() -> EngineTokenizer:
    return EngineTokenizer.from_files(load().files())


def _llama3() -> EngineTokenizer:
    tokenizer = _trained(_split_then_bytes(LLAMA3_PATTERN))
    # Llama 3's processors: a BOS only when special tokens are asked for.
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))],
            ),
        ]
    )
    return _engine(tokenizer)


def _qwen_nfc() -> EngineTokenizer:
    """Qwen2's layout: NFC, its split, the ByteLevel post-processor."""
    tokenizer = _trained(_split_then_bytes(QWEN2_PATTERN), normalizer=normalizers.NFC())
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return _engine(tokenizer)


def _gpt2() -> EngineTokenizer:
    return _engine(
        _trained(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), special_in_vocab=True)
    )


def _llama3_ignore_merges() -> EngineTokenizer:
    """Llama 3's tokenizer.json looks a piece up whole before merging, as tiktoken does."""
    spec = json.loads(_llama3().tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    return _engine(Tokenizer.from_str(json.dumps(spec)))


def _o200k() -> EngineTokenizer:
    return _engine(_trained(_split_then_bytes(O200K_PATTERN)))


def _llama3_every_split() -> EngineTokenizer:
    """Llama 3's tokenizer.json as transformers' converter wrote it: every split of a token into two tokens
    is a merge (in the order of the result's id, then the parts'), and pieces are looked up whole first."""
    spec = json.loads(_llama3().tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    merges = []
    for token in {left + right for left, right in spec["model"]["merges"]}:
        for cut in range(1, len(token)):
            if token[:cut] in vocab and token[cut:] in vocab:
                merges.append(
                    (vocab[token], vocab[token[:cut]], vocab[token[cut:]], [token[:cut], token[cut:]])
                )
    assert len(merges) > len(spec["model"]["merges"])
    spec["model"]["merges"] = [merge for *_, merge in sorted(merges)]
    spec["model"]["ignore_merges"] = True
    return _engine(Tokenizer.from_str(json.dumps(spec)))


ACCEPTED: dict[str, Callable[[], EngineTokenizer]] = {
    "fake": _fake,
    "llama3": _llama3,
    "llama3-ignore-merges": _llama3_ignore_merges,
    "llama3-every-split": _llama3_every_split,
    "qwen-nfc": _qwen_nfc,
    "gpt2": _gpt2,
    "o200k": _o200k,
}


@pytest.fixture(scope="module", params=sorted(ACCEPTED))
def accepted(request: pytest.FixtureRequest) -> EngineTokenizer:
    return ACCEPTED[request.param]()


def _hf_ids(tokenizer: EngineTokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)


def _added_contents(tokenizer: EngineTokenizer) -> list[str]:
    return [token.content for token in tokenizer.tokenizer.get_added_tokens_decoder().values()]


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(data=st.data())
def test_same_ids_as_tokenizers(accepted: EngineTokenizer, data: st.DataObject) -> None:
    assert accepted._fast_bpe is not None
    text = data.draw(_texts(_added_contents(accepted)))
    # The fast path answers and agrees: these patterns leave no gap (their coverage check is skipped).
    assert accepted._fast_bpe._gapless
    assert accepted._fast_bpe.encode(text) == accepted.encode(text) == _hf_ids(accepted, text)


def test_same_ids_on_the_corpus_and_a_chat_prompt(accepted: EngineTokenizer) -> None:
    model = load()
    prompt = model.render(
        [{"role": "system", "content": "\n\n".join(CORPUS)}, {"role": "user", "content": " ".join(CORPUS)}]
    )
    assert accepted._fast_bpe is not None
    for text in [*CORPUS, prompt, ""]:
        assert accepted._fast_bpe.encode(text) == _hf_ids(accepted, text)


def test_added_special_tokens_stay_with_tokenizers() -> None:
    llama3 = _llama3()
    bos = llama3.token_id("<|begin_of_text|>")
    assert llama3.encode("Hi there", add_special_tokens=True) == [bos, *llama3.encode("Hi there")]
    assert llama3.encode("Hi there", add_special_tokens=True) == _hf_ids(llama3, "Hi there", True)


def test_lone_surrogates_fail_as_in_tokenizers() -> None:
    fake = _fake()
    with pytest.raises(TypeError):
        fake.tokenizer.encode("a\ud800b", add_special_tokens=False)
    with pytest.raises(TypeError):
        fake.encode("a\ud800b")


def test_nfc_applies_between_added_tokens_only() -> None:
    """An added token NFC would form (U+01D8 from "u" + U+0308 + U+0301) is ordinary text to tokenizers,
    which seeks non-normalized added tokens before normalizing."""
    qwen = _qwen_nfc()
    assert qwen._fast_bpe is not None
    text = "u\u0308\u0301<think>\u01d8</think>\u0301"
    assert qwen._fast_bpe.encode(text) == _hf_ids(qwen, text)
    assert qwen.token_id("\u01d8") not in qwen.encode("u\u0308\u0301")


def test_a_pattern_that_skips_text_falls_back_per_text() -> None:
    """tiktoken drops text its pattern does not match (here: all but letters), tokenizers keeps it."""
    letters = _engine(_trained(_split_then_bytes(r"\p{L}+")))
    assert letters._fast_bpe is not None
    assert letters._fast_bpe.encode("abc def") is None
    assert letters._fast_bpe.encode("abcdef") is not None
    for text in ["abc def", "12 apples", "abcdef"]:
        assert letters.encode(text) == _hf_ids(letters, text)


def test_verdicts_are_cached_by_content() -> None:
    text = load().tokenizer.to_str()
    assert fast_bpe(text) is fast_bpe(text) is not None


# ------------------------------------------------------------------------------------------- refused


def _spec(tokenizer: Tokenizer) -> dict[str, Any]:
    return dict(json.loads(tokenizer.to_str()))


def _fake_spec() -> dict[str, Any]:
    return _spec(load().tokenizer)


def _reordered_merges() -> dict[str, Any]:
    spec = _fake_spec()
    merges = spec["model"]["merges"]
    merges[10], merges[11] = merges[11], merges[10]
    return spec


def _other_split_merges() -> dict[str, Any]:
    """A merge replaced by another split of its result that tokenizers accepts but tiktoken's ranks would
    not make: tokenizers now reaches the token another way."""
    spec = _fake_spec()
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for index, (left, right) in enumerate(merges):
        token = left + right
        for cut in range(1, len(token)):
            a, b = token[:cut], token[cut:]
            if a != left and vocab.get(a, 1 << 30) < vocab[token] and vocab.get(b, 1 << 30) < vocab[token]:
                merges[index] = [a, b]
                return spec
    raise AssertionError("no merge with another split in the fake's vocabulary")


def _with_lstrip() -> dict[str, Any]:
    spec = _fake_spec()
    spec["added_tokens"][3]["lstrip"] = True
    return spec


def _with_overlap() -> dict[str, Any]:
    tokenizer = Tokenizer.from_str(load().tokenizer.to_str())
    tokenizer.add_tokens([AddedToken("<think>x", normalized=False)])
    return _spec(tokenizer)


def _added_on_a_byte() -> dict[str, Any]:
    tokenizer = Tokenizer.from_str(load().tokenizer.to_str())
    tokenizer.add_tokens([AddedToken("é", normalized=False)])  # tokenizers gives it the id of byte 0xE9's "é"
    return _spec(tokenizer)


def _nfkc() -> dict[str, Any]:
    return _spec(_trained(_split_then_bytes(QWEN2_PATTERN), normalizer=normalizers.NFKC()))


def _nfc_normalized_token() -> dict[str, Any]:
    return _spec(
        _trained(
            _split_then_bytes(QWEN2_PATTERN),
            normalizer=normalizers.NFC(),
            added=[AddedToken("<think>", normalized=True)],
        )
    )


def _empty_match() -> dict[str, Any]:
    return _spec(_trained(_split_then_bytes(r"\p{L}*|\s")))


def _wordpiece() -> dict[str, Any]:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    )
    return _spec(tokenizer)


def _unigram() -> dict[str, Any]:
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(
        CORPUS,
        trainers.UnigramTrainer(
            vocab_size=200, unk_token="<unk>", special_tokens=["<unk>"], show_progress=False
        ),
    )
    return _spec(tokenizer)


REFUSED: dict[str, tuple[Callable[[], dict[str, Any]], str]] = {
    "reordered merges": (_reordered_merges, "lower id than a merge before"),
    "another split": (_other_split_merges, "no merge makes"),
    "lstrip": (_with_lstrip, "strips spaces"),
    "overlapping added tokens": (_with_overlap, "inside another"),
    "added token on a byte's id": (_added_on_a_byte, "id of other bytes"),
    "NFKC": (_nfkc, "neither absent nor NFC"),
    "normalized added token with NFC": (_nfc_normalized_token, "NFC-normalized text"),
    "empty match": (_empty_match, "match empty text"),
    "WordPiece": (_wordpiece, "not BPE"),
    "Unigram": (_unigram, "not BPE"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_tokenizers_stay_with_tokenizers(name: str) -> None:
    build, reason = REFUSED[name]
    spec = build()
    with pytest.raises(NotExpressible, match=reason):
        FastBPE.from_json(json.dumps(spec))
    tokenizer = _engine(Tokenizer.from_str(json.dumps(spec)))
    assert tokenizer._fast_bpe is None
    for text in [*CORPUS, "<think>x</think> <|im_start|>user\nHi<|im_end|>"]:
        assert tokenizer.encode(text) == _hf_ids(tokenizer, text)


def test_the_merge_check_is_needed() -> None:
    """With another split of a merge, tiktoken's ranks give other ids than tokenizers on some text."""
    spec = _other_split_merges()
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    original = load().tokenizer
    changed = [
        text
        for text in CORPUS
        if tokenizer.encode(text, add_special_tokens=False).ids
        != original.encode(text, add_special_tokens=False).ids
    ]
    assert changed  # the fake's own ids are tiktoken's (test_same_ids_as_tokenizers)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, O200K_PATTERN])
def test_known_patterns_are_read(pattern: str) -> None:
    from llmgw.engine._fast_bpe import _check_pattern

    _check_pattern(pattern)


@pytest.mark.parametrize(
    "pattern",
    [
        r"^\s+|\S+",
        r".+",
        r"\d+|\D+",
        r"(?i)\p{L}+|\s+",
        r"(?<=a)b|\s+",
        r"\s+?|\S+",
        r"[[:alpha:]]+|\s+",
        r"\w+|\W",
    ],
)
def test_unknown_syntax_is_refused(pattern: str) -> None:
    from llmgw.engine._fast_bpe import _check_pattern

    with pytest.raises(NotExpressible):
        _check_pattern(pattern)


@pytest.mark.slow
@pytest.mark.parametrize("category", [r"\p{L}", r"\p{N}", r"\p{M}", r"\s"])
def test_character_classes_read_alike(category: str) -> None:
    """Oniguruma (tokenizers) and fancy-regex (tiktoken) put the same code points in the classes split
    patterns use (all general categories were compared once; these would show a Unicode upgrade of either)."""
    text = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000)
    only_matches = tiktoken.Encoding(
        "bytes", pat_str=category, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
    )
    fancy = set(bytes(only_matches.encode_ordinary(text)).decode())
    unmatched = pre_tokenizers.Split(Regex(category), behavior="removed").pre_tokenize_str(text)
    oniguruma = set(text) - set("".join(piece for piece, _ in unmatched))
    assert fancy == oniguruma
