"""The ``vllm``, ``sglang`` and ``trtllm`` provider types' client: inference engines over their own gRPC protocols.

An engine takes a prompt as token ids and streams generated ids back; this client does what vLLM's OpenAI
server (or the SMG router) does around it, with :mod:`llmgw.engine`:

* **workers** (:mod:`._engine_workers`): every address the target resolves to is an engine, with its own
  channel; a request goes to the one with the fewest outstanding requests, one that fails with
  UNAVAILABLE sits out a while, a new one answers ``HealthCheck`` before its first request;
* **model**: ``GetModelInfo`` (context length, EOS ids, default sampling parameters) and the tokenizer, from
  ``tokenizerPath`` or the engine's ``GetTokenizer`` archive, fetched from one worker once (concurrent first
  requests share the fetch) and kept by the archive's SHA-256; a chat request goes only to a worker serving
  that model, and when none does any more while others serve another (the fleet moved to a new model), that
  one is loaded and served;
* **request** (:mod:`._engine_request`): the chat template renders the conversation, tools and documents;
  the prompt's ids and the sampling parameters (the model's defaults for what the client left unset) go to
  ``Generate``; a field the engine cannot carry is refused (400) by name; images go as the engine says it
  takes them (:mod:`llmgw.engine.media`: vLLM's ``GetServerInfo``), and the usage then counts the prompt
  the engine expanded them into;
* **answer**: each choice's ids run through :class:`llmgw.engine.ChoicePipeline` (text, stop strings held
  back, reasoning, tool calls) into OpenAI-layout chunks: a role chunk, content/reasoning/tool-call deltas,
  each choice's finish, then a usage chunk; a unary answer is those chunks put together;
* **the legacy Completions API** (:mod:`._engine_completions`): ``/v1/completions``, the prompt as written
  (no chat template), in vLLM's ``text_completion`` layout; the **Responses API** (:mod:`._responses`):
  ``/v1/responses`` on top of the chat path, as vLLM's OpenAI server and SMG serve it;
* **cancellation**: a client that goes away resets the call and sends ``Abort`` for its request id.

Messages name the provider, never a worker's address (the log has it), and an engine's own text only
through :func:`llmgw.redact.redact`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import secrets
import struct
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import grpc
import orjson
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw._net import grpc_channel
from llmgw._net.grpc_wire import RpcError
from llmgw.engine import (
    ArgumentsDelta,
    ChoiceDecoder,
    ChoicePipeline,
    ContentDelta,
    EngineTokenizer,
    TokenizerError,
    ToolCallStart,
    read_tokenizer_archive,
    reasoning_parser,
    tool_parser,
)
from llmgw.engine.media import MediaSupport
from llmgw.engine.tool_parsers import openai_call_id
from llmgw.errors import GatewayError, Kind, from_upstream_grpc
from llmgw.providers import _engine_completions, _responses
from llmgw.providers._engine_protocol import (
    PROTOCOLS,
    ModelInfo,
    Protocol,
    Sampling,
    Unsupported,
    common_pb2,
)
from llmgw.providers._engine_request import NATIVE_FIELDS, Plan, invalid, plan, prepared
from llmgw.providers._engine_workers import ModelKey, ModelMoved, Worker, WorkerPool
from llmgw.providers.base import (
    MAX_RELAYED_CHARS,
    CallStats,
    OnLimit,
    limit_exceeded,
    malformed_response,
    timed_out,
)
from llmgw.redact import redact
from llmgw_common.config import Limits, Provider
from llmgw_common.providers.engine import EngineSettings

log = logging.getLogger("llmgw.providers")

ABORT_TIMEOUT = 2.0  # the bound of the Abort sent for a request whose client went away
_UNAVAILABLE_LOG_INTERVAL = 10.0
_TOKENIZERS_KEPT = 8
# Tokenizers by (model path, served name, SHA-256 of their files), shared by every client of the process (a
# reload makes new clients: they fetch the archive again, but do not build its tokenizer again).
_tokenizers: dict[tuple[str, str, str], EngineTokenizer] = {}


@dataclasses.dataclass(slots=True)
class ChoiceStep:
    """What one batch of a Generate answer says of one choice: its new ids (one delta), their logprobs, and
    its end when the batch holds its Complete."""

    index: int
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[Any] = dataclasses.field(default_factory=list)  # the chunks' OutputLogProbs, in order
    finish: str | None = None  # the Complete's finish reason ("" when it gives none)
    # The Complete's output ids, read only from an engine that sent no chunks (so not copied here).
    complete_ids: Sequence[int] = ()


@dataclasses.dataclass(slots=True)
class Batch:
    """The messages of a Generate answer already received, by choice (in the order they first appear)."""

    steps: list[ChoiceStep]
    cached_tokens: int  # the most any message says
    prompt_tokens: int


class _Model:
    """What a provider's requests need of its model: the engine's info, the tokenizer, what it takes of
    images."""

    __slots__ = ("info", "media", "tokenizer")

    def __init__(self, info: ModelInfo, tokenizer: EngineTokenizer, media: MediaSupport) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.media = media


def _read_directory(path: str, max_bytes: int) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    total = 0
    with os.scandir(path) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            # A mounted ConfigMap's keys are symlinks (followed here) into the kubelet's hidden ..data and
            # ..<timestamp> entries, which are no keys: a ConfigMap key cannot start with "..".
            if entry.name.startswith("..") or not entry.is_file():
                continue
            size = entry.stat().st_size
            if entry.name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
                continue  # weights, never the tokenizer's
            total += size
            if total > max_bytes:
                raise TokenizerError(f"the tokenizer files are over maxTokenizerBytes ({max_bytes} bytes)")
            with open(entry.path, "rb") as f:
                files[entry.name] = f.read(size + 1)
    return files


def _tokenizer_of(files: dict[str, bytes], key: tuple[str, str, str]) -> EngineTokenizer:
    tokenizer = _tokenizers.get(key)
    if tokenizer is None:
        tokenizer = EngineTokenizer.from_files(files)
        if len(_tokenizers) >= _TOKENIZERS_KEPT:
            _tokenizers.pop(next(iter(_tokenizers)), None)
        _tokenizers[key] = tokenizer
    return tokenizer


def _files_digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class _Choice:
    """One choice of an answer: its pipeline in, its ChunkChoice parts out."""

    def __init__(self, index: int, pipeline: ChoicePipeline, p: Plan, client: EngineClient) -> None:
        self.index = index
        self.pipeline = pipeline
        self.plan = p
        self.client = client
        self.tokens = 0
        self.done = False
        self.forced_text: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # entries not yet sent

    def _part(self, reasoning: str, events: list[Any], finish: str | None) -> pb.ChunkChoice | None:
        delta = pb.ChunkDelta()
        if reasoning:
            delta.reasoning_content = reasoning
        content: list[str] = []
        for event in events:
            if isinstance(event, ContentDelta):
                if self.plan.forced:  # a named function: the text is its arguments, streamed as they come
                    self._named_arguments(delta, event.text)
                elif self.plan.forced is not None:
                    self.forced_text.append(event.text)  # required: an array of calls, read at the end
                else:
                    content.append(event.text)
            elif isinstance(event, ToolCallStart):
                delta.tool_calls.add(
                    index=event.index, id=event.id, type="function", name=event.name, arguments=""
                )
            elif isinstance(event, ArgumentsDelta):
                last = delta.tool_calls[-1] if delta.tool_calls else None
                if last is not None and last.index == event.index:
                    last.arguments += event.text
                else:
                    delta.tool_calls.add(index=event.index, arguments=event.text)
        if finish is not None and self.plan.forced == "":
            calls = self._required_calls()
            for i, (name, arguments) in enumerate(calls):
                delta.tool_calls.add(
                    index=i, id=openai_call_id(), type="function", name=name, arguments=arguments
                )
            if not calls and "".join(self.forced_text).strip():  # not an array of calls (cut short): text
                content.append("".join(self.forced_text))
        if content:
            delta.content = "".join(content)
        if not (reasoning or content or delta.tool_calls or finish is not None):
            return None
        part = pb.ChunkChoice(index=self.index, delta=delta)
        if finish is not None:
            part.finish_reason = finish
        if self.logprobs:
            part.logprobs_json = orjson.dumps({"content": self.logprobs}).decode()
            self.logprobs = []
        return part

    def _named_arguments(self, delta: pb.ChunkDelta, text: str) -> None:
        if not self.forced_text:  # the call opens with its first non-blank text
            text = text.lstrip()
            if not text:
                return
            self.forced_text.append(text)
            delta.tool_calls.add(
                index=0, id=openai_call_id(), type="function", name=self.plan.forced, arguments=text
            )
        elif delta.tool_calls:
            delta.tool_calls[-1].arguments += text
        else:
            delta.tool_calls.add(index=0, arguments=text)

    def _required_calls(self) -> list[tuple[str, str]]:
        text = "".join(self.forced_text).strip()
        try:
            items = orjson.loads(text)
        except orjson.JSONDecodeError:
            return []
        if not isinstance(items, list):
            return []
        return [
            (str(item.get("name")), orjson.dumps(item.get("parameters", {})).decode())
            for item in items
            if isinstance(item, dict)
        ]

    def _finish(self, reason: str) -> str:
        if self.plan.forced == "" and reason == "stop":
            return "tool_calls"
        if self.plan.tool_choice_auto and self.pipeline.tool_calls:
            return "tool_calls"
        return reason

    def add_logprobs(self, logprobs: Any) -> None:
        if not self.done:
            self.logprobs.extend(self.client.logprob_entries(logprobs, self.plan.top_logprobs))

    def feed(self, ids: list[int]) -> pb.ChunkChoice | None:
        self.tokens += len(ids)
        if self.done:
            return None
        step = self.pipeline.feed(ids)
        finish = None
        if step.finish is not None:
            self.done = True
            finish = self._finish(step.finish.reason)
        return self._part(step.reasoning, step.events, finish)

    def end(self, reason: str) -> pb.ChunkChoice | None:
        if self.done:
            return None
        self.done = True
        step = self.pipeline.end()
        final = step.finish.reason if step.finish is not None else reason
        return self._part(step.reasoning, step.events, self._finish(final))


class EngineClient:
    native_fields: frozenset[str] = NATIVE_FIELDS

    def __init__(
        self, provider: Provider, api_key: str | None, limits: Limits, on_limit: OnLimit | None = None
    ) -> None:
        self.provider = provider
        self.settings: EngineSettings = provider.settings
        self.protocol: Protocol = PROTOCOLS[provider.type]
        self._logged_unavailable = float("-inf")
        metadata = ((("authorization", f"Bearer {api_key}"),) if api_key else ()) + tuple(provider.headers)
        self.pool = WorkerPool(
            self.settings.target,
            tls=self.settings.tls,
            metadata=metadata,
            limits=limits.grpc_client,
            connect_timeout=provider.connect_timeout_s,
            resolve_interval=self.settings.resolve_interval_s,
            on_limit=None if on_limit is None else lambda key: on_limit(f"grpcClient.{key}"),
            health=self._health,
            load=self._load,
            loads_interval=self.settings.loads_interval_s,
        )
        self._model: asyncio.Future[_Model] | None = None
        self._aborts: set[asyncio.Task[None]] = set()
        self._token_text: dict[int, str] = {}

    # -- errors ---------------------------------------------------------------------------------------

    def error(self, exc: RpcError, worker: Worker | None = None) -> GatewayError:
        if isinstance(exc, ModelMoved):  # after this request was prepared: the next one loads the new model
            self._forget(exc.asked)
        code = exc.code
        name = self.provider.name
        details = redact(exc.details or "")
        hidden = [self.pool.target, *(w.name for w in self.pool.workers.values())]
        if worker is not None:
            hidden.append(worker.name)
        if any(h in details for h in hidden):
            now = time.monotonic()
            if now - self._logged_unavailable >= _UNAVAILABLE_LOG_INTERVAL:
                self._logged_unavailable = now
                log.warning("provider %r%s: %s", name, f" (worker {worker.name})" if worker else "", details)
            for h in sorted(hidden, key=len, reverse=True):
                details = details.replace(h, "the provider")
        details = details[:MAX_RELAYED_CHARS]
        if isinstance(exc, grpc_channel.CallTimeout):
            return timed_out(self.provider, exc)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and details.startswith("Deadline Exceeded"):
            return timed_out(self.provider, TimeoutError("the request's deadline passed"))
        if isinstance(exc, grpc_channel.LimitExceeded):
            return limit_exceeded(self.provider, f"grpcClient.{exc.limit}", details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            message = f"provider {name!r} rejected the gateway's credentials ({code.name})"
        elif code == grpc.StatusCode.INVALID_ARGUMENT:
            message = f"provider {name!r} refused the request: {details}"
        elif code == grpc.StatusCode.UNAVAILABLE:  # no engine to answer: 503, as an engine's own server says
            return GatewayError(
                Kind.UNAVAILABLE,
                f"provider {name!r} is unavailable: {details}".rstrip(": "),
                retryable=True,
                upstream_status=503,
            )
        else:
            message = f"provider {name!r} failed with {code.name}: {details}".rstrip(": ")
        return from_upstream_grpc(code, message)

    def ended_by_engine(self, reason: str) -> GatewayError:
        """A choice the engine ended with finish reason "abort" (503: retryable elsewhere) or "error"."""
        return GatewayError(
            Kind.UNAVAILABLE if reason == "abort" else Kind.BAD_GATEWAY,
            f"provider {self.provider.name!r}: the engine ended the request ({reason})",
            retryable=True,
            upstream_status=503 if reason == "abort" else 502,
        )

    def _broken(self, what: str) -> GatewayError:
        return GatewayError(
            Kind.BAD_GATEWAY, f"provider {self.provider.name!r}: {what}", retryable=True, upstream_status=502
        )

    # -- workers and the model ------------------------------------------------------------------------

    async def _health(self, worker: Worker, timeout: float) -> None:
        try:
            body = await worker.channel.unary(
                self.protocol.path("HealthCheck"), self.protocol.health(), timeout
            )
        except RpcError as exc:
            if exc.code == grpc.StatusCode.UNIMPLEMENTED:
                return  # an engine without the RPC: its first request will tell
            raise
        try:
            healthy, message = self.protocol.health_ok(body)
        except DecodeError:
            healthy, message = True, ""
        if not healthy:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"the engine is not ready: {message[:200]}")
        # Which model it serves: requests prepared with one model's tokenizer go to its workers only.
        body = await worker.channel.unary(
            self.protocol.path("GetModelInfo"), self.protocol.empty("GetModelInfoRequest"), timeout
        )
        try:
            worker.model = self.protocol.model_info(body).key
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None

    async def _load(self, worker: Worker, timeout: float) -> int:
        """The requests the worker's engine has, as its GetLoads says."""
        body = await worker.channel.unary(
            self.protocol.path("GetLoads"), self.protocol.empty("GetLoadsRequest"), timeout
        )
        try:
            return self.protocol.load(body)
        except DecodeError as exc:
            raise RpcError(grpc.StatusCode.INTERNAL, f"a malformed GetLoads answer: {exc}") from None

    async def _unary(self, worker: Worker, method: str, request: bytes, deadline: float) -> bytes:
        return await worker.channel.unary(
            self.protocol.path(method),
            request,
            max(0.001, deadline - time.monotonic()),
            first_message_timeout=self.provider.timeout_s,
        )

    async def _call(self, method: str, request: bytes, deadline: float, model: ModelKey | None) -> bytes:
        """One unary call, to a worker serving ``model``."""
        worker = await self.pool.acquire(deadline, model)
        failed = False
        try:
            return await self._unary(worker, method, request, deadline)
        except RpcError as exc:
            failed = exc.code == grpc.StatusCode.UNAVAILABLE
            raise
        finally:
            self.pool.release(worker, failed=failed)

    async def _tokenizer_archive(self, worker: Worker, deadline: float) -> tuple[bytes, str]:
        limit = self.settings.max_tokenizer_bytes
        parts: list[bytes] = []
        size = 0
        digest = ""
        chunks = worker.channel.server_stream(
            self.protocol.path("GetTokenizer"),
            common_pb2.GetTokenizerRequest().SerializeToString(),
            max(0.001, deadline - time.monotonic()),
            first_message_timeout=self.provider.timeout_s,
            idle_timeout=self.provider.idle_timeout_s,
        )
        try:
            async for body in chunks:
                chunk = common_pb2.GetTokenizerChunk.FromString(body)
                size += len(chunk.data)
                if size > limit:
                    raise self._broken(f"its tokenizer archive is over maxTokenizerBytes ({limit} bytes)")
                parts.append(chunk.data)
                if chunk.sha256:
                    digest = chunk.sha256
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        finally:
            await chunks.aclose()
        if not digest:
            raise self._broken("its tokenizer archive came without its SHA-256")
        return b"".join(parts), digest

    async def _load_model(self, deadline: float, model: ModelKey | None) -> _Model:
        """The model's info, what it takes of images and its tokenizer, all from one worker (one serving
        ``model``, when given: while a fleet moves to another model, two workers may serve two)."""
        worker = await self.pool.acquire(deadline, model)
        failed = False
        try:
            return await self._load_model_from(worker, deadline)
        except RpcError as exc:
            failed = exc.code == grpc.StatusCode.UNAVAILABLE
            raise
        finally:
            self.pool.release(worker, failed=failed)

    async def _load_model_from(self, worker: Worker, deadline: float) -> _Model:
        try:
            body = await self._unary(
                worker, "GetModelInfo", self.protocol.empty("GetModelInfoRequest"), deadline
            )
            info = self.protocol.model_info(body)
            server_info = None
            if self.protocol.server_info_tells_media:
                try:
                    server_info = await self._unary(
                        worker, "GetServerInfo", self.protocol.empty("GetServerInfoRequest"), deadline
                    )
                except RpcError as exc:
                    if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    # an engine without GetServerInfo: it says nothing of images, so it takes none
            media = self.protocol.media_support(server_info)
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        settings = self.settings
        try:
            if settings.tokenizer_path is not None:
                try:
                    files = await asyncio.to_thread(
                        _read_directory, settings.tokenizer_path, settings.max_tokenizer_bytes
                    )
                except OSError as exc:
                    raise TokenizerError(f"tokenizerPath cannot be read: {exc.strerror or exc}") from None
                digest = _files_digest(files)
            else:
                data, digest = await self._tokenizer_archive(worker, deadline)
                files = await asyncio.to_thread(
                    read_tokenizer_archive, data, digest, max_bytes=settings.max_tokenizer_bytes
                )
            key = (info.model_path, info.served_model_name, digest)
            tokenizer = _tokenizers.get(key)
            if tokenizer is None:
                tokenizer = await asyncio.to_thread(_tokenizer_of, files, key)
        except TokenizerError as exc:
            raise self._broken(f"its model's tokenizer cannot be used: {exc}") from None
        if not info.eos_token_ids:  # an engine that does not say them (TensorRT-LLM): the tokenizer's
            info = dataclasses.replace(info, eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)))
        log.info(
            "provider %r: model %r (context %d tokens), tokenizer %s",
            self.provider.name,
            info.served_model_name,
            info.max_context_length,
            digest[:12],
        )
        return _Model(info, tokenizer, media)

    async def model(self, deadline: float, served: ModelKey | None = None) -> _Model:
        """The model's info and tokenizer, fetched once (from a worker serving ``served``, when given); a
        failed fetch is tried again by the next request."""
        future = self._model
        if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
            future = self._model = asyncio.ensure_future(self._load_model(deadline, served))
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.001, deadline - time.monotonic()))
        except TimeoutError:
            raise timed_out(self.provider, TimeoutError("the request's deadline passed")) from None
        except RpcError as exc:
            raise self.error(exc) from None

    async def _model_and_worker(self, deadline: float) -> tuple[_Model, Worker]:
        """The model and a worker that serves it; when none does any more but others serve another model
        (the fleet moved to it), that model, loaded, and one of its workers. The worker is the caller's to
        release (through :meth:`generate_batches`)."""
        state = await self.model(deadline)
        try:
            return state, await self.pool.acquire(deadline, state.info.key)
        except ModelMoved as moved:
            log.warning(
                "provider %r: its engines now serve model %r, not %r: loading it",
                self.provider.name,
                moved.served[1],
                moved.asked[1],
            )
            self._forget(moved.asked)
            served = moved.served
        except RpcError as exc:
            raise self.error(exc) from None
        state = await self.model(deadline, served)
        try:
            return state, await self.pool.acquire(deadline, state.info.key)
        except RpcError as exc:
            raise self.error(exc) from None

    def _forget(self, key: ModelKey) -> None:
        """Drop the model ``key`` (unless another is already loaded or loading): the next request loads."""
        future = self._model
        if future is None or not future.done() or future.cancelled() or future.exception() is not None:
            return
        if future.result().info.key == key:
            self._model = None

    # -- generation -----------------------------------------------------------------------------------

    def logprob_entries(self, logprobs: Any, top: int) -> list[dict[str, Any]]:
        entries = []
        tops = list(logprobs.top_logprobs)
        for i, (token_id, value) in enumerate(zip(logprobs.token_ids, logprobs.token_logprobs, strict=False)):
            text = self._text(token_id)
            alternatives = []
            if top and i < len(tops):
                for alt_id, alt_value in list(zip(tops[i].token_ids, tops[i].values, strict=False))[:top]:
                    alt = self._text(alt_id)
                    alternatives.append({"token": alt, "logprob": alt_value, "bytes": list(alt.encode())})
            entries.append(
                {"token": text, "logprob": value, "bytes": list(text.encode()), "top_logprobs": alternatives}
            )
        return entries

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            model = self._model.result() if self._model is not None and self._model.done() else None
            text = model.tokenizer.decode([token_id]) if model is not None else ""
            if len(self._token_text) > 65536:
                self._token_text.clear()
            self._token_text[token_id] = text
        return text

    def _choices(self, p: Plan, tokenizer: EngineTokenizer) -> dict[int, _Choice]:
        choices = {}
        s = p.sampling
        for index in range(s.n):
            decoder = ChoiceDecoder(
                tokenizer,
                stop=s.stop,
                stop_token_ids=p.decoder_stop_ids,
                ignore_eos=s.ignore_eos,
                include_stop_str_in_output=s.include_stop_str_in_output,
                max_tokens=s.max_tokens,
                skip_special_tokens=s.skip_special_tokens,
                context_ids=p.ids,
            )
            pipeline = ChoicePipeline(
                decoder,
                reasoning=None
                if p.reasoning_parser is None
                else reasoning_parser(p.reasoning_parser, prompt=p.prompt),
                tools=None if p.tool_parser is None else tool_parser(p.tool_parser),
            )
            choices[index] = _Choice(index, pipeline, p, self)
        return choices

    def _abort_later(self, worker: Worker, request_id: str) -> None:
        async def abort() -> None:
            with contextlib.suppress(RpcError, TimeoutError, OSError):
                await worker.channel.unary(
                    self.protocol.path("Abort"), self.protocol.abort(request_id), ABORT_TIMEOUT
                )

        task = asyncio.get_running_loop().create_task(abort())
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _generate(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        """The answer in OpenAI's layout: a role chunk (with the first content), deltas, each choice's
        finish, then a usage chunk with no choices."""
        deadline = time.monotonic() + timeout
        state, worker = await self._model_and_worker(deadline)
        try:
            if not state.info.is_generation:
                raise invalid(
                    f"model: provider {self.provider.name!r} serves an embedding model, not a chat one"
                )
            settings = self.settings
            # A long conversation takes a while to render and tokenize: off the event loop.
            prepare = functools.partial(
                plan,
                req,
                provider=self.provider.name,
                tokenizer=state.tokenizer,
                info=state.info,
                chat_template=settings.chat_template,
                tool_call_parser=settings.tool_call_parser,
                reasoning_parser=settings.reasoning_parser,
                seed_bits=self.protocol.seed_bits,
                media=state.media,
            )
            p = await prepared(prepare, req.ByteSize())
        except BaseException:
            self.pool.release(worker)
            raise
        choices = self._choices(p, state.tokenizer)
        request_id = "chatcmpl-" + secrets.token_hex(16)
        created = int(time.time())
        cached = 0
        prompt_tokens = len(p.ids)  # the engine's own count when images expand the prompt
        role_sent = False
        parts: list[pb.ChunkChoice] = []
        batches = self.generate_batches(
            request_id, p.ids, p.sampling, state.info, deadline, stats, images=p.images, worker=worker
        )
        async with contextlib.aclosing(batches):
            async for batch in batches:
                # Every message already received is taken at once: a choice's tokens of one batch make one
                # delta, so a proxy that falls behind a fast engine catches up instead of falling further.
                cached = max(cached, batch.cached_tokens)
                if p.images:
                    prompt_tokens = max(prompt_tokens, batch.prompt_tokens)
                for step in batch.steps:
                    choice = choices[step.index]
                    if p.logprobs:
                        for logprobs in step.logprobs:
                            choice.add_logprobs(logprobs)
                    if step.finish in ("abort", "error") and not choice.done:
                        raise self.ended_by_engine(step.finish)
                    if step.ids and (part := choice.feed(step.ids)) is not None:
                        parts.append(part)
                    if step.finish is None:
                        continue
                    if not choice.done and not choice.tokens and step.complete_ids:
                        choice.feed(list(step.complete_ids))  # an engine that sent no chunks
                    if (part := choice.end(step.finish or "stop")) is not None:
                        parts.append(part)
                if not parts:
                    continue
                if not role_sent:
                    role_sent = True
                    opening = pb.ChatChunk(id=request_id, model=model, created=created)
                    for i in choices:
                        opening.choices.add(index=i, delta=pb.ChunkDelta(role="assistant", content=""))
                    yield opening
                for part in parts:
                    out = pb.ChatChunk(id=request_id, model=model, created=created)
                    out.choices.append(part)
                    yield out
                parts.clear()
        completion = sum(c.tokens for c in choices.values())
        usage = pb.Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion,
            total_tokens=prompt_tokens + completion,
            prompt_tokens_details=pb.PromptTokensDetails(cached_tokens=cached),
        )
        yield pb.ChatChunk(id=request_id, model=model, created=created, usage=usage)

    async def stream(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> AsyncGenerator[pb.ChatChunk, None]:
        async with contextlib.aclosing(self._generate(req, model, timeout, stats)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def complete(
        self, req: pb.ChatRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.ChatResponse:
        head: pb.ChatChunk | None = None
        usage: pb.Usage | None = None
        acc: dict[int, dict[str, Any]] = {}
        async with contextlib.aclosing(self._generate(req, model, timeout, stats)) as chunks:
            async for chunk in chunks:
                head = head or chunk
                if chunk.HasField("usage"):
                    usage = chunk.usage
                for part in chunk.choices:
                    state = acc.setdefault(
                        part.index,
                        {"content": [], "reasoning": [], "calls": {}, "finish": None, "logprobs": []},
                    )
                    delta = part.delta
                    state["content"].append(delta.content)
                    state["reasoning"].append(delta.reasoning_content)
                    for call in delta.tool_calls:
                        entry = state["calls"].setdefault(call.index, {"id": "", "name": "", "arguments": []})
                        entry["id"] = entry["id"] or call.id
                        entry["name"] = entry["name"] or call.name
                        entry["arguments"].append(call.arguments)
                    if part.HasField("finish_reason"):
                        state["finish"] = part.finish_reason
                    if part.HasField("logprobs_json"):
                        state["logprobs"].extend(orjson.loads(part.logprobs_json)["content"])
        assert head is not None
        response = pb.ChatResponse(id=head.id, model=head.model, created=head.created)
        for index in sorted(acc):
            state = acc[index]
            content = "".join(state["content"])
            reasoning = "".join(state["reasoning"])
            message = pb.ChatMessage(role=pb.ROLE_ASSISTANT)
            calls = [state["calls"][i] for i in sorted(state["calls"])]
            for call in calls:
                message.tool_calls.add(
                    id=call["id"], type="function", name=call["name"], arguments="".join(call["arguments"])
                )
            if content and not (calls and not content.strip()):
                message.content = content
            else:
                message.extra_json = '{"content":null}'
            if reasoning:
                message.reasoning_content = reasoning
            choice = response.choices.add(index=index, message=message)
            if state["finish"] is not None:
                choice.finish_reason = state["finish"]
            if state["logprobs"] or self._wants_logprobs(req):
                choice.logprobs_json = orjson.dumps({"content": state["logprobs"]}).decode()
        if response.choices:
            first = response.choices[0]
            response.content = first.message.content
            response.finish_reason = {
                "stop": pb.FINISH_REASON_STOP,
                "length": pb.FINISH_REASON_LENGTH,
                "tool_calls": pb.FINISH_REASON_TOOL_CALLS,
            }.get(first.finish_reason, pb.FINISH_REASON_STOP)
        if usage is not None:
            response.usage.CopyFrom(usage)
        return response

    @staticmethod
    def _wants_logprobs(req: pb.ChatRequest) -> bool:
        return req.HasField("logprobs") and req.logprobs

    # -- embeddings -----------------------------------------------------------------------------------

    async def embed(
        self, req: pb.EmbeddingRequest, model: str, timeout: float, stats: CallStats
    ) -> pb.EmbeddingResponse:
        deadline = time.monotonic() + timeout
        state = await self.model(deadline)
        if req.HasField("dimensions"):
            raise invalid(f"dimensions: provider {self.provider.name!r} cannot shorten its model's vectors")
        if req.extra_json:
            extras = [k for k, v in orjson.loads(req.extra_json).items() if v is not None]
            if extras:
                raise invalid(
                    f"{extras[0]}: provider {self.provider.name!r} cannot carry this field to its engine"
                )
        fmt = req.encoding_format if req.HasField("encoding_format") else "float"
        if fmt not in ("float", "base64"):
            raise invalid(f"encoding_format: {fmt!r} is not one of float, base64")
        if req.token_arrays:
            inputs = [list(t.ids) for t in req.token_arrays]
        else:
            inputs = [state.tokenizer.encode(text, add_special_tokens=True) for text in req.texts]
        limit = state.info.max_input_length
        for i, ids in enumerate(inputs):
            if not ids:
                raise invalid(f"input[{i}]: empty")
            if len(ids) > limit:
                raise invalid(
                    f"input[{i}]: {len(ids)} tokens, more than the model's maximum input of {limit} tokens"
                )
            if not all(0 <= t < 2**32 for t in ids):
                raise invalid(f"input[{i}]: token ids must be between 0 and 2^32 - 1")

        async def one(ids: list[int]) -> tuple[list[float], int]:
            request = self.protocol.embed("embd-" + secrets.token_hex(16), ids)
            stats.sent += len(request)
            body = await self._call("Embed", request, deadline, state.info.key)
            stats.received += len(body)
            return self.protocol.embedding(body)

        try:
            results = await asyncio.gather(*(one(ids) for ids in inputs))
        except RpcError as exc:
            raise self.error(exc) from None
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        response = pb.EmbeddingResponse(model=model, extra_json='{"object":"list"}')
        total = 0
        for i, (vector, tokens) in enumerate(results):
            total += tokens or len(inputs[i])
            item = response.data.add(index=i, extra_json='{"object":"embedding"}')
            if fmt == "base64":
                item.base64 = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            else:
                item.values.extend(vector)
        response.usage.prompt_tokens = total
        response.usage.total_tokens = total
        return response

    async def close(self) -> None:
        for task in list(self._aborts):
            task.cancel()
        await self.pool.close()

    # -- OpenAI's Completions and Responses APIs (:mod:`._engine_completions`, :mod:`._responses`) --

    relayed_endpoints = frozenset({"/completions", "/responses"})  # what relay() and relay_stream() serve

    async def relay(self, endpoint: str, body: dict[str, Any], timeout: float, stats: CallStats) -> Any:
        """The answer to a ``/completions`` request (``body["model"]``: the name to answer with), in vLLM's
        ``text_completion`` layout, or to a ``/responses`` request: a Response object."""
        api = _responses if endpoint == "/responses" else _engine_completions
        return await api.answer(self, body, timeout, stats)

    def relay_stream(
        self, endpoint: str, body: dict[str, Any], timeout: float, stats: CallStats
    ) -> AsyncGenerator[tuple[str, bytes], None]:
        """The Server-Sent Events (name, data) of a streamed ``/completions`` or ``/responses`` request."""
        api = _responses if endpoint == "/responses" else _engine_completions
        return api.events(self, body, timeout, stats)

    async def generate_batches(
        self,
        request_id: str,
        ids: list[int],
        sampling: Sampling,
        info: ModelInfo,
        deadline: float,
        stats: CallStats,
        images: list[str | bytes] | None = None,
        worker: Worker | None = None,
    ) -> AsyncGenerator[Batch, None]:
        """One Generate call's answer, every message already received at once, by choice (:class:`Batch`),
        from ``worker`` (acquired for the call, released here) or one that serves the model. An Abort follows
        when the caller stops reading before every choice's complete came."""
        try:
            upstream = self.protocol.generate(request_id, ids, "", sampling, info, images or ())
        except Unsupported as exc:
            if worker is not None:
                self.pool.release(worker)
            raise invalid(f"{exc} (provider {self.provider.name!r})") from None
        stats.sent += len(upstream)
        if worker is None:
            try:
                worker = await self.pool.acquire(deadline, info.key)
            except RpcError as exc:
                raise self.error(exc) from None
        failed = False
        completed: set[int] = set()
        batches = worker.channel.server_stream_batches(
            self.protocol.path("Generate"),
            upstream,
            max(0.001, deadline - time.monotonic()),
            first_message_timeout=self.provider.timeout_s,
            idle_timeout=self.provider.idle_timeout_s,
        )
        try:
            async for bodies in batches:
                steps: dict[int, ChoiceStep] = {}
                cached = prompt_tokens = 0
                for body in bodies:
                    stats.received += len(body)
                    message = self.protocol.response(body)
                    kind = message.WhichOneof("response")
                    if kind is None:
                        continue
                    item = getattr(message, kind)
                    if not 0 <= item.index < sampling.n:
                        raise malformed_response(
                            self.provider, ValueError(f"an answer for choice {item.index} of {sampling.n}")
                        )
                    cached = max(cached, item.cached_tokens)
                    prompt_tokens = max(prompt_tokens, item.prompt_tokens)
                    step = steps.get(item.index)
                    if step is None:
                        step = steps[item.index] = ChoiceStep(item.index)
                    if kind == "chunk":
                        step.ids.extend(item.token_ids)
                        if item.HasField("output_logprobs"):
                            step.logprobs.append(item.output_logprobs)
                    else:
                        completed.add(item.index)
                        step.finish = item.finish_reason
                        step.complete_ids = item.output_ids
                if steps:
                    yield Batch(list(steps.values()), cached, prompt_tokens)
        except RpcError as exc:
            failed = exc.code == grpc.StatusCode.UNAVAILABLE
            if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
                completed = set(range(sampling.n))  # the engine ended the call itself: nothing to abort
            raise self.error(exc, worker) from None
        except DecodeError as exc:
            raise malformed_response(self.provider, exc) from None
        finally:
            await batches.aclose()
            if len(completed) < sampling.n:
                self._abort_later(worker, request_id)
            self.pool.release(worker, failed=failed)
        if len(completed) < sampling.n:
            raise malformed_response(self.provider, ValueError("the answer ended before every choice did"))
