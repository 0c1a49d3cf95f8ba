"""``vllm``, ``sglang`` and ``trtllm``: an inference engine over its own gRPC protocol, the one it serves a router.

vLLM (``vllm serve --grpc``), SGLang (gRPC mode) and TensorRT-LLM take token ids and stream token ids back
(``vllm.grpc.engine.VllmEngine``, ``sglang.grpc.scheduler.SglangScheduler``, ``trtllm.TrtllmService``, from
the ``smg-grpc-proto`` package), so the gateway does what their OpenAI servers did: it renders the model's chat template,
tokenizes, detokenizes, cuts at stop strings and parses tool calls and reasoning (:mod:`llmgw.engine`). The
settings say where the engines are (``target``: a name that resolves to several addresses, a headless
Service, is one worker per address; how often each engine is asked for its load, ``GetLoads``, so that requests
go where other proxies' requests are not), where the tokenizer comes from (the engine itself, by ``GetTokenizer``,
unless ``tokenizerPath`` names a directory of its files), an override of the model's chat template, and
which parsers read the model's tool calls and reasoning.
"""

from __future__ import annotations

import dataclasses

from llmgw_common.providers.base import ProviderType, target
from llmgw_common.reader import ConfigError, Reader

# The parsers llmgw.engine has (a test holds the lists equal): vLLM's --tool-call-parser and
# --reasoning-parser names.
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "llama4_json", "mistral")
REASONING_PARSERS = ("deepseek_r1", "qwen3")


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    target: str  # HOST:PORT; every address the host resolves to is a worker (a headless Service's pods)
    tls: bool = False  # TLS with the system's roots
    resolve_interval_s: float = 30.0  # how often the target's addresses are looked up again
    # How often each worker is asked for its load (GetLoads; vLLM and SGLang), while requests flow; 0: never.
    loads_interval_s: float = 5.0
    tokenizer_path: str | None = (
        None  # a directory with tokenizer.json (...); None: the engine's, by GetTokenizer
    )
    chat_template: str | None = None  # replaces the model's chat template (Jinja, as transformers renders it)
    tool_call_parser: str | None = None  # one of TOOL_CALL_PARSERS; None: the model's tool calls stay text
    reasoning_parser: str | None = None  # one of REASONING_PARSERS; None: its reasoning stays in the content
    max_tokenizer_bytes: int = 256 * 1024 * 1024  # the tokenizer's files an engine may send, unpacked


def _choice(r: Reader, key: str, names: tuple[str, ...]) -> str | None:
    value: str | None = r.get(key, str)
    if value is not None and value not in names:
        raise ConfigError(f"{r.path(key)}: must be one of {', '.join(names)}, got {value!r}")
    return value


def parse(r: Reader) -> EngineSettings:
    return _parse(r, loads=True)


def parse_trtllm(r: Reader) -> EngineSettings:
    """TensorRT-LLM's server has no GetLoads: ``loadsIntervalSeconds`` is not a setting of its own."""
    return _parse(r, loads=False)


def _parse(r: Reader, *, loads: bool) -> EngineSettings:
    d = EngineSettings(target="")
    template = r.get("chatTemplate", str)
    if template is not None and not template.strip():
        raise ConfigError(f"{r.path('chatTemplate')}: must not be empty (leave it out for the model's own)")
    return EngineSettings(
        target=target(r),
        tls=r.get("tls", bool, False),
        resolve_interval_s=r.number("resolveIntervalSeconds", d.resolve_interval_s),
        loads_interval_s=r.number("loadsIntervalSeconds", d.loads_interval_s, exclusive=False)
        if loads
        else 0.0,
        tokenizer_path=r.get("tokenizerPath", str),
        chat_template=template,
        tool_call_parser=_choice(r, "toolCallParser", TOOL_CALL_PARSERS),
        reasoning_parser=_choice(r, "reasoningParser", REASONING_PARSERS),
        max_tokenizer_bytes=r.integer("maxTokenizerBytes", d.max_tokenizer_bytes, minimum=1024 * 1024),
    )


VLLM = ProviderType("vllm", "grpc", parse, "a vLLM engine over its gRPC protocol (vllm serve --grpc)")
SGLANG = ProviderType("sglang", "grpc", parse, "an SGLang scheduler over its gRPC protocol")
TRTLLM = ProviderType(
    "trtllm", "grpc", parse_trtllm, "a TensorRT-LLM server over its gRPC protocol (trtllm.TrtllmService)"
)
