"""Fake inference engines speaking the engines' own gRPC protocols (kinds ``vllm``, ``sglang`` and ``trtllm``), as a
router such as SMG or the gateway's engine path talks to them: ``vllm.grpc.engine.VllmEngine``,
``sglang.grpc.scheduler.SglangScheduler`` and ``trtllm.TrtllmService`` from ``smg-grpc-proto``, over grpc.aio,
with the model of :mod:`.model` (a real tokenizer; token ids in, token ids out).

- ``Generate``: the prompt is ``tokenized.input_ids`` (TensorRT-LLM: ``input_token_ids``; or vLLM's ``text``,
  tokenized here). Streaming: one ``GenerateStreamChunk`` per step per choice ``index`` (TensorRT-LLM:
  ``sequence_index``; the choices of ``n`` > 1 interleave), then a ``GenerateComplete`` per index when it
  finishes (TensorRT-LLM: every Complete after the request's last step), whose ``output_ids`` repeat the last
  step's tokens, as the vLLM and SGLang servicers do (TensorRT-LLM's ``output_token_ids`` repeat them all).
  vLLM's counts are the step's (``completion_tokens`` = the chunk's tokens: routers add them up), SGLang's and
  TensorRT-LLM's are cumulative. Unary: only the Completes, with all output ids. ``finish_reason`` is "stop"
  (EOS, stop string: ``matched_stop_str``, stop token: ``matched_token_id``; SGLang also reports the EOS as
  ``matched_token_id``), "length" or "abort" (TensorRT-LLM: "cancelled"). TensorRT-LLM cuts a stop word (a
  stop token, a stop string's own tokens) from the ids unless ``include_stop_token_in_output``, so its last
  step's chunk can be left out; the EOS stays. ``cached_tokens`` come from a prefix cache of recent prompts
  (16-token blocks). Logprobs (vLLM ``sampling_params.logprobs``, SGLang ``return_logprob`` and
  ``top_logprobs_num``, TensorRT-LLM ``output_config.logprobs``: ``TokenLogprob`` lists) ride on the chunks and
  Completes; SGLang counts ``reasoning_tokens`` (those before ``</think>``) when asked
  (``require_reasoning``); the ``json_schema``/``json_object``/``choice`` constraints (TensorRT-LLM: the JSON
  and JSON-schema guides) shape the answer (:mod:`.model`), the others are ignored. A prompt at or above
  ``max_context_length``, ``max_tokens`` 0 and other invalid parameters (TensorRT-LLM: also beam search, an
  ``embedding_bias`` not of the vocabulary's size) are refused with INVALID_ARGUMENT before any fault.
- Images (:mod:`.model`), with the provider's ``vision`` option (``--vision``): vLLM's ``media_refs`` (which
  need ``tokenized`` input: one unexpanded ``<|image_pad|>`` anchor per item; every item's modality IMAGE, at
  most 4 items, each url a ``data:`` URL the engine "fetches", its bytes an image the model can read) and
  TensorRT-LLM's ``multimodal_input.image_data`` (an image's raw bytes each). The anchors and the images must be
  as many and no image may exceed the encoder budget (1024 tokens); the model answers from the expanded prompt
  and every ``prompt_tokens`` (and the prefix cache) counts it. Anything else, images sent to an engine without
  ``vision`` ("<model> is not a multimodal model"), and preprocessed ``mm_inputs`` (vLLM's, and SGLang's with or
  without ``vision``: "this engine takes preprocessed multimodal tensors, which the fake does not model") are
  refused with INVALID_ARGUMENT before any fault. With ``vision``, vLLM's ``GetModelInfo`` says
  ``supports_vision`` and its ``GetServerInfo`` ``mm_processor`` "inprocess" (``mm_processor_source`` "flag"),
  ``mm_media_ref_schemes`` "data", ``mm_item_limits`` "image=4" and ``mm_encoder_budget`` 1024; without, they
  are empty (false, 0).
- ``Abort`` finishes the named running requests with "abort" (vLLM: ``request_ids``; SGLang and TensorRT-LLM:
  ``request_id``, answering whether it was found; TensorRT-LLM sends no empty chunk first); a client that goes
  away cancels its request.
- ``GetModelInfo`` (``served_model_name`` is the provider's first model; ``model_path``/``tokenizer_path`` do
  not exist locally, so a router fetches the tokenizer with ``GetTokenizer``; default sampling as JSON;
  TensorRT-LLM: ``model_id`` is the model's name, with ``max_input_len``, ``max_seq_len``, ``vocab_size``
  only), ``GetServerInfo`` (``server_type`` "vllm-grpc" / "grpc"; TensorRT-LLM's ``backend`` "tensorrt-llm"),
  ``GetLoads`` (not TensorRT-LLM), ``GetTokenizer`` (the model's files as one ZIP in 64 KiB chunks, the
  SHA-256 of the whole on the last), ``HealthCheck`` (TensorRT-LLM: ``status`` "OK"), ``Embed`` (the
  deterministic vectors of :mod:`.endpoints`, of the decoded prompt; TensorRT-LLM's servicer answers
  UNIMPLEMENTED), ``FlushCache`` (empties the prefix cache; not TensorRT-LLM). ``SubscribeKvEvents`` is
  UNIMPLEMENTED, as an engine started without KV events answers; so are the profiler RPCs' answers
  (``success`` false) and SGLang's LoRA RPCs (nothing loaded).

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
from llmgw_dev.fakes.model import (
    DEFAULT_SAMPLING,
    ENCODER_BUDGET,
    MAX_IMAGES,
    FakeModel,
    Generation,
    ImageFacts,
    Sampling,
    fetch_media,
    image_facts,
    load,
)
from llmgw_dev.fakes.server import FakeProvider, stall

# smg-grpc-proto ships no type information: its modules are Any here.
common_pb2: Any = importlib.import_module("smg_grpc_proto.generated.common_pb2")
sgl: Any = importlib.import_module("smg_grpc_proto.generated.sglang_scheduler_pb2")
sgl_grpc: Any = importlib.import_module("smg_grpc_proto.generated.sglang_scheduler_pb2_grpc")
vpb: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2")
vpb_grpc: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2_grpc")
tpb: Any = importlib.import_module("smg_grpc_proto.generated.trtllm_service_pb2")
tpb_grpc: Any = importlib.import_module("smg_grpc_proto.generated.trtllm_service_pb2_grpc")

CHUNK_SIZE: Final = 64 * 1024  # GetTokenizer's chunks
BLOCK_SIZE: Final = 16  # the prefix cache's granularity, in tokens
_PREFIXES_KEPT: Final = 64
_MODEL_DIR: Final = "/nonexistent/llmgw-fake-engine"  # where the engine says its model is: not on this host
VLLM_VERSION: Final = "0.11.0"
SGLANG_VERSION: Final = "0.5.4"
TRTLLM_VERSION: Final = "1.2.0"
MEDIA_SCHEMES: Final = frozenset({"data"})  # the URL schemes a vision engine fetches media_refs from
PREPROCESSED: Final = "this engine takes preprocessed multimodal tensors, which the fake does not model"


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
    abort_chunk: ClassVar[bool] = True  # whether Abort sends an empty chunk before each Complete (streaming)
    completes_at_end: ClassVar[bool] = False  # whether every Complete waits for the last choice (TRT-LLM)

    def __init__(self, fake: FakeProvider) -> None:
        super().__init__(fake)
        self.model: FakeModel = load(fake.models[0], fake.response_tokens)
        self.model_name = fake.models[0]
        self.vision = fake.vision
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

    def _streaming(self, request: Any) -> bool:
        return bool(request.stream)

    def _images(self, request: Any) -> tuple[ImageFacts, ...]:
        """The request's images, in prompt order (none: a text prompt); ValueError for media it cannot take."""
        return ()

    def _multimodal(self, count: int) -> None:
        """Refuse images when the model is not a vision model, or more of them than one prompt may carry."""
        if not self.vision:
            raise ValueError(f"{self.model_name} is not a multimodal model")
        if count > MAX_IMAGES:
            raise ValueError(f"At most {MAX_IMAGES} image(s) may be provided in one prompt.")

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
        self,
        request: Any,
        request_id: str,
        g: Generation,
        start: int,
        end: int,
        prompt: int,
        cached: int,
        top: int | None,
    ) -> Any | None:
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
        request: Any,
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
                images = self._images(request)
                sampling = self._sampling(request)
                ids = self.model.expand(ids, images)  # what the model, prompt_tokens and the prefix cache see
                generations = self.model.generate(ids, sampling, images)
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
        stream = self._streaming(request)
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
                    if g.index in done and self.completes_at_end:  # finished before the Abort: as it ended
                        yield self._complete(request, request_id, g, 0, len(g.token_ids), prompt, cached, top)
                    elif g.index not in done:
                        if stream and self.abort_chunk:
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
                            request, request_id, g, end if stream else 0, end, prompt, cached, top, "abort"
                        )
                return
            if stream:
                if step == break_after:
                    await self._break(context)
                if step == stall_after:
                    await stall()
            self._generated += len(generations) - len(done)
            for g in generations:
                if g.index in done or step >= len(g.token_ids):
                    continue
                last = step == len(g.token_ids) - 1
                if stream:
                    chunk = self._chunk(request, request_id, g, step, step + 1, prompt, cached, top)
                    if chunk is not None:
                        yield self._count_reasoning(request, g, step + 1, chunk)
                    if last and not self.completes_at_end:
                        yield self._count_reasoning(
                            request,
                            g,
                            step + 1,
                            self._complete(request, request_id, g, step, step + 1, prompt, cached, top),
                        )
                if last:
                    done.add(g.index)
        if not stream or self.completes_at_end:
            for g in generations:
                yield self._count_reasoning(
                    request,
                    g,
                    len(g.token_ids),
                    self._complete(request, request_id, g, 0, len(g.token_ids), prompt, cached, top),
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

    def _images(self, request: Any) -> tuple[ImageFacts, ...]:
        """The images of ``media_refs`` (data URLs only), checked as the worker-side processor does."""
        if request.HasField("mm_inputs") or len(request.extra_mm_inputs):
            raise ValueError(PREPROCESSED)
        items = request.media_refs.items if request.HasField("media_refs") else ()
        if not items:
            return ()
        self._multimodal(len(items))
        if request.WhichOneof("input") != "tokenized":
            raise ValueError("media_refs requires tokenized input")
        images = []
        for i, item in enumerate(items):
            if item.modality != common_pb2.IMAGE:
                try:
                    name = common_pb2.Modality.Name(item.modality)
                except ValueError:
                    name = str(item.modality)
                raise ValueError(f"media_refs.items[{i}]: modality {name} is not supported (images only)")
            images.append(image_facts(fetch_media(item.url, MEDIA_SCHEMES)))
        return tuple(images)

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
            supports_vision=self.vision,
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
        media: dict[str, Any] = {}
        if self.vision:
            media = {
                "mm_processor": "inprocess",
                "mm_media_ref_schemes": ",".join(sorted(MEDIA_SCHEMES)),
                "mm_processor_source": "flag",
                "mm_item_limits": f"image={MAX_IMAGES}",
                "mm_encoder_budget": ENCODER_BUDGET,
            }
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
            **media,
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

    def _images(self, request: Any) -> tuple[ImageFacts, ...]:
        if request.HasField("mm_inputs"):
            raise ValueError(PREPROCESSED)
        return ()

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


# ------------------------------------------------------------------------------------------- TensorRT-LLM


class _TrtllmServicer:
    """``TrtllmService``'s handlers, bound to the API's methods."""

    def __init__(self, api: Trtllm) -> None:
        self.Generate = api._generate
        self.Embed = api._embed
        self.HealthCheck = api._health
        self.Abort = api._abort_rpc
        self.GetModelInfo = api._model_info
        self.GetServerInfo = api._server_info
        self.GetTokenizer = api._get_tokenizer
        self.SubscribeKvEvents = api._subscribe_kv_events


class Trtllm(Engine):
    """TensorRT-LLM's gRPC server (``trtllm.TrtllmService``, as ``tensorrt_llm/grpc`` serves SMG); see the
    module docstring."""

    pb = tpb
    service_name = "trtllm.TrtllmService"
    server_type = "tensorrt-llm"
    cumulative = True
    eos_is_matched = False
    abort_chunk = False  # an aborted sequence has no new tokens: TensorRT-LLM sends no chunk for it
    completes_at_end = True  # a request's Completes follow its last step, one per sequence
    kv_events_message = "KV cache events are not enabled"
    _GUIDE_JSON = tpb.GuidedDecodingParams.GUIDE_TYPE_JSON
    _GUIDE_JSON_SCHEMA = tpb.GuidedDecodingParams.GUIDE_TYPE_JSON_SCHEMA

    def _add_services(self, server: Any) -> None:
        tpb_grpc.add_TrtllmServiceServicer_to_server(_TrtllmServicer(self), server)

    def _streaming(self, request: Any) -> bool:
        return bool(request.streaming)

    def _input_ids(self, request: Any) -> list[int]:
        if not request.HasField("tokenized"):
            raise ValueError("Missing tokenized input")
        ids = list(request.tokenized.input_token_ids)
        limit = self.model.max_context_length - 1
        if len(ids) > limit:
            raise ValueError(f"The prompt length ({len(ids)}) should not exceed max_input_len ({limit})")
        return ids

    def _images(self, request: Any) -> tuple[ImageFacts, ...]:
        """The images of ``multimodal_input.image_data`` (raw bytes), in prompt order."""
        data = request.multimodal_input.image_data if request.HasField("multimodal_input") else ()
        if not data:
            return ()
        self._multimodal(len(data))
        return tuple(image_facts(item) for item in data)

    def _sampling(self, request: Any) -> Sampling:
        c = request.sampling_config
        o = request.output_config
        if c.beam_width > 1:
            raise ValueError("beam search (beam_width > 1) is not served by this engine")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {request.max_tokens}")
        temperature = c.temperature if c.HasField("temperature") else 1.0
        if temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {temperature}")
        logprobs = o.logprobs if o.HasField("logprobs") else None
        if logprobs is not None and logprobs < 0:
            raise ValueError(f"logprobs must be non-negative, got {logprobs}")
        if len(request.embedding_bias) and len(request.embedding_bias) != self.model.vocab_size:
            raise ValueError(
                f"embedding_bias length ({len(request.embedding_bias)}) must match vocab_size "
                f"({self.model.vocab_size})"
            )
        schema = None
        if request.HasField("guided_decoding") and request.guided_decoding.guide:
            guide = request.guided_decoding
            if guide.guide_type == self._GUIDE_JSON:
                schema = '{"type": "object"}'
            elif guide.guide_type == self._GUIDE_JSON_SCHEMA:
                schema = guide.guide
        return Sampling(
            max_tokens=request.max_tokens,
            min_tokens=c.min_tokens if c.HasField("min_tokens") else 0,
            stop=tuple(request.stop),
            stop_token_ids=tuple(request.stop_token_ids),
            ignore_eos=request.ignore_eos,
            include_stop_str_in_output=request.include_stop_token_in_output,
            n=c.num_return_sequences or 1,
            temperature=temperature,
            seed=c.seed if c.HasField("seed") else None,
            logprobs=logprobs,
            json_schema=schema,
        )

    def _response(self, request_id: str, **fields: Any) -> Any:
        return tpb.GenerateResponse(request_id=request_id, **fields)

    def _output(self, request: Any, g: Generation) -> tuple[tuple[int, ...], str | int | None]:
        """A finished sequence's output ids and its stop reason, as TensorRT-LLM reports them: a stop word (a
        stop string's own tokens, a stop token) ends the ids only with ``include_stop_token_in_output``; the
        EOS stays."""
        ids = g.token_ids
        if g.matched_token_id is not None:
            stop: tuple[int, ...] = (g.matched_token_id,)
            reason: str | int | None = g.matched_token_id
        elif g.matched_stop_str is not None:
            stop = tuple(self.model.encode(g.matched_stop_str))
            reason = g.matched_stop_str
        else:
            return ids, None
        if stop and ids[-len(stop) :] == stop and not request.include_stop_token_in_output:
            ids = ids[: -len(stop)]
        return ids, reason  # (a stop string that ended inside other tokens than its own stays: no cut)

    def _token_logprobs(self, g: Generation, start: int, end: int, top: int) -> list[Any]:
        assert g.logprobs is not None
        return [
            tpb.TokenLogprob(
                token_id=entry.token_id,
                logprob=entry.logprob,
                top_logprobs=[tpb.TopLogprob(token_id=t, logprob=v) for t, v in entry.top[:top]]
                if top
                else [],
            )
            for entry in g.logprobs[start:end]
        ]

    def _chunk(
        self,
        request: Any,
        request_id: str,
        g: Generation,
        start: int,
        end: int,
        prompt: int,
        cached: int,
        top: int | None,
    ) -> Any | None:
        """The new tokens of a step; the last step's are those left once the stop word is cut (none: no
        chunk)."""
        ids = g.token_ids if end < len(g.token_ids) else self._output(request, g)[0]
        delta = ids[start:end]
        if not delta:
            return None
        chunk = tpb.GenerateStreamChunk(
            token_ids=delta,
            sequence_index=g.index,
            prompt_tokens=prompt,
            completion_tokens=min(end, len(ids)),
            cached_tokens=cached,
        )
        if top is not None:
            chunk.logprobs.extend(self._token_logprobs(g, start, start + len(delta), top))
        return self._response(request_id, chunk=chunk)

    def _complete(
        self,
        request: Any,
        request_id: str,
        g: Generation,
        start: int,
        end: int,
        prompt: int,
        cached: int,
        top: int | None,
        finish: str | None = None,
    ) -> Any:
        """Every output id so far (streaming too), their logprobs, the finish reason ("cancelled" after
        Abort) and the stop word that matched."""
        if finish is None:
            ids, reason = self._output(request, g)
        else:
            ids, reason = g.token_ids[:end], None
        complete = tpb.GenerateComplete(
            output_token_ids=ids,
            sequence_index=g.index,
            finish_reason="cancelled" if finish == "abort" else finish or g.finish_reason,
            prompt_tokens=prompt,
            completion_tokens=len(ids),
            cached_tokens=cached,
        )
        if isinstance(reason, int):
            complete.matched_token_id = reason
        elif isinstance(reason, str):
            complete.matched_stop_str = reason
        if top is not None:
            complete.logprobs.extend(self._token_logprobs(g, 0, len(ids), top))
        return self._response(request_id, complete=complete)

    async def _embed(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.fake.received.append(request)
        await self._auth(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Embed RPC not yet implemented")

    async def _health(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return tpb.HealthCheckResponse(status="OK")

    async def _abort_rpc(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        found = self._abort_ids(request, [request.request_id])
        return tpb.AbortResponse(
            success=found, message=f"Request {request.request_id} {'aborted' if found else 'not found'}"
        )

    async def _model_info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        m = self.model
        return tpb.GetModelInfoResponse(
            model_id=self.model_name,  # the model trtllm-serve was started with: the name routers serve it as
            max_input_len=m.max_context_length - 1,
            max_seq_len=m.max_context_length,
            vocab_size=m.vocab_size,
        )

    async def _server_info(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return tpb.GetServerInfoResponse(
            version=TRTLLM_VERSION,
            backend=self.server_type,
            tensor_parallel_size=1,
            pipeline_parallel_size=1,
            context_parallel_size=1,
            world_size=1,
        )
