"""The two engine protocols, vLLM's ``VllmEngine`` and SGLang's ``SglangScheduler`` (``smg-grpc-proto``), behind
one small adapter each.

They share their shape (Generate streams ``chunk`` then ``complete`` messages with the same field names,
HealthCheck, Abort, GetModelInfo, GetTokenizer, Embed) and differ in their sampling parameters (vLLM:
``max_tokens``, an optional temperature, ``top_k`` 0 for off, a typed ``json_object`` and ``choice``
constraint, ``logprobs`` inside them; SGLang: ``max_new_tokens``, ``top_k`` -1 for off, ``no_stop_trim``,
``ebnf_grammar``, the seed among ``custom_params``, logprobs on the request), in how Abort names a request,
and in their counts (vLLM's per step, SGLang's cumulative: the client counts tokens itself).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from typing import Any

from google.protobuf import struct_pb2  # type: ignore[import-untyped]

# smg-grpc-proto ships no type information: its modules are Any here.
common_pb2: Any = importlib.import_module("smg_grpc_proto.generated.common_pb2")
_vllm: Any = importlib.import_module("smg_grpc_proto.generated.vllm_engine_pb2")
_sglang: Any = importlib.import_module("smg_grpc_proto.generated.sglang_scheduler_pb2")


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


class Protocol:
    """What differs between the engines: the service, the messages, the sampling parameters."""

    name: str
    service: str
    pb: Any
    constraints: frozenset[str]

    def path(self, method: str) -> str:
        return f"/{self.service}/{method}"

    def generate(self, request_id: str, ids: list[int], text: str, s: Sampling) -> bytes:
        raise NotImplementedError

    def abort(self, request_id: str) -> bytes:
        raise NotImplementedError

    def embed(self, request_id: str, ids: list[int]) -> bytes:
        return bytes(
            self.pb.EmbedRequest(
                request_id=request_id, tokenized=self.pb.TokenizedInput(input_ids=ids)
            ).SerializeToString()
        )

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
        )

    def response(self, body: bytes) -> Any:
        return self.pb.GenerateResponse.FromString(body)

    def health(self) -> bytes:
        return bytes(self.pb.HealthCheckRequest().SerializeToString())

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
    constraints = frozenset({"json_schema", "json_object", "regex", "grammar", "choice", "structural_tag"})

    def generate(self, request_id: str, ids: list[int], text: str, s: Sampling) -> bytes:
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
            tokenized=self.pb.TokenizedInput(original_text=text, input_ids=ids),
            sampling_params=p,
            stream=True,
        )
        return bytes(request.SerializeToString())

    def abort(self, request_id: str) -> bytes:
        return bytes(self.pb.AbortRequest(request_ids=[request_id]).SerializeToString())


class Sglang(Protocol):
    name = "sglang"
    service = "sglang.grpc.scheduler.SglangScheduler"
    pb = _sglang
    constraints = frozenset({"json_schema", "json_object", "regex", "grammar", "choice", "structural_tag"})

    def generate(self, request_id: str, ids: list[int], text: str, s: Sampling) -> bytes:
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
            tokenized=self.pb.TokenizedInput(original_text=text, input_ids=ids),
            sampling_params=p,
            stream=True,
        )
        if s.logprobs is not None:
            request.return_logprob = True
            request.top_logprobs_num = s.logprobs
            request.logprob_start_len = -1
        return bytes(request.SerializeToString())

    def abort(self, request_id: str) -> bytes:
        return bytes(
            self.pb.AbortRequest(request_id=request_id, reason="the client went away").SerializeToString()
        )


PROTOCOLS: dict[str, Protocol] = {"vllm": Vllm(), "sglang": Sglang()}
