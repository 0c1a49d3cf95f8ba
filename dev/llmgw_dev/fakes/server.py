"""The fake provider itself: :class:`FakeProvider`, the machinery its kinds share, and the control API.

A :class:`FakeProvider` validates its settings, keeps the state every kind has (the faults, the counters, the
reply cache) and hands the wire protocol to the :class:`Api` of its kind, looked up by name in
:data:`llmgw_dev.fakes.kinds.APIS`. :class:`Api` is what every kind does the same way: counting a chat request
while it is answered, deciding its fault (rate limiting first, then ``fail_next``, then ``error_rate``) and
waiting ``latency_ms`` before any answer. :class:`HttpApi` adds what the HTTP kinds share: one aiohttp server
that serves the kind's routes, the control API and the kind's own "not found", a chat request's path through
auth, validation and faults, and Server-Sent Events that pace tokens and break a stream midway.

The control API (``GET``/``DELETE /_fake/stats``, ``GET``/``PUT /_fake/faults``) is served on the provider's
own port by an HTTP kind, and on ``control_port`` by a kind that serves itself (gRPC).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Final

import orjson
from aiohttp import web

from llmgw_common.config import is_loopback
from llmgw_dev.fakes.faults import Chat, Faults, Reply, make_reply
from llmgw_dev.fakes.kinds import APIS, KINDS

_CACHE_LIMIT: Final = 4096  # replies kept, keyed by (prompt, max_tokens, stop)
_CACHE_MAX_PROMPT: Final = 2048  # longer prompts are not cached (they would pin memory)
_MAX_BODY: Final = 64 * 1024 * 1024
_RECEIVED_KEPT: Final = 64  # chat requests kept in FakeProvider.received
_JSON: Final = {"Content-Type": "application/json"}
_SSE: Final = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
VISION_KINDS: Final = ("vllm", "sglang", "trtllm", "vllm-http")  # the kinds that take vision=True


def json_response(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``body`` as a JSON response, with ``headers`` besides the content type."""
    return web.Response(status=status, body=orjson.dumps(body), headers={**_JSON, **(headers or {})})


class BadRequest(Exception):
    """A request an HTTP kind rejects; ``param``/``code`` are OpenAI's fields."""

    def __init__(
        self, message: str, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _start_http(host: str, routes: list[web.RouteDef], port: int) -> tuple[web.AppRunner, int]:
    app = web.Application(client_max_size=_MAX_BODY)
    app.add_routes(routes)
    # handler_cancellation: cancel a handler whose client disconnects (off by default in aiohttp>=3.9).
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]


# ------------------------------------------------------------------------------------------------- APIs


class Api:
    """One kind's wire protocol, served for a :class:`FakeProvider`; each kind's module defines a subclass.

    A subclass starts and stops its server; the methods here are what all kinds do the same way.
    """

    base_path: ClassVar[str] = ""  # what an SDK's base_url adds to http://HOST:PORT
    serves_control: ClassVar[bool] = False  # whether the control API shares the API's port

    def __init__(self, fake: FakeProvider) -> None:
        self.fake = fake
        self._bearer = f"Bearer {fake.api_key}" if fake.api_key is not None else None
        self._seq = 0

    async def start(self, port: int) -> int:
        """Bind ``port`` on the provider's host (0: a free one) and serve; returns the bound port."""
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _known(self, model: str) -> bool:
        return model in self.fake._model_set

    @contextlib.contextmanager
    def _counted(self) -> Iterator[None]:
        """Count a chat request while it is answered; ``cancelled`` if its client goes away first."""
        fake = self.fake
        fake.stats["requests"] += 1
        fake.inflight += 1
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            fake.stats["cancelled"] += 1
            raise
        finally:
            fake.inflight -= 1

    async def _admit(self) -> tuple[int, float] | None:
        """Decide a valid chat request's fault, then wait ``latency_ms``.

        None to answer normally, else (status, retry_after) of the error to answer with.
        """
        fault = self._decide_fault()
        if self.fake.faults.latency_ms > 0:
            await asyncio.sleep(self.fake.faults.latency_ms / 1000.0)
        return fault

    def _decide_fault(self) -> tuple[int, float] | None:
        faults = self.fake.faults
        stats = self.fake.stats
        self._seq += 1
        if faults.rate_limit_every > 0 and self._seq % faults.rate_limit_every == 0:
            stats["rate_limited"] += 1
            return 429, faults.retry_after_s
        if faults.fail_next > 0:
            faults.fail_next -= 1
        elif not (faults.error_rate > 0.0 and random.random() < faults.error_rate):
            return None
        stats["injected_errors"] += 1
        return faults.error_status, faults.retry_after_s

    def _token_delay(self) -> float:
        return self.fake.faults.token_delay_ms / 1000.0


class HttpApi(Api):
    """An API over HTTP: the kind's routes, then the control API, then the kind's answer to any other path.

    A chat request goes through :meth:`_chat`: the kind's header checks, its parsing of the body, the model,
    the faults, then the kind's answer (a JSON body through :meth:`_completed` or a stream through
    :meth:`_stream`). A subclass defines the methods that raise NotImplementedError here.
    """

    serves_control = True

    def __init__(self, fake: FakeProvider) -> None:
        super().__init__(fake)
        self._runner: web.AppRunner | None = None

    async def start(self, port: int) -> int:
        routes = [
            *self._routes(),
            *_Control(self.fake).routes(),
            web.route("*", "/{tail:.*}", self._not_found),
        ]
        self._runner, port = await _start_http(self.fake.host, routes, port)
        return port

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ---- what a kind defines

    def _routes(self) -> list[web.RouteDef]:
        """The API's routes; its chat route is served by :meth:`_chat`."""
        raise NotImplementedError

    async def _not_found(self, request: web.Request) -> web.Response:
        raise NotImplementedError

    def _check(self, request: web.Request) -> web.Response | None:
        """The error response to a request whose key or required headers are wrong, else None."""
        raise NotImplementedError

    def _parse(self, raw: bytes) -> Chat:
        """A chat request's body; raises BadRequest."""
        raise NotImplementedError

    def _unknown_model(self, model: str) -> BadRequest:
        raise NotImplementedError

    def _invalid(self, exc: BadRequest) -> web.Response:
        """The error response to a rejected request."""
        raise NotImplementedError

    def _injected(self, status: int, retry_after: float) -> web.Response:
        """The error response of an injected fault."""
        raise NotImplementedError

    async def _answer(self, request: web.Request, chat: Chat, reply: Reply) -> web.StreamResponse:
        """The answer to a chat request that gets one."""
        raise NotImplementedError

    def _stream_error(self) -> bytes:
        """The event a stream broken midway ends with."""
        raise NotImplementedError

    # ---- shared

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        with self._counted():
            denied = self._check(request)
            if denied is not None:
                if denied.status == 400:  # a required header is missing: the request is invalid
                    self.fake.stats["rejected"] += 1
                return denied
            try:
                chat = self._parse(await request.read())
                if not self._known(chat.model):
                    raise self._unknown_model(chat.model)
            except BadRequest as exc:
                self.fake.stats["rejected"] += 1
                return self._invalid(exc)
            fault = await self._admit()
            if fault is not None:
                return self._injected(*fault)
            reply = self.fake.reply(chat.prompt, chat.max_tokens, chat.stop)
            return await self._answer(request, chat, reply)

    def _completed(self, body: Any) -> web.Response:
        """A unary answer."""
        self.fake.stats["completed"] += 1
        return json_response(body)

    async def _stream(
        self,
        request: web.Request,
        reply: Reply,
        opening: bytes,
        frame: Callable[[bytes], bytes],
        closing: bytes,
    ) -> web.StreamResponse:
        """Stream ``reply``: ``opening``, each JSON token through ``frame``, then ``closing``.

        Without token delay or stream break, everything after the headers is sent in one write. A stream
        breaks after ``stream_error_after_tokens`` tokens with :meth:`_stream_error`.
        """
        response = web.StreamResponse(headers=_SSE)
        delay = self._token_delay()
        break_after = self.fake.faults.stream_error_after_tokens
        stall_after = self.fake.faults.stream_stall_after_tokens
        try:
            await response.prepare(request)
            if delay <= 0 and break_after < 0 and stall_after < 0:
                chunks = [opening]
                chunks.extend(frame(token) for token in reply.json_tokens)
            else:
                await response.write(opening)
                chunks = []
                for i, token in enumerate(reply.json_tokens):
                    if i == break_after:
                        return await self._break(response)
                    if i == stall_after:
                        await stall()
                    if delay > 0 and i:
                        await asyncio.sleep(delay)
                    await response.write(frame(token))
                if break_after == len(reply.json_tokens):
                    return await self._break(response)
            chunks.append(closing)
            await response.write(b"".join(chunks))
            await response.write_eof()
        except ConnectionResetError:
            self.fake.stats["cancelled"] += 1
            return response
        self.fake.stats["completed"] += 1
        return response

    async def _break(self, response: web.StreamResponse) -> web.StreamResponse:
        """What the API sends when a stream fails midway: its error event, then the connection ends."""
        self.fake.stats["injected_errors"] += 1
        await response.write(self._stream_error())
        await response.write_eof()
        return response


async def stall() -> None:
    """A stream that stalls: nothing more is sent until the client goes away (the handler is cancelled)."""
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------- control


class _Control:
    """The ``/_fake/...`` control API of one provider."""

    def __init__(self, fake: FakeProvider) -> None:
        self.fake = fake

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_fake/stats", self._stats),
            web.delete("/_fake/stats", self._reset),
            web.get("/_fake/faults", self._get_faults),
            web.put("/_fake/faults", self._put_faults),
        ]

    def _stats_body(self) -> web.Response:
        return json_response({**self.fake.stats, "inflight": self.fake.inflight})

    async def _stats(self, request: web.Request) -> web.Response:
        return self._stats_body()

    async def _reset(self, request: web.Request) -> web.Response:
        self.fake.reset_stats()
        return self._stats_body()

    async def _get_faults(self, request: web.Request) -> web.Response:
        return json_response(self.fake.faults.as_dict())

    async def _put_faults(self, request: web.Request) -> web.Response:
        try:
            changes = orjson.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("body: must be a JSON object of Faults fields")
            self.fake.faults.update(changes)
        except (ValueError, orjson.JSONDecodeError) as exc:
            return json_response({"error": str(exc)}, status=400)
        return json_response(self.fake.faults.as_dict())


# -------------------------------------------------------------------------------------------- provider


class FakeProvider:
    """One fake upstream of the given ``kind`` (a name of :data:`~llmgw_dev.fakes.kinds.KINDS`).

    ``port=0`` binds a free port; :attr:`port` holds the real one after :meth:`start`. ``faults`` may be
    mutated at any time. ``stats`` counts chat requests: ``requests`` (all received), ``completed``,
    ``cancelled`` (the client went away first), ``injected_errors`` (``fail_next``, ``error_rate`` and broken
    streams), ``rate_limited``, ``unauthorized`` and ``rejected`` (invalid request or unknown model);
    ``inflight`` is the number of chat requests being answered. ``received`` keeps the JSON of the latest
    chat requests (oldest first), so tests can see exactly what reached the provider. ``vision`` (the
    model kinds only: ``vllm``, ``trtllm``, ``vllm-http``; ``sglang`` takes it but refuses every image) makes
    the model a vision model that takes images (:mod:`.model`, :mod:`.engine`, :mod:`.vllm_http`).
    """

    def __init__(
        self,
        kind: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        api_key: str | None = None,
        models: Sequence[str] = ("demo-model", "demo-claude"),
        faults: Faults | None = None,
        response_tokens: int = 20,
        control_port: int | None = None,
        vision: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
        if not is_loopback(host):
            raise ValueError(
                f"host: {host!r} is not a loopback address; the fake provider only binds loopback"
            )
        if response_tokens < 1:
            raise ValueError(f"response_tokens: {response_tokens} must be at least 1")
        if not models:
            raise ValueError("models: at least one model is required")
        if vision and kind not in VISION_KINDS:
            raise ValueError(
                f"vision: kind {kind!r} has no model to see images; use one of {', '.join(VISION_KINDS)}"
            )
        self.kind = kind
        self.host = host.strip("[]")
        self.port = port
        self.control_port = control_port
        self.api_key = api_key
        self.models: tuple[str, ...] = tuple(models)
        self._model_set = frozenset(self.models)
        self.faults = faults if faults is not None else Faults()
        self.response_tokens = response_tokens
        self.vision = vision
        self.stats: dict[str, int] = {}
        self.inflight = 0
        # The latest chat requests received, as JSON (the gRPC kind: converted by the gateway's codec).
        self.received: collections.deque[Any] = collections.deque(maxlen=_RECEIVED_KEPT)
        # The anthropic-beta header of each request of the anthropic kind, as the list of its values.
        self.received_betas: collections.deque[list[str]] = collections.deque(maxlen=_RECEIVED_KEPT)
        self.reset_stats()
        self._replies: dict[tuple[str, int | None, tuple[str, ...]], Reply] = {}
        self._control: web.AppRunner | None = None
        module, _, name = APIS[kind].partition(":")
        self._api: Api = getattr(importlib.import_module(module), name)(self)

    @property
    def target(self) -> str:
        """``HOST:PORT``, as a gRPC channel target."""
        return _hostport(self.host, self.port)

    @property
    def base_url(self) -> str:
        """An SDK's ``base_url``: ``http://HOST:PORT/v1`` for openai, ``http://HOST:PORT`` otherwise."""
        return f"http://{self.target}{self._api.base_path}"

    @property
    def control_url(self) -> str | None:
        """Base URL of the ``/_fake/...`` control API (None for a grpc provider without control_port)."""
        if self._api.serves_control:
            return f"http://{self.target}"
        return None if self.control_port is None else f"http://{_hostport(self.host, self.control_port)}"

    def reset_stats(self) -> None:
        self.stats.update(
            requests=0,
            completed=0,
            cancelled=0,
            injected_errors=0,
            rate_limited=0,
            unauthorized=0,
            rejected=0,
        )

    def reply(self, prompt: str, max_tokens: int | None = None, stop: Sequence[str] = ()) -> Reply:
        """The answer this provider gives when ``prompt`` is the last user message (cached)."""
        key = (prompt, max_tokens, tuple(stop))
        reply = self._replies.get(key)
        if reply is None:
            reply = make_reply(prompt, self.response_tokens, max_tokens, key[2])
            if len(prompt) <= _CACHE_MAX_PROMPT:
                if len(self._replies) >= _CACHE_LIMIT:
                    self._replies.clear()
                self._replies[key] = reply
        return reply

    async def start(self) -> None:
        """Bind and start serving; raises OSError if the address cannot be bound."""
        self.port = await self._api.start(self.port)
        if self.control_port is not None and not self._api.serves_control:
            try:
                self._control, self.control_port = await _start_http(
                    self.host, _Control(self).routes(), self.control_port
                )
            except BaseException:
                await self.stop()
                raise

    async def stop(self) -> None:
        await self._api.stop()
        if self._control is not None:
            control, self._control = self._control, None
            await control.cleanup()

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
