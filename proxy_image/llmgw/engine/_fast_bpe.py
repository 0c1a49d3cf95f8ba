"""A faster encoder for byte-level BPE tokenizers: the same ids as ``tokenizers``, computed by ``tiktoken``.

**Why.** ``tokenizers`` splits text with Oniguruma, about 2 µs per token of a prompt (17 ms for 8k tokens);
``tiktoken`` (Rust BPE, fancy-regex) gives the same ids several times faster. The chat path encodes every
prompt, so :class:`~llmgw.engine.tokenizer.EngineTokenizer` uses :class:`FastBPE` for text without added
special tokens (``add_special_tokens=False``) when the tokenizer can be expressed in tiktoken, and
``tokenizers`` otherwise. tiktoken's registry is never used (it downloads): the encoding is built from
tokenizer.json's own vocabulary.

**When** (:meth:`FastBPE.from_json` raises :class:`NotExpressible` naming the first rule broken):

* the model is a BPE over GPT-2's byte-level alphabet: no dropout, no byte fallback, no subword prefix or
  suffix, all 256 bytes in the vocabulary;
* the pre-tokenizer is ``Split(Regex P, Isolated)`` then ``ByteLevel`` without its own regex, or a lone
  ``ByteLevel`` with its regex (GPT-2's pattern); P is written in a syntax both regex engines read alike
  (:func:`_check_pattern`) and never matches empty text (tiktoken cannot encode an empty piece);
* no normalizer, or NFC (applied, as ``tokenizers`` does, to the text between added tokens, by its own
  normalizer: Python's ``unicodedata`` has newer Unicode tables); no truncation, no padding; a
  post-processor that only adds special tokens;
* added tokens without ``lstrip``/``rstrip``/``single_word``, none overlapping another (``tokenizers``
  takes the leftmost longest, tiktoken the leftmost first, in two passes when the tokens differ in
  ``normalized``: disjoint tokens make every rule agree), and with NFC none ``normalized`` (they would be
  sought in the normalized text);
* the merges include those tiktoken's rank-ordered BPE performs, in rank order (:func:`_check_merges`).

**How equivalence is ensured.** ``tokenizers`` merges the adjacent pair that comes first in its merge
list, tiktoken the adjacent pair whose concatenation has the lowest rank (here: the token id), the
leftmost on a tie both. They agree when the merge list holds the merges transformers' tiktoken converter
derives from the ranks: for each merge result T of rank r, the split of T into the two parts tiktoken's
BPE leaves of it when it may use only ranks below r; and the list comes in increasing rank of the results.
Then in any state tiktoken's BPE reaches on any text, two adjacent parts making a token T are the parts
tiktoken's BPE of T alone reaches (the merges inside T's span came in that order), that is T's listed
split: both see the same candidate pairs in the same order, and tiktoken's whole-piece lookup returns what
the merges reach. Other splits of T in the list (Llama 3's tokenizer.json lists every split whose parts
are tokens) never meet as adjacent parts, so they change nothing.
Vocabulary entries no merge produces are left out of the ranks (``tokenizers`` never outputs them either,
unless ``ignore_merges`` finds them whole: then there must be none). At run time, a text whose UTF-8 is
not fully covered by the returned tokens (the split pattern skipped some of it, where ``tokenizers`` keeps
the gap as a piece; not checked for the patterns of GPT-2, Llama 3, Qwen and o200k, which leave none) or
that holds lone surrogates goes to ``tokenizers`` (:meth:`FastBPE.encode` returns None). The character
classes the patterns may use were compared between Oniguruma and fancy-regex on every code point. The
merge check costs about 0.3 s for a 32k vocabulary, 2 to 3 s for 150k, so :func:`fast_bpe` remembers its
verdicts.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import tiktoken
from tokenizers import normalizers

# The pattern a lone ByteLevel pre-tokenizer (use_regex) splits with.
GPT2_PATTERN: Final = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The split patterns of Llama 3 (and cl100k), Qwen 2/3 and o200k, as their tokenizer.json files write them.
LLAMA3_PATTERN: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN: Final = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
O200K_PATTERN: Final = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)
# Patterns that split any text end to end: every character is a letter (or mark), a number, whitespace or
# something else, and each of these patterns has an alternative that matches it whatever follows (``\p{L}+``
# after an optional prefix, ``\p{N}``, ``\s+``, `` ?[^\s\p{L}\p{N}]+``). For them the check that the ids
# cover the whole text (a tenth of the encoding's time) is skipped.
_GAPLESS_PATTERNS: Final = frozenset({GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, O200K_PATTERN})
# The only case-insensitive text a pattern may hold: Oniguruma folds some letter pairs to one character
# ("ss" to "ß"), fancy-regex does not; this group was compared on every character.
_CONTRACTIONS: Final = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
# Unicode general categories: Oniguruma and fancy-regex were compared on every code point for each.
_CATEGORIES: Final = frozenset(
    {"L", "Lu", "Ll", "Lt", "Lm", "Lo", "M", "Mn", "Mc", "Me", "N", "Nd", "Nl", "No"}
    | {"P", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "S", "Sm", "Sc", "Sk", "So"}
    | {"Z", "Zs", "Zl", "Zp", "C", "Cc", "Cf", "Co", "Cn"}
)
# Post-processors that change offsets only, or add tokens only when special tokens are asked for.
_PROCESSORS: Final = frozenset({"ByteLevel", "TemplateProcessing"})
_QUANTIFIER: Final = re.compile(r"\{(\d+)(,\d*)?\}")
_PROPERTY: Final = re.compile(r"\\[pP]\{(\w+)\}")


class NotExpressible(ValueError):
    """The tokenizer cannot be expressed in tiktoken with the same ids; the message says why."""


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: each byte's printable stand-in, as character → byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    others = (b for b in range(256) if chr(b) not in table)
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


# str.translate table turning byte-level text into one character per byte (then latin-1 bytes). The
# latin-1 characters outside the alphabet become U+0100, which latin-1 cannot encode: a vocabulary string
# with any character outside the alphabet fails to encode.
_ALPHABET: Final = _byte_level_alphabet()
_TO_LATIN1: Final = {ord(c): b for c, b in _ALPHABET.items()} | {
    c: 0x100 for c in range(256) if chr(c) not in _ALPHABET
}


def _token_bytes(token: str) -> bytes:
    try:
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        raise NotExpressible(f"the vocabulary entry {token!r} is not in the byte-level alphabet") from None


class FastBPE:
    """A tiktoken encoding giving the ids ``tokenizers`` gives without added special tokens (or None)."""

    def __init__(
        self, encoding: tiktoken.Encoding, added: Mapping[str, int], *, nfc: bool, gapless: bool = False
    ) -> None:
        self._encoding = encoding
        self._gapless = gapless
        self._added = dict(added)
        # tokenizers' own NFC: its Unicode tables are older than Python's unicodedata (which composes
        # U+11935 U+11930 to U+11938, tokenizers does not).
        self._nfc = normalizers.NFC().normalize_str if nfc else None
        # With NFC the text between added tokens is normalized before its split, so the added tokens are
        # found first (longest first, as tokenizers does; they never overlap).
        self._added_split = (
            re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")")
            if added
            else None
        )

    @classmethod
    def from_json(cls, tokenizer_json: str) -> FastBPE:
        """The encoding of a tokenizer.json, or :class:`NotExpressible` (see the module's docstring)."""
        spec = json.loads(tokenizer_json)
        nfc = _check_normalizer(spec.get("normalizer"))
        pattern = _split_pattern(spec.get("pre_tokenizer"))
        _check_pattern(pattern)
        for key in ("truncation", "padding"):
            if spec.get(key) is not None:
                raise NotExpressible(f"tokenizer.json sets {key}")
        processor = spec.get("post_processor")
        steps = (
            processor.get("processors", []) if processor and processor["type"] == "Sequence" else [processor]
        )
        if any(step is not None and step.get("type") not in _PROCESSORS for step in steps):
            raise NotExpressible(f"the post-processor {processor.get('type')!r} may change the ids")
        added = _added_tokens(spec.get("added_tokens") or [], nfc=nfc)
        ranks = _ranks(spec.get("model") or {}, added)
        try:
            encoding = tiktoken.Encoding(
                "tokenizer.json", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added
            )
        except ValueError as exc:  # the pattern does not compile in fancy-regex, or ids repeat
            raise NotExpressible(f"tiktoken refuses the tokenizer: {exc}") from exc
        return cls(encoding, added, nfc=nfc, gapless=pattern in _GAPLESS_PATTERNS)

    def encode(self, text: str) -> list[int] | None:
        """``text``'s ids with added tokens recognized, or None when ``tokenizers`` must encode it."""
        if text.isascii():  # NFC leaves ASCII alone
            ids = self._encoding.encode(text, allowed_special="all")
            size = len(text)
        else:
            try:
                size = len(text.encode())
            except UnicodeEncodeError:  # lone surrogates: tiktoken would replace them, tokenizers refuses
                return None
            if self._nfc is not None:
                ids, size = self._encode_normalized(text, self._nfc)
            else:
                ids = self._encoding.encode(text, allowed_special="all")
        # tiktoken drops text its pattern does not match; tokenizers keeps it as a piece.
        return ids if self._gapless or len(self._encoding.decode_bytes(ids)) == size else None

    def _encode_normalized(self, text: str, nfc: Callable[[str], str]) -> tuple[list[int], int]:
        """The ids of ``text`` with NFC applied between added tokens, and the UTF-8 size they cover."""
        ids: list[int] = []
        size = 0
        pieces = self._added_split.split(text) if self._added_split else [text]
        for index, piece in enumerate(pieces):
            if index % 2:  # split's captured separators: the added tokens
                ids.append(self._added[piece])
            elif piece:
                piece = nfc(piece)
                # Encoded apart: an added token NFC makes appear is ordinary text to tokenizers.
                ids.extend(self._encoding.encode_ordinary(piece))
            size += len(piece.encode())
        return ids, size


# What was decided per tokenizer.json (its SHA-256): a refusal for the process, an encoding as long as a
# tokenizer uses it (an encoding of a large vocabulary weighs tens of MB).
_expressible: weakref.WeakValueDictionary[str, FastBPE] = weakref.WeakValueDictionary()
_refused: set[str] = set()
_decided = threading.Lock()


def fast_bpe(tokenizer_json: str) -> FastBPE | None:
    """:meth:`FastBPE.from_json`, or None when not expressible; the same object for the same file."""
    digest = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    with _decided:
        if digest in _refused:
            return None
        known = _expressible.get(digest)
    if known is not None:
        return known
    try:
        built = FastBPE.from_json(tokenizer_json)
    except NotExpressible:
        with _decided:
            _refused.add(digest)
        return None
    with _decided:
        return _expressible.setdefault(digest, built)


def _check_normalizer(normalizer: Any) -> bool:
    """Whether NFC applies (else nothing does)."""
    if normalizer is None:
        return False
    if normalizer == {"type": "NFC"}:
        return True
    raise NotExpressible(f"the normalizer {normalizer.get('type')!r} is neither absent nor NFC")


def _split_pattern(pre_tokenizer: Any) -> str:
    if not isinstance(pre_tokenizer, dict):
        raise NotExpressible("no byte-level pre-tokenizer")
    if pre_tokenizer.get("type") == "ByteLevel":
        if pre_tokenizer.get("add_prefix_space") or not pre_tokenizer.get("use_regex", True):
            raise NotExpressible("a lone ByteLevel pre-tokenizer must split with its regex, adding no space")
        return GPT2_PATTERN
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        raise NotExpressible("the pre-tokenizer is neither ByteLevel nor Sequence[Split, ByteLevel]")
    split, byte_level = steps
    if (
        split.get("type") != "Split"
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or "Regex" not in (split.get("pattern") or {})
    ):
        raise NotExpressible("the pre-tokenizer's first step is not Split(Regex, Isolated)")
    if (
        byte_level.get("type") != "ByteLevel"
        or byte_level.get("add_prefix_space")
        or byte_level.get("use_regex")
    ):
        raise NotExpressible(
            "the pre-tokenizer's second step is not ByteLevel without prefix space nor regex"
        )
    return str(split["pattern"]["Regex"])


def _added_tokens(entries: Sequence[Mapping[str, Any]], *, nfc: bool) -> dict[str, int]:
    """The added tokens, content → id, once checked (see the module's docstring)."""
    added: dict[str, int] = {}
    for entry in entries:
        content = entry["content"]
        if entry.get("lstrip") or entry.get("rstrip") or entry.get("single_word"):
            raise NotExpressible(f"the added token {content!r} strips spaces or matches single words only")
        if nfc and entry.get("normalized"):
            raise NotExpressible(f"the added token {content!r} is sought in NFC-normalized text")
        if not content or "\0" in content:
            raise NotExpressible(f"the added token {content!r} is empty or holds NUL")
        added[content] = int(entry["id"])
    if len(set(added.values())) != len(added):  # tiktoken panics on a repeated id
        raise NotExpressible("two added tokens share an id")
    # Disjoint: none inside another, and no end of one the start of another.
    joined = "\0".join(added)
    starts = {token[:n] for token in added for n in range(1, len(token) + 1)}
    for token in added:
        if joined.count(token) > 1:
            raise NotExpressible(f"the added token {token!r} lies inside another")
        for n in range(1, len(token)):
            if token[n:] in starts and any(other.startswith(token[n:]) for other in added if other != token):
                raise NotExpressible(f"the added token {token!r} ends as another begins")
    return added


def _ranks(model: Mapping[str, Any], added: Mapping[str, int]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks for the BPE model: the 256 bytes and the merge results, by token id."""
    if model.get("type") != "BPE":
        raise NotExpressible(f"the model is {model.get('type')!r}, not BPE")
    if model.get("dropout") or model.get("byte_fallback"):
        raise NotExpressible("the BPE model has dropout or byte fallback")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise NotExpressible("the BPE model has a subword prefix or suffix")
    vocab: dict[str, int] = model["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    ranks = {_token_bytes(token): rank for token, rank in vocab.items() if len(token) == 1}
    if len(ranks) != 256:
        raise NotExpressible("the vocabulary lacks some of the 256 bytes")
    splits: dict[bytes, list[bytes]] = {}  # each merge result: the left parts of the merges making it
    previous = -1
    for merge in merges:
        if len(merge) != 2 or (rank := vocab.get(merge[0] + merge[1])) is None:
            raise NotExpressible(f"the merge {merge!r} does not make a vocabulary entry")
        if rank < previous:
            raise NotExpressible(f"the merge {merge!r} makes a lower id than a merge before it")
        previous = rank
        left = _token_bytes(merge[0])
        token = left + _token_bytes(merge[1])
        ranks[token] = rank
        splits.setdefault(token, []).append(left)
    if len(set(ranks.values())) != len(ranks):  # tiktoken panics on a repeated id
        raise NotExpressible("two vocabulary entries share an id")
    # An added token on a vocabulary entry's id ("é" on the entry of byte 0xE9) decodes, in tiktoken, as
    # that entry's bytes: FastBPE.encode's count of the bytes covered would miss.
    token_of_id = {rank: token for token, rank in ranks.items()}
    for content, token_id in added.items():
        if token_of_id.get(token_id, content.encode()) != content.encode():
            raise NotExpressible(f"the added token {content!r} has the id of other bytes' vocabulary entry")
    if model.get("ignore_merges"):  # tokenizers then looks a piece up whole in the entire vocabulary
        made = set(ranks.values())
        added_ids = set(added.values())
        if any(len(t) > 1 and i not in made and i not in added_ids for t, i in vocab.items()):
            raise NotExpressible("ignore_merges with vocabulary entries no merge makes")
    _check_merges(splits, ranks)
    return ranks


def _check_merges(splits: Mapping[bytes, Sequence[bytes]], ranks: Mapping[bytes, int]) -> None:
    """Each merge result T of rank r must be made by a merge of the two parts tiktoken's BPE leaves of T
    using only ranks below r (given the left parts of the merges making each T)."""
    for token, lefts in splits.items():
        pieces = _bpe_below(token, ranks, ranks[token])
        if len(pieces) != 2 or pieces[0] not in lefts:
            raise NotExpressible(
                f"no merge makes {token!r} of the parts tiktoken's ranks leave of it, {pieces!r}"
            )


def _bpe_below(piece: bytes, ranks: Mapping[bytes, int], limit: int) -> list[bytes]:
    """tiktoken's BPE of ``piece`` with ranks below ``limit``, stopped at two parts (``piece`` itself
    ranks ``limit``, so two parts never merge)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    get = ranks.get
    pairs = [get(parts[i] + parts[i + 1], limit) for i in range(len(parts) - 1)]  # each pair's rank
    while len(parts) > 2:
        best = min(pairs)
        if best >= limit:
            break
        at = pairs.index(best)  # the leftmost, as tiktoken
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
        del pairs[at]
        if at < len(pairs):
            pairs[at] = get(parts[at] + parts[at + 1], limit)
        if at:
            pairs[at - 1] = get(parts[at - 1] + parts[at], limit)
    return parts


def _check_pattern(pattern: str) -> None:
    """The split pattern must use only syntax Oniguruma and fancy-regex read alike, and match no empty text.

    Allowed: literals, escaped punctuation, ``\\r \\n \\t \\s \\S``, ``\\p{C}``/``\\P{C}`` for a general
    category C, classes of these and of literal ranges, groups (capturing, ``(?:``, lookahead), quantifiers
    ``? * + {m} {m,} {m,n}`` (greedy), and the case-insensitive contractions group. Not allowed, since the
    engines differ or it is untested: ``. ^ $``, ``\\d \\w \\b``, other flags, lookbehind, lazy and
    possessive quantifiers, nested classes.
    """
    reader = _PatternReader(pattern)
    width = reader.alternation()
    if reader.pos != len(pattern):
        raise NotExpressible(f"the split pattern has an unbalanced ')' at {reader.pos}")
    if width == 0:
        raise NotExpressible("the split pattern can match empty text")


class _PatternReader:
    """A recursive reading of a split pattern, computing the fewest characters each part matches."""

    _ESCAPES: Final = frozenset("rntsS")
    # Escaped, these stand for themselves in both engines (Oniguruma reads some other escaped punctuation,
    # as \< and \>, as word boundaries).
    _ESCAPED_LITERALS: Final = frozenset("\\[](){}|?*+.^$-/'")
    _SPECIAL: Final = frozenset("\\[](){}|?*+.^$")

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.pos = 0

    def _refuse(self, what: str) -> NotExpressible:
        return NotExpressible(
            f"the split pattern has {what} at {self.pos}, which the fast path does not read"
        )

    def _peek(self) -> str:
        return self.pattern[self.pos] if self.pos < len(self.pattern) else ""

    def alternation(self) -> int:
        widths = [self.sequence()]
        while self._peek() == "|":
            self.pos += 1
            widths.append(self.sequence())
        return min(widths)

    def sequence(self) -> int:
        width = 0
        while self._peek() not in ("", "|", ")"):
            width += self.atom() * self.quantifier()
        return width

    def atom(self) -> int:
        char = self._peek()
        if char == "(":
            return self.group()
        if char == "[":
            self.char_class()
            return 1
        if char == "\\":
            self.escape()
            return 1
        if char in self._SPECIAL:
            raise self._refuse(repr(char))
        self.pos += 1
        return 1

    def group(self) -> int:
        rest = self.pattern[self.pos :]
        if rest.startswith(_CONTRACTIONS):
            self.pos += len(_CONTRACTIONS)
            return 2
        lookahead = rest.startswith(("(?=", "(?!"))
        if lookahead or rest.startswith("(?:"):
            self.pos += 3
        elif rest.startswith("(?"):
            raise self._refuse("a group with flags, a name or a lookbehind")
        else:
            self.pos += 1
        width = self.alternation()
        if self._peek() != ")":
            raise self._refuse("an unclosed group")
        self.pos += 1
        return 0 if lookahead else width

    def quantifier(self) -> int:
        """The quantifier's least count (1 when none)."""
        char = self._peek()
        if char in ("?", "*", "+"):
            self.pos += 1
            least = 0 if char in "?*" else 1
        elif char == "{":
            match = _QUANTIFIER.match(self.pattern, self.pos)
            if not match:
                raise self._refuse("a '{' that is no quantifier")
            self.pos = match.end()
            least = int(match.group(1))
        else:
            return 1
        if self._peek() in ("?", "+", "*", "{"):
            raise self._refuse("a lazy, possessive or repeated quantifier")
        return least

    def escape(self) -> None:
        letter = self.pattern[self.pos + 1 : self.pos + 2]
        if letter in ("p", "P"):
            match = _PROPERTY.match(self.pattern, self.pos)
            if not match or match.group(1) not in _CATEGORIES:
                raise self._refuse("a Unicode property other than a general category")
            self.pos = match.end()
        elif letter and (letter in self._ESCAPES or letter in self._ESCAPED_LITERALS):
            self.pos += 2
        else:
            raise self._refuse(f"the escape \\{letter}")

    def char_class(self) -> None:
        self.pos += 1
        if self._peek() == "^":
            self.pos += 1
        if self._peek() == "]":
            raise self._refuse("an empty class")
        while (char := self._peek()) != "]":
            if char in ("", "[", "-") or self.pattern.startswith("&&", self.pos):
                raise self._refuse("an unclosed or nested class, an intersection or a loose '-'")
            if char == "\\":
                self.escape()
                continue
            self.pos += 1
            if self._peek() == "-":  # a range of literals
                if self.pattern[self.pos + 1 : self.pos + 2] in ("", "]", "[", "-", "\\"):
                    raise self._refuse("a range not between two literals")
                self.pos += 2
        self.pos += 1
