"""The three engine protocols, vLLM's ``VllmEngine``, SGLang's ``SglangScheduler`` and TensorRT-LLM's
``TrtllmService`` (``smg-grpc-proto``), behind one small adapter each.

vLLM and SGLang share their shape (Generate streams ``chunk`` then ``complete`` messages with the same field
names, HealthCheck, Abort, GetModelInfo, GetTokenizer, Embed) and differ in their sampling parameters (vLLM:
``max_tokens``, an optional temperature, ``top_k`` 0 for off, a typed ``json_object`` and ``choice``
constraint, ``logprobs`` inside them; SGLang: ``max_new_tokens``, ``top_k`` -1 for off, ``no_stop_trim``,
``ebnf_grammar``, the seed among ``custom_params``, logprobs on the request), in how Abort names a request,
and in their counts (vLLM's per step, SGLang's cumulative: the client counts tokens itself).

TensorRT-LLM has the same RPCs in its own words: a ``SamplingConfig`` (``num_return_sequences`` for ``n``),
an ``OutputConfig`` (``logprobs``), ``GuidedDecodingParams`` (a guide type and its text: ``choice`` goes as a
regex), ``max_tokens`` required, ``logit_bias`` as an ``embedding_bias`` of the vocabulary's size; its answers
name a choice ``sequence_index``, carry ``TokenLogprob`` lists, and its Complete repeats every output id (the
client reads them only from an engine that sent no chunks). :meth:`Trtllm.response` puts its answers in
vLLM's messages, so the client reads one layout. Its GetModelInfo says neither the EOS ids (the client takes
the tokenizer's, as TensorRT-LLM does) nor default sampling parameters (it has none).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from collections.abc import Sequence
from typing import Any

from google.protobuf import struct_pb2  # type: ignore[import-untyped]

from llmgw.engine.media import MediaSupport, item_limits

# smg-grpc-proto ships no type information: its modules are Any here.
common_pb2: Any = importlib.import_module("smg_grpc_proto.generated.common_pb2")
_vllm: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2")
_sglang: Any = importlib.import_module("smg_grpc_proto.generated.sglang_scheduler_pb2")
_trtllm: Any = importlib.import_module("smg_grpc_proto.generated.trtllm_service_pb2")
_IMAGE = common_pb2.Modality.Value("IMAGE")


@dataclasses.dataclass
class Sampling:
    """One request's sampling parameters, as the gateway resolved them (defaults applied)."""

    temperature: float | None = None
    top_p: float = 1.0
    top_k: int | None = None  # None: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the sampled token's and k alternatives
    logit_bias: dict[int, float] = dataclasses.field(default_factory=dict)
    # ("json_schema" | "json_object" | "regex" | "grammar" | "choice" | "structural_tag", value)
    constraint: tuple[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo says, in both protocols' terms."""

    model_path: str
    served_model_name: str
    max_context_length: int
    max_input_length: int  # the longest prompt the engine takes
    eos_token_ids: tuple[int, ...]
    default_sampling: dict[str, Any]
    is_generation: bool
    vocab_size: int = 0  # 0: the engine does not say

    @property
    def key(self) -> tuple[str, str]:
        """The model as its engine names it: a worker serving another key serves another model."""
        return self.model_path, self.served_model_name


class Unsupported(ValueError):
    """A request field the engine's protocol cannot carry: its message names the field (a 400)."""


class Protocol:
    """What differs between the engines: the service, the messages, the sampling parameters."""

    name: str
    service: str
    pb: Any
    constraints: frozenset[str]
    ids_field = "input_ids"  # TokenizedInput's field of the prompt's ids
    server_info_tells_media = False  # whether media_support reads GetServerInfo
    seed_bits = 64  # the sampling seed's width (vLLM's is a signed 32-bit integer)

    def path(self, method: str) -> str:
        return f"/{self.service}/{method}"

    def generate(
        self,
        request_id: str,
        ids: list[int],
        text: str,
        s: Sampling,
        info: ModelInfo | None = None,
        images: Sequence[str | bytes] = (),
    ) -> bytes:
        """The GenerateRequest; a :class:`Unsupported` names a field the protocol cannot carry. ``images``
        are in the form :meth:`media_support` names (URLs or bytes), one per anchor in ``ids``."""
        raise NotImplementedError

    def media_support(self, server_info: bytes | None) -> MediaSupport:
        """What the engine takes of a request's images, from its GetServerInfo answer (None: it has none)."""
        raise NotImplementedError

    def abort(self, request_id: str) -> bytes:
        raise NotImplementedError

    def embed(self, request_id: str, ids: list[int]) -> bytes:
        request = self.pb.EmbedRequest(request_id=request_id)
        self._set_prompt(request.tokenized, ids, "")
        return bytes(request.SerializeToString())

    def _set_prompt(self, tokenized: Any, ids: list[int], text: str) -> None:
        """The prompt into the request's own TokenizedInput: one built apart would be copied in, ids and all
        (a third of a long prompt's request time)."""
        getattr(tokenized, self.ids_field).extend(ids)
        tokenized.original_text = text

    def model_info(self, body: bytes) -> ModelInfo:
        m = self.pb.GetModelInfoResponse.FromString(body)
        defaults: dict[str, Any] = {}
        if m.default_sampling_params_json:
            try:
                value = json.loads(m.default_sampling_params_json)
            except ValueError:
                value = None
            if isinstance(value, dict):
                defaults = value
        context = int(m.max_context_length)
        limit = int(m.max_req_input_len) if m.max_req_input_len > 0 else context
        if limit <= 0:
            limit = 2**31 - 1  # the engine does not say: it judges the prompt itself
        return ModelInfo(
            model_path=str(m.model_path),
            served_model_name=str(m.served_model_name),
            max_context_length=context,
            max_input_length=min(limit, context - 1) if context > 0 else limit,
            eos_token_ids=tuple(int(i) for i in m.eos_token_ids if i >= 0),
            default_sampling=defaults,
            is_generation=bool(m.is_generation),
            vocab_size=max(int(m.vocab_size), 0),
        )

    def response(self, body: bytes) -> Any:
        return self.pb.GenerateResponse.FromString(body)

    def health(self) -> bytes:
        return bytes(self.pb.HealthCheckRequest().SerializeToString())

    def load(self, body: bytes) -> int:
        """The requests a GetLoads answer says the engine has, running or waiting, over its DP ranks."""
        loads = self.pb.GetLoadsResponse.FromString(body).loads
        return sum(max(x.num_total_reqs, x.num_running_reqs + x.num_waiting_reqs, 0) for x in loads)

    def health_ok(self, body: bytes) -> tuple[bool, str]:
        answer = self.pb.HealthCheckResponse.FromString(body)
        return bool(answer.healthy), str(answer.message)

    def empty(self, name: str) -> bytes:
        return bytes(getattr(self.pb, name)().SerializeToString())

    def embedding(self, body: bytes) -> tuple[list[float], int]:
        answer = self.pb.EmbedResponse.FromString(body)
        return list(answer.embedding), int(answer.prompt_tokens)


class Vllm(Protocol):
    name = "vllm"
    service = "vllm.grpc.engine.VllmEngine"
    pb = _vllm
    server_info_tells_media = True
    seed_bits = 32
    constraints = frozenset({"json_schema", "json_object", "regex", "grammar", "choice", "structural_tag"})

    def generate(
        self,
        request_id: str,
        ids: list[int],
        text: str,
        s: Sampling,
        info: ModelInfo | None = None,
        images: Sequence[str | bytes] = (),
    ) -> bytes:
        p = self.pb.SamplingParams(
            top_p=s.top_p,
            top_k=s.top_k if s.top_k is not None and s.top_k > 0 else 0,
            min_p=s.min_p,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            repetition_penalty=s.repetition_penalty,
            min_tokens=s.min_tokens,
            stop=s.stop,
            stop_token_ids=s.stop_token_ids,
            skip_special_tokens=s.skip_special_tokens,
            spaces_between_special_tokens=s.spaces_between_special_tokens,
            ignore_eos=s.ignore_eos,
            n=s.n,
            include_stop_str_in_output=s.include_stop_str_in_output,
            logit_bias=s.logit_bias,
        )
        if s.temperature is not None:
            p.temperature = s.temperature
        if s.max_tokens is not None:
            p.max_tokens = s.max_tokens
        if s.logprobs is not None:
            p.logprobs = s.logprobs
        if s.seed is not None:
            p.seed = s.seed
        if s.constraint is not None:
            kind, value = s.constraint
            if kind == "choice":
                p.choice.choices.extend(value)
            elif kind == "json_object":
                p.json_object = True
            else:
                setattr(p, kind, value)
        request = self.pb.GenerateRequest(
            request_id=request_id,
            sampling_params=p,
            stream=True,
        )
        self._set_prompt(request.tokenized, ids, text)
        for url in images:
            request.media_refs.items.add(modality=_IMAGE, url=url)
        return bytes(request.SerializeToString())

    def media_support(self, server_info: bytes | None) -> MediaSupport:
        info = None if server_info is None else self.pb.GetServerInfoResponse.FromString(server_info)
        if info is None or not info.mm_processor:
            return MediaSupport(
                None,
                "its vLLM engine does not process images itself (its GetServerInfo names no mm_processor), "
                "and the gateway does not preprocess pixels for a model",
            )
        schemes = frozenset(s.strip().lower() for s in info.mm_media_ref_schemes.split(",") if s.strip())
        return MediaSupport("url", schemes=schemes, max_images=item_limits(info.mm_item_limits).get("image"))

    def abort(self, request_id: str) -> bytes:
        return bytes(self.pb.AbortRequest(request_ids=[request_id]).SerializeToString())


class Sglang(Protocol):
    name = "sglang"
    service = "sglang.grpc.scheduler.SglangScheduler"
    pb = _sglang
    constraints = frozenset({"json_schema", "json_object", "regex", "grammar", "choice", "structural_tag"})

    def generate(
        self,
        request_id: str,
        ids: list[int],
        text: str,
        s: Sampling,
        info: ModelInfo | None = None,
        images: Sequence[str | bytes] = (),
    ) -> bytes:
        p = self.pb.SamplingParams(
            temperature=1.0 if s.temperature is None else s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k is not None and s.top_k > 0 else -1,
            min_p=s.min_p,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
            repetition_penalty=s.repetition_penalty,
            stop=s.stop,
            stop_token_ids=s.stop_token_ids,
            skip_special_tokens=s.skip_special_tokens,
            spaces_between_special_tokens=s.spaces_between_special_tokens,
            n=s.n,
            min_new_tokens=s.min_tokens,
            ignore_eos=s.ignore_eos,
            no_stop_trim=s.include_stop_str_in_output,
            logit_bias={str(k): v for k, v in s.logit_bias.items()},
        )
        if s.max_tokens is not None:
            p.max_new_tokens = s.max_tokens
        if s.seed is not None:
            custom = struct_pb2.Struct()
            custom.update({"sampling_seed": s.seed})
            p.custom_params.CopyFrom(custom)
        if s.constraint is not None:
            kind, value = s.constraint
            if kind == "json_object":
                p.json_schema = '{"type": "object"}'
            elif kind == "choice":
                p.regex = "(" + "|".join(re.escape(c) for c in value) + ")"
            elif kind == "grammar":
                p.ebnf_grammar = value
            else:
                setattr(p, kind, value)
        request = self.pb.GenerateRequest(
            request_id=request_id,
            sampling_params=p,
            stream=True,
        )
        self._set_prompt(request.tokenized, ids, text)
        if s.logprobs is not None:
            request.return_logprob = True
            request.top_logprobs_num = s.logprobs
            request.logprob_start_len = -1
        return bytes(request.SerializeToString())

    def abort(self, request_id: str) -> bytes:
        return bytes(
            self.pb.AbortRequest(request_id=request_id, reason="the client went away").SerializeToString()
        )

    def media_support(self, server_info: bytes | None) -> MediaSupport:
        return MediaSupport(
            None,
            "SGLang's engine takes images as pixel tensors preprocessed for its model family, which the "
            "gateway does not make",
        )


class Trtllm(Protocol):
    name = "trtllm"
    service = "trtllm.TrtllmService"
    pb = _trtllm
    ids_field = "input_token_ids"
    constraints = frozenset({"json_schema", "json_object", "regex", "grammar", "choice", "structural_tag"})
    _GUIDES = {
        "json_schema": "GUIDE_TYPE_JSON_SCHEMA",
        "json_object": "GUIDE_TYPE_JSON",
        "regex": "GUIDE_TYPE_REGEX",
        "choice": "GUIDE_TYPE_REGEX",
        "grammar": "GUIDE_TYPE_EBNF_GRAMMAR",
        "structural_tag": "GUIDE_TYPE_STRUCTURAL_TAG",
    }
    DEFAULT_MAX_TOKENS = (
        2048  # max_tokens is required: what SMG sends when neither request nor engine bound it
    )

    def generate(
        self,
        request_id: str,
        ids: list[int],
        text: str,
        s: Sampling,
        info: ModelInfo | None = None,
        images: Sequence[str | bytes] = (),
    ) -> bytes:
        c = self.pb.SamplingConfig(
            beam_width=1,
            num_return_sequences=s.n,
            top_p=s.top_p,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_p=s.min_p,
        )
        if s.temperature is not None:
            c.temperature = s.temperature
        if s.top_k is not None and s.top_k > 0:
            c.top_k = s.top_k
        if s.seed is not None:
            c.seed = s.seed % 2**64  # uint64: a negative seed wraps, as numpy's does
        if s.min_tokens:
            c.min_tokens = s.min_tokens
        # TensorRT-LLM asks for logprobs with a positive count: 0 (the sampled token's only) asks for 1.
        o = self.pb.OutputConfig(exclude_input_from_output=True)
        if s.logprobs is not None:
            o.logprobs = max(s.logprobs, 1)
        request = self.pb.GenerateRequest(
            request_id=request_id,
            sampling_config=c,
            output_config=o,
            max_tokens=self.DEFAULT_MAX_TOKENS if s.max_tokens is None else s.max_tokens,
            streaming=True,
            stop=s.stop,
            stop_token_ids=s.stop_token_ids,
            ignore_eos=s.ignore_eos,
            include_stop_token_in_output=s.include_stop_str_in_output,
        )
        self._set_prompt(request.tokenized, ids, text)
        if images:
            request.multimodal_input.image_data.extend(images)
        if s.logit_bias:
            vocab = info.vocab_size if info is not None else 0
            if vocab <= 0:
                raise Unsupported(
                    "logit_bias: the engine does not say its vocabulary size, so it cannot be carried"
                )
            if max(s.logit_bias) >= vocab:
                raise Unsupported(
                    f"logit_bias: token id {max(s.logit_bias)} is out of the engine's vocabulary"
                )
            bias = [0.0] * vocab
            for token_id, value in s.logit_bias.items():
                bias[token_id] = value
            request.embedding_bias.extend(bias)
        if s.constraint is not None:
            kind, value = s.constraint
            if kind == "choice":
                guide = "(" + "|".join(re.escape(c) for c in value) + ")"
            elif kind == "json_object":
                guide = '{"type": "object"}'  # read by no one, but TensorRT-LLM skips a guide without text
            else:
                guide = str(value)
            guided = self.pb.GuidedDecodingParams(
                guide_type=self.pb.GuidedDecodingParams.GuideType.Value(self._GUIDES[kind]), guide=guide
            )
            request.guided_decoding.CopyFrom(guided)
        return bytes(request.SerializeToString())

    def abort(self, request_id: str) -> bytes:
        return bytes(self.pb.AbortRequest(request_id=request_id).SerializeToString())

    def media_support(self, server_info: bytes | None) -> MediaSupport:
        return MediaSupport("bytes")  # its input processor decodes them; a text model's engine refuses

    def model_info(self, body: bytes) -> ModelInfo:
        m = self.pb.GetModelInfoResponse.FromString(body)
        context = max(int(m.max_seq_len), 0)
        limit = int(m.max_input_len) if m.max_input_len > 0 else context
        if limit <= 0:
            limit = 2**31 - 1
        return ModelInfo(
            model_path=str(m.model_id),
            served_model_name=str(m.model_id),
            max_context_length=context,
            max_input_length=min(limit, context - 1) if context > 0 else limit,
            eos_token_ids=(),  # not said: the tokenizer's
            default_sampling={},
            is_generation=True,
            vocab_size=max(int(m.vocab_size), 0),
        )

    # TensorRT-LLM's finish reasons in vLLM's words: a request Abort (or its own timeout) ended is "abort".
    _FINISH = {"stop_word": "stop", "cancelled": "abort", "timeout": "abort"}

    def response(self, body: bytes) -> Any:
        """The answer as vLLM's GenerateResponse (``index``, ``output_ids``, ``output_logprobs``)."""
        message = self.pb.GenerateResponse.FromString(body)
        kind = message.WhichOneof("response")
        out = _vllm.GenerateResponse()
        if kind == "chunk":
            c = message.chunk
            chunk = out.chunk
            chunk.token_ids.extend(c.token_ids)
            chunk.prompt_tokens = c.prompt_tokens
            chunk.completion_tokens = c.completion_tokens
            chunk.cached_tokens = c.cached_tokens
            chunk.index = c.sequence_index
            if len(c.logprobs):
                chunk.output_logprobs.CopyFrom(self._logprobs(c.logprobs))
        elif kind == "complete":
            c = message.complete
            complete = out.complete
            complete.output_ids.extend(c.output_token_ids)
            complete.finish_reason = self._FINISH.get(c.finish_reason, c.finish_reason)
            complete.prompt_tokens = c.prompt_tokens
            complete.completion_tokens = c.completion_tokens
            complete.cached_tokens = c.cached_tokens
            complete.index = c.sequence_index
            if c.WhichOneof("matched_stop") == "matched_stop_str":
                complete.matched_stop_str = c.matched_stop_str
            elif c.WhichOneof("matched_stop") == "matched_token_id":
                complete.matched_token_id = c.matched_token_id
            if len(c.logprobs):
                complete.output_logprobs.CopyFrom(self._logprobs(c.logprobs))
        return out

    @staticmethod
    def _logprobs(entries: Any) -> Any:
        out = _vllm.OutputLogProbs()
        for entry in entries:
            out.token_ids.append(entry.token_id)
            out.token_logprobs.append(entry.logprob)
            out.top_logprobs.append(
                _vllm.TopLogProbs(
                    token_ids=[t.token_id for t in entry.top_logprobs],
                    values=[t.logprob for t in entry.top_logprobs],
                )
            )
        return out

    def health_ok(self, body: bytes) -> tuple[bool, str]:
        status = str(self.pb.HealthCheckResponse.FromString(body).status)
        return status.strip().lower() == "ok", status  # "OK", else what is wrong (SMG reads it so)


PROTOCOLS: dict[str, Protocol] = {"vllm": Vllm(), "sglang": Sglang(), "trtllm": Trtllm()}
