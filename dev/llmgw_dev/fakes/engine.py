"""Fake inference engines speaking the engines' own gRPC protocol (kinds ``vllm`` and ``sglang``), as a router
such as SMG or the gateway's engine path talks to them: ``vllm.grpc.engine.VllmEngine`` and
``sglang.grpc.scheduler.SglangScheduler`` from ``smg-grpc-proto``, over grpc.aio, with the model of
:mod:`.model` (a real tokenizer; token ids in, token ids out).

- ``Generate``: the prompt is ``tokenized.input_ids`` (or vLLM's ``text``, tokenized here). Streaming: one
  ``GenerateStreamChunk`` per step per choice ``index`` (the choices of ``n`` > 1 interleave), then a
  ``GenerateComplete`` per index when it finishes, whose ``output_ids`` repeat the last step's tokens, as the
  engines' servicers do. vLLM's counts are the step's (``completion_tokens`` = the chunk's tokens: routers add
  them up), SGLang's are cumulative. Unary: only the Completes, with all output ids. ``finish_reason`` is
  "stop" (EOS, stop string: ``matched_stop_str``, stop token: ``matched_token_id``; SGLang also reports the
  EOS as ``matched_token_id``), "length" or "abort". ``cached_tokens`` come from a prefix cache of recent
  prompts (16-token blocks). Logprobs (vLLM ``sampling_params.logprobs``, SGLang ``return_logprob`` and
  ``top_logprobs_num``) ride on the chunks and Completes; SGLang counts ``reasoning_tokens`` (those before
  ``</think>``) when asked (``require_reasoning``); the ``json_schema``/``json_object``/``choice``
  constraints shape the answer (:mod:`.model`), the others are ignored. A prompt at or above ``max_context_length``,
  ``max_tokens`` 0 and other invalid parameters are refused with INVALID_ARGUMENT before any fault.
- ``Abort`` finishes the named running requests with "abort" (vLLM: ``request_ids``; SGLang: ``request_id``,
  answering whether it was found); a client that goes away cancels its request.
- ``GetModelInfo`` (``served_model_name`` is the provider's first model; ``model_path``/``tokenizer_path`` do
  not exist locally, so a router fetches the tokenizer with ``GetTokenizer``; default sampling as JSON),
  ``GetServerInfo`` (``server_type`` "vllm-grpc" / "grpc"), ``GetLoads``, ``GetTokenizer`` (the model's files
  as one ZIP in 64 KiB chunks, the SHA-256 of the whole on the last), ``HealthCheck``, ``Embed`` (the
  deterministic vectors of :mod:`.endpoints`, of the decoded prompt), ``FlushCache`` (empties the prefix
  cache). ``SubscribeKvEvents`` is UNIMPLEMENTED, as an engine started without KV events answers; so are
  the profiler RPCs' answers (``success`` false) and SGLang's LoRA RPCs (nothing loaded).

Faults apply to ``Generate`` and ``Embed`` after validation: an injected error is the gRPC status
:func:`~.llmservice.grpc_code_for` maps it to, ``latency_ms`` is waited before the first token,
``token_delay_ms`` between steps, and a stream breaks or stalls after ``stream_error_after_tokens`` /
``stream_stall_after_tokens`` steps. The control API is on ``control_port``. ``received`` keeps each
``GenerateRequest``, ``EmbedRequest`` and ``AbortRequest``; a request that Abort ended counts as ``cancelled``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import importlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

import grpc

from llmgw_dev.fakes.endpoints import embedding
from llmgw_dev.fakes.llmservice import GrpcApi
from llmgw_dev.fakes.model import DEFAULT_SAMPLING, FakeModel, Generation, Sampling, load
from llmgw_dev.fakes.server import FakeProvider, stall

# smg-grpc-proto ships no type information: its modules are Any here.
common_pb2: Any = importlib.import_module("smg_grpc_proto.generated.common_pb2")
sgl: Any = importlib.import_module("smg_grpc_proto.generated.sglang_scheduler_pb2")
sgl_grpc: Any = importlib.import_module("smg_grpc_proto.generated.sglang_scheduler_pb2_grpc")
vpb: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2")
vpb_grpc: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2_grpc")

CHUNK_SIZE: Final = 64 * 1024  # GetTokenizer's chunks
BLOCK_SIZE: Final = 16  # the prefix cache's granularity, in tokens
_PREFIXES_KEPT: Final = 64
_MODEL_DIR: Final = "/nonexistent/llmgw-fake-engine"  # where the engine says its model is: not on this host
VLLM_VERSION: Final = "0.11.0"
SGLANG_VERSION: Final = "0.5.4"


def tokenizer_chunks(data: bytes, size: int = CHUNK_SIZE) -> list[Any]:
    """``data`` as GetTokenizer's chunks: ``size`` bytes each, the SHA-256 of the whole on the last only."""
    digest = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    return [
        common_pb2.GetTokenizerChunk(data=piece, sha256=digest if i == len(pieces) - 1 else "")
        for i, piece in enumerate(pieces)
    ]


def _schema_of(params: Any) -> str | None:
    """vLLM's structured-output constraint as a JSON schema (json_object: any object), else None."""
    kind = params.WhichOneof("constraint")
    if kind == "json_schema":
        return str(params.json_schema)
    if kind == "json_object" and params.json_object:
        return '{"type": "object"}'
    return None


class _Request:
    """A running Generate: what Abort needs."""

    __slots__ = ("aborted",)

    def __init__(self) -> None:
        self.aborted = asyncio.Event()


class Engine(GrpcApi):
    """What both engines share; a subclass maps the model's output to its protocol's messages."""

    pb: ClassVar[Any]
    server_type: ClassVar[str]
    cumulative: ClassVar[bool]  # whether chunk and Complete counts are cumulative (SGLang) or per step (vLLM)
    eos_is_matched: ClassVar[bool]  # whether the EOS is reported as matched_token_id (SGLang)

    def __init__(self, fake: FakeProvider) -> None:
        super().__init__(fake)
        self.model: FakeModel = load(fake.models[0], fake.response_tokens)
        self.model_name = fake.models[0]
        self._running: dict[str, _Request] = {}
        self._prefixes: collections.OrderedDict[tuple[int, ...], None] = collections.OrderedDict()
        self._started = time.time()
        self._last_receive = 0.0
        self._generated = 0

    # ---- what a flavour defines

    def _input_ids(self, request: Any) -> list[int]:
        raise NotImplementedError

    def _sampling(self, request: Any) -> Sampling:
        raise NotImplementedError

    def _response(self, request_id: str, **fields: Any) -> Any:
        raise NotImplementedError

    def _count_reasoning(self, request: Any, g: Generation, end: int, message: Any) -> Any:
        """Set the reasoning tokens among ``g``'s first ``end`` on ``message`` when the protocol counts them."""
        return message

    # ---- shared

    def _cached(self, ids: Sequence[int]) -> int:
        """Prompt tokens found in the prefix cache (whole blocks, never the whole prompt); remembers ``ids``."""
        key = tuple(ids)
        best = 0
        for prefix in self._prefixes:
            n = 0
            for a, b in zip(prefix, key, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        self._prefixes[key] = None
        self._prefixes.move_to_end(key)
        while len(self._prefixes) > _PREFIXES_KEPT:
            self._prefixes.popitem(last=False)
        return min(best, len(key) - 1) // BLOCK_SIZE * BLOCK_SIZE

    def _logprobs(self, generation: Generation, start: int, end: int, top: int) -> Any:
        assert generation.logprobs is not None
        out = self.pb.OutputLogProbs()
        for entry in generation.logprobs[start:end]:
            out.token_logprobs.append(entry.logprob)
            out.token_ids.append(entry.token_id)
            if top:
                out.top_logprobs.append(
                    self.pb.TopLogProbs(values=[v for _, v in entry.top], token_ids=[t for t, _ in entry.top])
                )
        return out

    def _chunk(
        self, request_id: str, g: Generation, start: int, end: int, prompt: int, cached: int, top: int | None
    ) -> Any:
        chunk = self.pb.GenerateStreamChunk(
            token_ids=g.token_ids[start:end],
            prompt_tokens=prompt,
            completion_tokens=end if self.cumulative else end - start,
            cached_tokens=cached,
            index=g.index,
        )
        if top is not None and end > start:
            chunk.output_logprobs.CopyFrom(self._logprobs(g, start, end, top))
        return self._response(request_id, chunk=chunk)

    def _complete(
        self,
        request_id: str,
        g: Generation,
        start: int,
        end: int,
        prompt: int,
        cached: int,
        top: int | None,
        finish: str | None = None,
    ) -> Any:
        complete = self.pb.GenerateComplete(
            output_ids=g.token_ids[start:end],
            finish_reason=finish or g.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=end if self.cumulative else end - start,
            cached_tokens=cached,
            index=g.index,
        )
        if finish is None:
            if g.matched_stop_str is not None:
                complete.matched_stop_str = g.matched_stop_str
            elif g.matched_token_id is not None:
                complete.matched_token_id = g.matched_token_id
            elif self.eos_is_matched and g.finish_reason == "stop" and g.token_ids:
                complete.matched_token_id = g.token_ids[-1]
        if top is not None and end > start:
            # Streaming: vLLM's Complete carries its last step's logprobs, SGLang's all of them.
            complete.output_logprobs.CopyFrom(self._logprobs(g, 0 if self.cumulative else start, end, top))
        return self._response(request_id, complete=complete)

    async def _generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with self._counted():
            self.fake.received.append(request)
            await self._auth(context)
            self._last_receive = time.time()
            try:
                ids = self._input_ids(request)
                sampling = self._sampling(request)
                generations = self.model.generate(ids, sampling)
            except ValueError as exc:
                self.fake.stats["rejected"] += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            fault = await self._admit()
            if fault is not None:
                await self._abort(context, *fault)
            request_id = request.request_id
            running = self._running[request_id] = _Request()
            try:
                async for response in self._steps(request, context, running, ids, sampling, generations):
                    yield response
            finally:
                if self._running.get(request_id) is running:
                    del self._running[request_id]
            # A request Abort ended counts as cancelled: its client went away first.
            self.fake.stats["cancelled" if running.aborted.is_set() else "completed"] += 1

    async def _steps(
        self,
        request: Any,
        context: grpc.aio.ServicerContext,
        running: _Request,
        ids: list[int],
        sampling: Sampling,
        generations: list[Generation],
    ) -> AsyncIterator[Any]:
        """The responses of one Generate, step by step, paced by the token delay and ended by Abort."""
        request_id = request.request_id
        prompt = len(ids)
        cached = self._cached(ids)
        top = sampling.logprobs
        delay = self._token_delay()
        break_after = self.fake.faults.stream_error_after_tokens
        stall_after = self.fake.faults.stream_stall_after_tokens
        steps = max(len(g.token_ids) for g in generations)
        done: set[int] = set()
        for step in range(steps):
            if step and delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(running.aborted.wait(), delay)
            elif step % 16 == 0:
                await asyncio.sleep(0)  # let an Abort in
            if running.aborted.is_set():
                for g in generations:
                    if g.index not in done:
                        if request.stream:
                            yield self._response(
                                request_id,
                                chunk=self.pb.GenerateStreamChunk(
                                    prompt_tokens=prompt,
                                    completion_tokens=step if self.cumulative else 0,
                                    cached_tokens=cached,
                                    index=g.index,
                                ),
                            )
                        end = min(step, len(g.token_ids))
                        yield self._complete(
                            request_id, g, end if request.stream else 0, end, prompt, cached, top, "abort"
                        )
                return
            if request.stream:
                if step == break_after:
                    await self._break(context)
                if step == stall_after:
                    await stall()
            self._generated += len(generations) - len(done)
            for g in generations:
                if g.index in done or step >= len(g.token_ids):
                    continue
                last = step == len(g.token_ids) - 1
                if request.stream:
                    yield self._count_reasoning(
                        request, g, step + 1, self._chunk(request_id, g, step, step + 1, prompt, cached, top)
                    )
                    if last:
                        yield self._count_reasoning(
                            request,
                            g,
                            step + 1,
                            self._complete(request_id, g, step, step + 1, prompt, cached, top),
                        )
                if last:
                    done.add(g.index)
        if not request.stream:
            for g in generations:
                yield self._count_reasoning(
                    request,
                    g,
                    len(g.token_ids),
                    self._complete(request_id, g, 0, len(g.token_ids), prompt, cached, top),
                )

    async def _embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with self._counted():
            self.fake.received.append(request)
            await self._auth(context)
            ids = list(request.tokenized.input_ids)
            if not ids:
                self.fake.stats["rejected"] += 1
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "EmbedRequest requires tokenized input")
            if len(ids) > self.model.max_context_length:
                self.fake.stats["rejected"] += 1
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"The prompt (length {len(ids)}) is longer than the maximum model length of "
                    f"{self.model.max_context_length}.",
                )
            fault = await self._admit()
            if fault is not None:
                await self._abort(context, *fault)
            vector = embedding(self.model.decode(ids, skip_special_tokens=False))
            self.fake.stats["completed"] += 1
            return self.pb.EmbedResponse(embedding=vector, prompt_tokens=len(ids), embedding_dim=len(vector))

    async def _health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self.pb.HealthCheckResponse(healthy=True, message=self.health_message)

    health_message: ClassVar[str] = "Health"

    async def _get_tokenizer(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        for chunk in tokenizer_chunks(self.model.tokenizer_zip()):
            yield chunk

    async def _subscribe_kv_events(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, self.kv_events_message)
        yield common_pb2.KvEventBatch()  # pragma: no cover - never reached; makes this an async generator

    kv_events_message: ClassVar[str] = ""

    async def _flush_cache(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if self._running and request.timeout_s <= 0:
            return common_pb2.FlushCacheResponse(success=False, message="requests are running")
        self._prefixes.clear()
        return common_pb2.FlushCacheResponse(success=True, message="cache flushed")

    async def _profile(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return common_pb2.ProfileResponse(success=False, message="Profiler is not enabled on this engine.")

    def _abort_ids(self, request: Any, request_ids: Sequence[str]) -> bool:
        self.fake.received.append(request)
        found = False
        for request_id in request_ids:
            running = self._running.get(request_id)
            if running is not None:
                running.aborted.set()
                found = True
        return found

    def _load(self) -> dict[str, Any]:
        running = len(self._running)
        used = sum(len(p) for p in self._prefixes)
        uptime = max(time.time() - self._started, 1e-3)
        return {
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": 0,
            "num_total_reqs": running,
            "num_used_tokens": used,
            "max_total_num_tokens": 64 * self.model.max_context_length,
            "token_usage": min(used / (64 * self.model.max_context_length), 0.99),
            "gen_throughput": self._generated / uptime,
            "max_running_requests": 256,
        }


# ------------------------------------------------------------------------------------------------- vLLM


class _VllmServicer:
    """``VllmEngine``'s handlers, bound to the API's methods (so grpc.aio sees the async generators)."""

    def __init__(self, api: Vllm) -> None:
        self.Generate = api._generate
        self.Embed = api._embed
        self.HealthCheck = api._health
        self.FlushCache = api._flush_cache
        self.StartProfile = api._profile
        self.StopProfile = api._profile
        self.Abort = api._abort_rpc
        self.GetModelInfo = api._model_info
        self.GetServerInfo = api._server_info
        self.GetLoads = api._get_loads
        self.GetTokenizer = api._get_tokenizer
        self.SubscribeKvEvents = api._subscribe_kv_events


class Vllm(Engine):
    """vLLM's gRPC engine (``vllm.grpc.engine.VllmEngine``); see the module docstring."""

    pb = vpb
    service_name = "vllm.grpc.engine.VllmEngine"
    server_type = "vllm-grpc"
    cumulative = False
    eos_is_matched = False
    kv_events_message = (
        "KV cache events not enabled. Start vLLM with --kv-events-config "
        '\'{"enable_kv_cache_events": true, "publisher": "zmq"}\''
    )

    def _add_services(self, server: Any) -> None:
        vpb_grpc.add_VllmEngineServicer_to_server(_VllmServicer(self), server)

    def _input_ids(self, request: Any) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "tokenized":
            return list(request.tokenized.input_ids)
        if kind == "text":
            return self.model.encode(request.text)
        raise ValueError("GenerateRequest has neither tokenized nor text input")

    def _sampling(self, request: Any) -> Sampling:
        p = request.sampling_params
        if p.HasField("temperature") and p.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {p.temperature}.")
        logprobs = p.logprobs if p.HasField("logprobs") else None
        if logprobs is not None and logprobs < -1:
            raise ValueError(f"logprobs must be non-negative or -1, got {logprobs}.")
        return Sampling(
            max_tokens=p.max_tokens if p.HasField("max_tokens") else None,
            min_tokens=p.min_tokens,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            include_stop_str_in_output=p.include_stop_str_in_output,
            n=p.n or 1,
            temperature=p.temperature if p.HasField("temperature") else None,
            seed=p.seed if p.HasField("seed") else None,
            logprobs=20 if logprobs == -1 else logprobs,
            json_schema=_schema_of(p),
            choices=tuple(p.choice.choices) if p.WhichOneof("constraint") == "choice" else (),
        )

    def _response(self, request_id: str, **fields: Any) -> Any:
        return vpb.GenerateResponse(**fields)

    async def _abort_rpc(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._abort_ids(request, request.request_ids)
        return vpb.AbortResponse()

    async def _model_info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self.model
        return vpb.GetModelInfoResponse(
            model_path=f"{_MODEL_DIR}/{self.model_name}",
            is_generation=True,
            max_context_length=m.max_context_length,
            vocab_size=m.vocab_size,
            supports_vision=False,
            served_model_name=self.model_name,
            tokenizer_path=f"{_MODEL_DIR}/{self.model_name}",
            model_type="qwen3",
            architectures=["Qwen3ForCausalLM"],
            eos_token_ids=list(m.eos_token_ids),
            pad_token_id=0,
            bos_token_id=m.endoftext_id,
            max_req_input_len=m.max_context_length,
            default_sampling_params_json=json.dumps(dict(DEFAULT_SAMPLING), separators=(",", ":")),
        )

    async def _server_info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return vpb.GetServerInfoResponse(
            active_requests=len(self._running),
            is_paused=False,
            last_receive_timestamp=self._last_receive,
            uptime_seconds=time.time() - self._started,
            server_type=self.server_type,
            data_parallel_size=1,
            kv_cache_dtype="auto",
            block_size=BLOCK_SIZE,
            model_dtype="torch.bfloat16",
            max_num_seqs=256,
        )

    async def _get_loads(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return vpb.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version=VLLM_VERSION,
            dp_rank_count=1,
            loads=[vpb.SchedulerLoad(**self._load())],
        )


# ----------------------------------------------------------------------------------------------- SGLang


class _SglangServicer:
    """``SglangScheduler``'s handlers, bound to the API's methods."""

    def __init__(self, api: Sglang) -> None:
        self.Generate = api._generate
        self.Embed = api._embed
        self.HealthCheck = api._health
        self.Abort = api._abort_rpc
        self.GetModelInfo = api._model_info
        self.GetServerInfo = api._server_info
        self.GetLoads = api._get_loads
        self.FlushCache = api._flush_cache
        self.StartProfile = api._profile
        self.StopProfile = api._profile
        self.GetTokenizer = api._get_tokenizer
        self.SubscribeKvEvents = api._subscribe_kv_events
        self.LoadLoRAAdapter = api._lora
        self.UnloadLoRAAdapter = api._lora
        self.ListLoadedLoRAAdapters = api._list_lora


class Sglang(Engine):
    """SGLang's gRPC scheduler (``sglang.grpc.scheduler.SglangScheduler``); see the module docstring."""

    pb = sgl
    service_name = "sglang.grpc.scheduler.SglangScheduler"
    server_type = "grpc"
    cumulative = True
    eos_is_matched = True
    health_message = "Health check passed"
    kv_events_message = (
        'KV cache events not enabled. Start SGLang with --kv-events-config \'{"publisher": "zmq"}\''
    )

    def _add_services(self, server: Any) -> None:
        sgl_grpc.add_SglangSchedulerServicer_to_server(_SglangServicer(self), server)

    def _input_ids(self, request: Any) -> list[int]:
        if not request.HasField("tokenized"):
            raise ValueError("Tokenized input must be provided")
        ids = list(request.tokenized.input_ids)
        limit = self.model.max_context_length - 1
        if len(ids) > limit:
            raise ValueError(
                f"Input length ({len(ids)} tokens) exceeds the maximum allowed length ({limit} tokens). "
                "Use a shorter input or enable --allow-auto-truncate."
            )
        return ids

    def _sampling(self, request: Any) -> Sampling:
        p = request.sampling_params
        if p.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {p.temperature}.")
        custom = dict(p.custom_params.items()) if p.HasField("custom_params") else {}
        seed = custom.get("sampling_seed", custom.get("seed"))
        return Sampling(
            max_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else None,
            min_tokens=p.min_new_tokens,
            stop=tuple(p.stop),
            stop_token_ids=tuple(p.stop_token_ids),
            ignore_eos=p.ignore_eos,
            include_stop_str_in_output=p.no_stop_trim,
            n=p.n or 1,
            temperature=p.temperature,
            seed=int(seed) if isinstance(seed, int | float) else None,
            logprobs=max(request.top_logprobs_num, 0) if request.return_logprob else None,
            json_schema=p.json_schema if p.WhichOneof("constraint") == "json_schema" else None,
        )

    def _response(self, request_id: str, **fields: Any) -> Any:
        return sgl.GenerateResponse(request_id=request_id, **fields)

    def _count_reasoning(self, request: Any, g: Generation, end: int, message: Any) -> Any:
        """With ``require_reasoning``, SGLang counts the tokens before ``</think>`` (cumulative)."""
        if request.require_reasoning:
            ids = g.token_ids[:end]
            think_end = self.model.think_end_id
            if think_end in ids:
                count = ids.index(think_end)
            elif think_end in g.token_ids or (g.finish_reason == "length" and self._thinking(request)):
                count = len(ids)  # still thinking
            else:
                count = 0
            getattr(message, message.WhichOneof("response")).reasoning_tokens = count
        return message

    def _thinking(self, request: Any) -> bool:
        return self.model.read(request.tokenized.input_ids).thinking

    async def _abort_rpc(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = self._abort_ids(request, [request.request_id])
        return sgl.AbortResponse(
            success=found, message=f"Request {request.request_id} {'aborted' if found else 'not found'}"
        )

    async def _model_info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self.model
        return sgl.GetModelInfoResponse(
            model_path=f"{_MODEL_DIR}/{self.model_name}",
            tokenizer_path=f"{_MODEL_DIR}/{self.model_name}",
            is_generation=True,
            preferred_sampling_params="",
            weight_version="default",
            served_model_name=self.model_name,
            max_context_length=m.max_context_length,
            vocab_size=m.vocab_size,
            supports_vision=False,
            model_type="qwen3",
            eos_token_ids=list(m.eos_token_ids),
            pad_token_id=m.endoftext_id,
            bos_token_id=m.endoftext_id,
            max_req_input_len=m.max_context_length - 1,
            architectures=["Qwen3ForCausalLM"],
            default_sampling_params_json=json.dumps(dict(DEFAULT_SAMPLING), separators=(",", ":")),
        )

    async def _server_info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self.model
        load = self._load()
        response = sgl.GetServerInfoResponse(
            active_requests=len(self._running),
            is_paused=False,
            last_receive_timestamp=self._last_receive,
            uptime_seconds=time.time() - self._started,
            sglang_version=SGLANG_VERSION,
            server_type=self.server_type,
            max_total_num_tokens=load["max_total_num_tokens"],
        )
        response.server_args.update(
            {
                "model_path": f"{_MODEL_DIR}/{self.model_name}",
                "served_model_name": self.model_name,
                "context_length": m.max_context_length,
                "tp_size": 1,
                "dp_size": 1,
                "skip_tokenizer_init": True,
                "disaggregation_mode": "null",
            }
        )
        response.scheduler_info.update(
            {
                "max_total_num_tokens": load["max_total_num_tokens"],
                "max_req_input_len": m.max_context_length - 1,
                "is_generation": True,
            }
        )
        response.start_time.FromSeconds(int(self._started))
        return response

    async def _get_loads(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        load = self._load()
        return sgl.GetLoadsResponse(
            timestamp=datetime.now(UTC).isoformat(),
            version=SGLANG_VERSION,
            dp_rank_count=1,
            loads=[sgl.SchedulerLoad(**load)],
            aggregate=sgl.AggregateMetrics(
                total_running_reqs=load["num_running_reqs"],
                total_waiting_reqs=0,
                total_reqs=load["num_total_reqs"],
                avg_token_usage=round(load["token_usage"], 4),
                avg_throughput=round(load["gen_throughput"], 2),
            ),
        )

    async def _lora(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        response_type = (
            sgl.LoadLoRAAdapterResponse
            if isinstance(request, sgl.LoadLoRAAdapterRequest)
            else sgl.UnloadLoRAAdapterResponse
        )
        return response_type(success=False, message="LoRA is not enabled on this server.")

    async def _list_lora(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return sgl.ListLoadedLoRAAdaptersResponse()
