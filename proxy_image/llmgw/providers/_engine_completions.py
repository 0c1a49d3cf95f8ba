"""OpenAI's legacy Completions API (``POST /v1/completions``) served by an inference engine, as vLLM's OpenAI
server serves it: the prompt as the client wrote it, no chat template.

* **request**: ``prompt`` is a string, a list of strings, a list of token ids or a list of such lists; each
  prompt is a Generate call of its own, its choices numbered ``prompt_index * n + i``; a text prompt is
  tokenized with the model's special tokens (its BOS, for a model that has one), as vLLM does unless
  ``add_special_tokens`` is false. The sampling parameters are the chat path's
  (:func:`._engine_request.sampling_of`), ``max_tokens`` 16 when unset (OpenAI's default, which vLLM keeps).
  What an engine cannot do (``suffix``, ``best_of`` other than ``n``, the prompt's logprobs that ``echo``
  with ``logprobs`` asks for) and what the API does not have is refused (400) by name.
* **answer**: each choice's ids through :class:`llmgw.engine.ChoiceDecoder` (text, stop strings, the finish
  and vLLM's ``stop_reason``); logprobs in the legacy layout (``tokens``, ``token_logprobs``,
  ``top_logprobs`` a dict per token, ``text_offset``); ``echo`` puts the prompt's text first. Unary: vLLM's
  ``text_completion`` object. Streamed: a ``text_completion`` chunk per choice's delta, the finish on its
  last, a usage chunk when ``stream_options.include_usage`` asks, then ``[DONE]``: Server-Sent Events
  ``(name, data)`` as the REST front writes a relayed stream's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from llmgw.codecs.openai_chat import clip
from llmgw.engine import ChoiceDecoder, EngineTokenizer, Finish
from llmgw.providers._engine_protocol import ModelInfo, Sampling
from llmgw.providers._engine_request import (
    check_prompt,
    decoder_stop_ids,
    invalid,
    prepared,
    read_constraint,
    read_flag,
    read_integer,
    sampling_of,
)
from llmgw.providers.base import CallStats

if TYPE_CHECKING:
    from llmgw.providers.engine import EngineClient

# The fields of OpenAI's Completions API an engine carries (suffix and best_of only as checked below), and
# those of vLLM's own it reads too.
_FIELDS = frozenset(
    {
        "model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
        "frequency_penalty", "logit_bias", "logprobs", "echo", "stream", "stream_options", "user", "suffix",
        "best_of",
    }
)  # fmt: skip
_NATIVE_FIELDS = frozenset(
    {
        "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
        "spaces_between_special_tokens", "stop_token_ids", "include_stop_str_in_output", "add_special_tokens",
        "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
        "guided_grammar",
    }
)  # fmt: skip
DEFAULT_MAX_TOKENS = 16
_MAX_LOGPROBS = 20  # vLLM's default max_logprobs
_LOGPROB_FLOOR = -9999.0  # vLLM's floor: -inf is no JSON number
_DONE = ("", b"[DONE]")


@dataclasses.dataclass
class _Prompt:
    ids: list[int]
    text: str  # what echo writes: the prompt as sent, or a token prompt's decode
    sampling: Sampling


@dataclasses.dataclass
class _Plan:
    prompts: list[_Prompt]
    n: int
    logprobs: int | None
    echo: bool
    include_usage: bool


@dataclasses.dataclass
class _Delta:
    """What one choice adds in one step: text, its tokens' logprobs, and the finish on its last."""

    index: int
    text: str
    logprobs: list[tuple[str, float, dict[str, float]]]  # (token, logprob, top alternatives)
    finish: Finish | None


@dataclasses.dataclass
class _Counts:
    """One prompt's token counts, once its choices are done."""

    prompt: int
    completion: int
    cached: int


def _check_fields(body: Mapping[str, Any], provider: str) -> None:
    for key, value in body.items():
        if value is not None and key not in _FIELDS and key not in _NATIVE_FIELDS:
            raise invalid(
                f"{clip(key)}: not a field provider {provider!r} can carry to its inference engine in the "
                "Completions API"
            )
    if body.get("suffix") is not None:
        raise invalid(f"suffix: provider {provider!r}'s inference engine only continues a prompt")


def _prompt_items(value: Any) -> list[str | list[int]]:
    if isinstance(value, str) or (isinstance(value, list) and value and all(type(t) is int for t in value)):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str | list) for p in value):
        return list(value)
    raise invalid("prompt: must be a string, a list of strings, a list of token ids or a list of such lists")


def _size(prompt: Any) -> int:
    """A prompt's characters or token ids, all of a list's: the work of planning it."""
    if isinstance(prompt, list):
        return sum(len(p) if isinstance(p, str | list) else 1 for p in prompt)
    return len(prompt) if isinstance(prompt, str) else 0


def plan_completion(
    body: Mapping[str, Any], *, provider: str, tokenizer: EngineTokenizer, info: ModelInfo, seed_bits: int
) -> _Plan:
    """The request's prompts and sampling parameters; a GatewayError (400) naming what cannot be done."""
    _check_fields(body, provider)
    n = read_integer(body, "n", 1, 128) or 1
    best_of = read_integer(body, "best_of", 1, 128)
    if best_of is not None and best_of != n:
        raise invalid(
            f"best_of: provider {provider!r}'s inference engine cannot rank choices, so best_of must be n ({n})"
        )
    logprobs = read_integer(body, "logprobs", 0, _MAX_LOGPROBS)
    echo = read_flag(body, "echo", False)
    if echo and logprobs is not None:
        raise invalid(
            f"echo with logprobs: provider {provider!r} does not ask its inference engine for the prompt's "
            "logprobs (send one of them)"
        )
    stream = read_flag(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid("stream_options: only with stream: true")
        if not isinstance(options, dict):
            raise invalid("stream_options: must be an object")
        include_usage = read_flag(options, "include_usage", False)
        if read_flag(options, "continuous_usage_stats", False):
            raise invalid(f"stream_options.continuous_usage_stats: not served by provider {provider!r}")
    add_special_tokens = read_flag(body, "add_special_tokens", True)
    max_tokens = read_integer(body, "max_tokens", 1, 2**31 - 1)
    constraint = read_constraint(body)
    items = _prompt_items(body.get("prompt"))
    prompts = []
    for i, item in enumerate(items):
        field = "prompt" if len(items) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            ids, text = tokenizer.encode(item, add_special_tokens=add_special_tokens), item
        elif all(type(t) is int and 0 <= t < tokenizer.vocab_size for t in item):
            ids, text = list(item), tokenizer.decode(item)
        else:
            raise invalid(f"{field}: token ids must be integers from 0 to {tokenizer.vocab_size - 1}")
        check_prompt(ids, info, field)
        sampling = sampling_of(
            body,
            tokenizer=tokenizer,
            info=info,
            prompt_tokens=len(ids),
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            logprobs=logprobs,
            seed_bits=seed_bits,
            constraint=constraint,
        )
        prompts.append(_Prompt(ids, text, sampling))
    return _Plan(prompts, n, logprobs, echo, include_usage)


class _Choice:
    """One choice: the engine's ids in, what it adds out (:meth:`take`, once per step)."""

    def __init__(self, index: int, decoder: ChoiceDecoder, echo: str) -> None:
        self.index = index
        self.decoder = decoder
        self.tokens = 0
        self.done = False
        self.finish: Finish | None = None
        self._text = [echo] if echo else []
        self._logprobs: list[tuple[str, float, dict[str, float]]] = []
        self._finish_sent = False

    def add_logprobs(self, entries: list[tuple[str, float, dict[str, float]]]) -> None:
        if not self.done:
            self._logprobs.extend(entries)

    def feed(self, ids: list[int]) -> None:
        self.tokens += len(ids)
        if self.done:
            return
        step = self.decoder.feed(ids)
        self._text.append(step.text)
        if step.finish is not None:
            self.done, self.finish = True, step.finish

    def end(self, reason: str) -> None:
        """The engine ended the choice: the text still held, and the engine's reason unless the decoder
        knows a better one (the stop string or token that matched)."""
        if self.done:
            return
        self._text.append(self.decoder.flush())
        self.done = True
        self.finish = self.decoder.finish or Finish("length" if reason == "length" else "stop")

    def take(self) -> _Delta | None:
        text = "".join(self._text)
        finish = self.finish if self.done and not self._finish_sent else None
        if not (text or self._logprobs or finish):
            return None
        self._finish_sent = self._finish_sent or finish is not None
        delta = _Delta(self.index, text, self._logprobs, finish)
        self._text, self._logprobs = [], []
        return delta


def _logprob_entries(
    logprobs: Any, top: int, token_text: dict[int, str], tokenizer: EngineTokenizer
) -> list[tuple[str, float, dict[str, float]]]:
    """Each sampled token's text and logprob, and its alternatives as vLLM lists them: the sampled token
    first, then the engine's top ones, ``top + 1`` at most."""

    def text(token_id: int) -> str:
        if token_id not in token_text:
            token_text[token_id] = tokenizer.decode([token_id])
        return token_text[token_id]

    entries = []
    tops = list(logprobs.top_logprobs)
    for i, (token_id, value) in enumerate(zip(logprobs.token_ids, logprobs.token_logprobs, strict=False)):
        ranked = {token_id: value}
        if i < len(tops):
            for alt_id, alt_value in zip(tops[i].token_ids, tops[i].values, strict=False):
                ranked.setdefault(alt_id, alt_value)
        alternatives = {
            text(alt_id): max(alt_value, _LOGPROB_FLOOR)
            for alt_id, alt_value in list(ranked.items())[: top + 1]
        }
        entries.append((text(token_id), max(value, _LOGPROB_FLOOR), alternatives))
    return entries


async def _prompt_deltas(
    client: EngineClient,
    request_id: str,
    prompt: _Prompt,
    first: int,
    plan: _Plan,
    tokenizer: EngineTokenizer,
    info: ModelInfo,
    deadline: float,
    stats: CallStats,
) -> AsyncGenerator[list[_Delta] | _Counts, None]:
    """One prompt's choices (numbered from ``first``), a step at a time; its counts last."""
    s = prompt.sampling
    stop_ids = decoder_stop_ids(s, info)
    choices = [
        _Choice(
            first + i,
            ChoiceDecoder(
                tokenizer,
                stop=s.stop,
                stop_token_ids=stop_ids,
                ignore_eos=s.ignore_eos,
                include_stop_str_in_output=s.include_stop_str_in_output,
                max_tokens=s.max_tokens,
                skip_special_tokens=s.skip_special_tokens,
                context_ids=prompt.ids,
            ),
            prompt.text if plan.echo else "",
        )
        for i in range(plan.n)
    ]
    token_text: dict[int, str] = {}
    cached = 0
    batches = client.generate_batches(request_id, prompt.ids, s, info, deadline, stats)
    async with contextlib.aclosing(batches):
        async for batch in batches:
            # A choice's ids of one batch are fed at once (one delta), as the chat path does.
            cached = max(cached, batch.cached_tokens)
            for step in batch.steps:
                choice = choices[step.index]
                if plan.logprobs is not None:
                    for logprobs in step.logprobs:
                        choice.add_logprobs(_logprob_entries(logprobs, plan.logprobs, token_text, tokenizer))
                if step.finish in ("abort", "error") and not choice.done:
                    raise client.ended_by_engine(step.finish)
                choice.feed(step.ids)
                if step.finish is None:
                    continue
                if not choice.done and not choice.tokens and step.complete_ids:
                    choice.feed(list(step.complete_ids))  # an engine that sent no chunks
                choice.end(step.finish)
            deltas = [delta for c in choices if (delta := c.take()) is not None]
            if deltas:
                yield deltas
    yield _Counts(len(prompt.ids), sum(c.tokens for c in choices), cached)


async def _merged(
    streams: list[AsyncGenerator[list[_Delta] | _Counts, None]],
) -> AsyncGenerator[list[_Delta] | _Counts, None]:
    """The items of every prompt's stream as they come; the first error ends them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[list[_Delta] | _Counts | None, Exception | None]] = asyncio.Queue(len(streams))

    async def pump(stream: AsyncGenerator[list[_Delta] | _Counts, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for item in stream:
                    await queue.put((item, None))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((None, exc))
        else:
            await queue.put((None, None))

    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            got, error = await queue.get()
            if error is not None:
                raise error
            if got is None:
                running -= 1
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _start(
    client: EngineClient, request_id: str, body: Mapping[str, Any], timeout: float, stats: CallStats
) -> tuple[_Plan, AsyncGenerator[list[_Delta] | _Counts, None]]:
    """The request's plan, and its answer's steps: each prompt's deltas, then its counts."""
    deadline = time.monotonic() + timeout
    state = await client.model(deadline)
    if not state.info.is_generation:
        raise invalid(
            f"model: provider {client.provider.name!r} serves an embedding model, not a generative one"
        )
    prepare = functools.partial(
        plan_completion,
        body,
        provider=client.provider.name,
        tokenizer=state.tokenizer,
        info=state.info,
        seed_bits=client.protocol.seed_bits,
    )
    plan = await prepared(prepare, _size(body.get("prompt")))
    streams = [
        _prompt_deltas(
            client,
            f"{request_id}-{i}" if len(plan.prompts) > 1 else request_id,
            prompt,
            i * plan.n,
            plan,
            state.tokenizer,
            state.info,
            deadline,
            stats,
        )
        for i, prompt in enumerate(plan.prompts)
    ]
    return plan, _merged(streams)


def _logprobs_json(entries: list[tuple[str, float, dict[str, float]]], offset: int) -> dict[str, Any]:
    """The legacy layout; ``text_offset`` counts each token's text from ``offset``, as vLLM does."""
    offsets = []
    for token, _, _ in entries:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": [token for token, _, _ in entries],
        "token_logprobs": [value for _, value, _ in entries],
        "top_logprobs": [top for _, _, top in entries],
        "text_offset": offsets,
    }


def _usage(counts: list[_Counts]) -> dict[str, Any]:
    prompt = sum(c.prompt for c in counts)
    completion = sum(c.completion for c in counts)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": sum(c.cached for c in counts)},
    }


async def answer(client: EngineClient, body: Mapping[str, Any], timeout: float, stats: CallStats) -> Any:
    """The unary answer: vLLM's ``text_completion`` object."""
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[tuple[str, float, dict[str, float]]]] = {}
    finishes: dict[int, Finish] = {}
    counts: list[_Counts] = []
    request_id = "cmpl-" + secrets.token_hex(16)
    created = int(time.time())
    plan, steps = await _start(client, request_id, body, timeout, stats)
    async with contextlib.aclosing(steps):
        async for step in steps:
            if isinstance(step, _Counts):
                counts.append(step)
                continue
            for delta in step:
                texts.setdefault(delta.index, []).append(delta.text)
                logprobs.setdefault(delta.index, []).extend(delta.logprobs)
                if delta.finish is not None:
                    finishes[delta.index] = delta.finish
    choices = []
    for index in range(len(plan.prompts) * plan.n):
        finish = finishes.get(index)
        choices.append(
            {
                "index": index,
                "text": "".join(texts.get(index, ())),
                "logprobs": None if plan.logprobs is None else _logprobs_json(logprobs.get(index, []), 0),
                "finish_reason": finish.reason if finish else None,
                "stop_reason": finish.stop if finish else None,
                "prompt_logprobs": None,
            }
        )
    return {
        "id": request_id,
        "object": "text_completion",
        "created": created,
        "model": body.get("model"),
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": _usage(counts),
        "kv_transfer_params": None,
    }


async def events(
    client: EngineClient, body: Mapping[str, Any], timeout: float, stats: CallStats
) -> AsyncGenerator[tuple[str, bytes], None]:
    """The streamed answer as Server-Sent Events: a chunk per choice's delta, the usage, ``[DONE]``."""
    request_id = "cmpl-" + secrets.token_hex(16)
    head = {
        "id": request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model"),
    }
    sent: dict[int, int] = {}  # each choice's characters so far: where its next logprobs' offsets start
    counts: list[_Counts] = []
    plan, steps = await _start(client, request_id, body, timeout, stats)
    async with contextlib.aclosing(steps):
        async for step in steps:
            if isinstance(step, _Counts):
                counts.append(step)
                continue
            for delta in step:
                offset = sent.get(delta.index, 0)
                sent[delta.index] = offset + len(delta.text)
                choice = {
                    "index": delta.index,
                    "text": delta.text,
                    "logprobs": None if plan.logprobs is None else _logprobs_json(delta.logprobs, offset),
                    "finish_reason": delta.finish.reason if delta.finish else None,
                    "stop_reason": delta.finish.stop if delta.finish else None,
                }
                yield "", orjson.dumps({**head, "choices": [choice]})
    if plan.include_usage:
        yield "", orjson.dumps({**head, "choices": [], "usage": _usage(counts)})
    yield _DONE
