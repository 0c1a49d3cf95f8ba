"""From the engine's token ids to text that may be sent now: incremental decoding, then stop conditions.

**Decoding one token at a time** (:class:`IncrementalDetokenizer`) cannot decode each token alone: a
byte-level token may hold half a UTF-8 character (it decodes to U+FFFD until the next token completes
it), and a SentencePiece decoder drops the leading space of the first token it is given, so " world"
alone decodes as "world". It uses the method of vLLM and text-generation-inference: decode a short window
of the latest tokens twice, up to the last point already sent (``read``) and up to the newest token, and
send the difference. The window starts where the previous step's text was read (``prefix``), so the
decoder sees each token after one before it and writes its spaces as the whole text would. A character
still unfinished at the end (U+FFFD) is held and the text before it sent; the window moves on once the
text ends clean, so each token costs a decode of a few tokens, not of the whole text. One difference remains, as in vLLM: a SentencePiece byte-fallback decoder
turns every byte of a run of byte tokens into U+FFFD when the run is not valid UTF-8, so when a model
writes invalid bytes after a valid character spelled in bytes, that character was sent already.

**Stop conditions** (:class:`StopChecker`) run on the decoded text: a stop string may span tokens, so
text that could be the start of one is held back, never sent and then retracted; on a match the text is
cut before it (or after it with ``include_stop_str_in_output``). Stop token ids and the end-of-sequence
ids end the choice too (unless ``ignore_eos``). :class:`ChoiceDecoder` is both, for one choice: fed token
ids, it returns the text to send and, at the end, why the choice finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Sequence
from typing import Literal

from llmgw.engine._text import partial_marker
from llmgw.engine.tokenizer import EngineTokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens the first window starts with: enough for every tokenizer's space rules
# A window that grows past this without clean text (a model writing invalid bytes on and on) is sent as
# it is, replacement characters included, to keep each step's decode short.
MAX_WINDOW_TOKENS = 64


class IncrementalDetokenizer:
    """Text deltas of a stream of token ids whose concatenation is the decode of all of them.

    ``skip_special_tokens`` drops special tokens (``<|im_end|>``) from the text; with
    ``spaces_between_special_tokens``, special tokens that are kept are set apart from their neighbours by
    one space, as transformers' slow tokenizers do (fast tokenizers, and vLLM with them, do not: hence
    the default). ``context_ids`` are ids decoded before these (the prompt's last tokens), for a decoder
    whose first space depends on what precedes.
    """

    def __init__(
        self,
        tokenizer: EngineTokenizer,
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = False,
        context_ids: Sequence[int] = (),
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._spaced = spaces_between_special_tokens and not skip_special_tokens
        self._window: list[int] = list(context_ids[-CONTEXT_TOKENS:])
        self._read = len(self._window)  # window[:read] is decoded text already sent (or context)
        self._read_text = self._decode(self._window)
        self._sent_past_read = 0  # characters sent beyond read_text, while the window is not clean

    def feed(self, token_ids: Sequence[int]) -> str:
        """The text that ``token_ids`` make final (often "", while a character or space is pending). Many
        ids at once cost one decode per ``MAX_WINDOW_TOKENS // 2`` of them, not one per id."""
        step = MAX_WINDOW_TOKENS // 2  # so that the window never outgrows MAX_WINDOW_TOKENS within a call
        if len(token_ids) > step:
            return "".join(self.feed(token_ids[i : i + step]) for i in range(0, len(token_ids), step))
        if self._skip_special:
            special = self._tokenizer.special_token_ids
            # Left out of the window too, as a decode of the whole leaves them out.
            token_ids = [i for i in token_ids if i not in special]
            if not token_ids:
                return ""
        self._window.extend(token_ids)
        text = self._decode(self._window)
        sent = len(self._read_text) + self._sent_past_read
        clean = not text.endswith(REPLACEMENT)
        if not clean and len(self._window) < MAX_WINDOW_TOKENS:
            # Send what precedes the unfinished character: it cannot change any more.
            stable = text.rstrip(REPLACEMENT)
            delta = stable[sent:]
            self._sent_past_read += len(delta)
            return delta
        if len(text) <= len(self._read_text) and len(self._window) < MAX_WINDOW_TOKENS:
            return ""  # nothing new yet (a skipped special token, a lone SentencePiece space)
        delta = text[sent:]
        # The text is clean up to the newest token: the window moves on to start at the old read point.
        self._window = self._window[self._read :][-MAX_WINDOW_TOKENS // 2 :]
        self._read = len(self._window)
        self._read_text = self._decode(self._window)
        self._sent_past_read = 0
        return delta

    def flush(self) -> str:
        """Text still held when the stream ends (an unfinished character decodes as U+FFFD, as in a
        decode of the whole)."""
        text = self._decode(self._window)
        delta = text[len(self._read_text) + self._sent_past_read :]
        self._sent_past_read += len(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        if not self._spaced or not any(i in self._tokenizer.special_token_ids for i in ids):
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._tokenizer.special_token_ids:
                if run:
                    pieces.append(self._tokenizer.decode(run))
                    run = []
                pieces.append(self._tokenizer.decode([i]))
            else:
                run.append(i)
        if run:
            pieces.append(self._tokenizer.decode(run))
        return " ".join(pieces)


@dataclasses.dataclass(frozen=True)
class Finish:
    """Why a choice ended: ``"stop"`` (a stop string, a stop token, end of sequence) or ``"length"``.

    ``stop`` is the stop string or token id that matched (vLLM's ``stop_reason``), None for the model's
    own end of sequence and for ``"length"``.
    """

    reason: Literal["stop", "length"]
    stop: str | int | None = None


class StopChecker:
    """Holds back text that may begin a stop string, and cuts the text at the one that completes first.

    Only the held text is searched: text already sent cannot start a match, because any text that could
    is held until it cannot. The held text is shorter than the longest stop string plus one delta.
    """

    def __init__(self, stop: Sequence[str], *, include_stop_str_in_output: bool = False) -> None:
        self._stop = [s for s in dict.fromkeys(stop) if s]
        self._include = include_stop_str_in_output
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> str:
        """The part of the text so far that may be sent now; after a match, nothing more."""
        if self.matched is not None:
            return ""
        if not self._stop:
            return text
        held = self._held + text
        # The stop string that completes first (then the one that starts first): the one a stream fed a
        # character at a time meets first, so the cut is the same however the text is split.
        first: tuple[int, int, str] | None = None
        for stop in self._stop:
            at = held.find(stop)
            if at >= 0 and (first is None or (at + len(stop), at) < first[:2]):
                first = (at + len(stop), at, stop)
        if first is not None:
            _, at, stop = first
            self.matched = stop
            self._held = ""
            return held[: at + len(stop)] if self._include else held[:at]
        keep = self._partial_suffix(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The held text, when the text ends without a match."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest end of ``text`` that is the beginning of a stop string."""
        return max(partial_marker(text, stop) for stop in self._stop)


@dataclasses.dataclass(frozen=True)
class Step:
    """What one call of :meth:`ChoiceDecoder.feed` gives: text to send now, and the finish if it ended."""

    text: str
    finish: Finish | None = None


class ChoiceDecoder:
    """One choice of a completion: the engine's token ids in, text to send and its finish out.

    ``stop``: stop strings; ``stop_token_ids``: ids that end the choice (their text is not sent, unless
    ``include_stop_str_in_output``); the tokenizer's end-of-sequence ids end it too unless ``ignore_eos``
    (their text is never sent); ``max_tokens`` ends it with ``"length"``. Tokens fed after the end are
    ignored. When the engine ends the stream itself, :meth:`flush` gives the text still held.
    ``context_ids``, the prompt's last ids, let the first token's space come out as it does after the
    prompt (vLLM primes its decoder the same way); without them the text is the decode of the output alone.
    """

    def __init__(
        self,
        tokenizer: EngineTokenizer,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Collection[int] = (),
        ignore_eos: bool = False,
        include_stop_str_in_output: bool = False,
        max_tokens: int | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = False,
        context_ids: Sequence[int] = (),
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(
            tokenizer,
            skip_special_tokens=skip_special_tokens,
            spaces_between_special_tokens=spaces_between_special_tokens,
            context_ids=context_ids,
        )
        self._stops = StopChecker(stop, include_stop_str_in_output=include_stop_str_in_output)
        self._stop_ids = frozenset(stop_token_ids)
        self._eos_ids = frozenset() if ignore_eos else tokenizer.eos_token_ids
        self._ending_ids = self._eos_ids | self._stop_ids
        self._include_stop = include_stop_str_in_output
        self._max_tokens = max_tokens
        self.tokens = 0  # ids taken, the completion's token count
        self.finish: Finish | None = None

    def feed(self, token_ids: Iterable[int]) -> Step:
        """Take the next ids (one or more engine messages' worth); the text they make final, and the finish.

        The ids before the first that ends the choice (a stop or end-of-sequence id, the ``max_tokens``-th)
        are decoded at once: a stop string's cut is the same however the text is split."""
        if self.finish is not None:
            return Step("", self.finish)
        ids = token_ids if isinstance(token_ids, list) else list(token_ids)
        run = ids if self._max_tokens is None else ids[: max(0, self._max_tokens - self.tokens)]
        cut = len(run)
        if not self._ending_ids.isdisjoint(run):
            cut = next(k for k, token_id in enumerate(run) if token_id in self._ending_ids)
        pieces: list[str] = []
        if cut:
            self.tokens += cut
            pieces.append(self._stops.feed(self._detokenizer.feed(run[:cut])))
            if self._stops.matched is not None:
                self.finish = Finish("stop", self._stops.matched)
                return Step("".join(pieces), self.finish)
        if cut < len(run):  # run[cut] ends the choice
            token_id = run[cut]
            self.tokens += 1
            if self._include_stop and token_id in self._stop_ids:
                pieces.append(self._stops.feed(self._detokenizer.feed([token_id])))
            if self._stops.matched is None:
                pieces.append(self._flush())
            stop = None if token_id in self._eos_ids else token_id
            self.finish = Finish("stop", self._stops.matched or stop)
        elif self._max_tokens is not None and self.tokens >= self._max_tokens:
            pieces.append(self._flush())
            self.finish = Finish("stop", self._stops.matched) if self._stops.matched else Finish("length")
        return Step("".join(pieces), self.finish)

    def flush(self) -> str:
        """The text still held, when the engine ended the stream (its own finish, a length limit); a stop
        string found in it sets :attr:`finish`."""
        if self.finish is not None:
            return ""
        text = self._flush()
        if self._stops.matched is not None:
            self.finish = Finish("stop", self._stops.matched)
        return text

    def _flush(self) -> str:
        text = self._stops.feed(self._detokenizer.flush())
        if self._stops.matched is not None:
            return text
        return text + self._stops.flush()
