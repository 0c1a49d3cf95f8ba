#!/usr/bin/env python3
"""Payload size and encode/decode time of the gateway's messages: Protobuf vs the REST path's OpenAI JSON.

The corpus is fixed (built from a seeded generator, identical on every run): chat requests (short
single-turn, multi-turn with a system prompt, ~8 KB long context), complete responses, and stream chunks
(single-token deltas, final chunks with usage). Each message exists as a protobuf message and as the
OpenAI JSON the REST path carries (``llmgw.codecs.openai_chat``'s ``*_to_json``).

Rows of each table:

* ``protobuf``: ``SerializeToString`` / ``FromString`` -- the whole cost on the gRPC path.
* ``protobuf + field reads``: ``FromString`` then reading every field from Python (upb parses in C but
  builds Python objects lazily, so plain ``FromString`` flatters protobuf against JSON parsers, which
  materialise everything).
* ``orjson``: ``dumps`` of a ready dict / ``loads`` to a dict.
* ``orjson + mapping``: what the proxy really does on the REST path: protobuf -> ``*_to_json`` -> ``dumps``
  to encode, ``loads`` -> ``*_from_json`` -> protobuf to decode.
* ``json (stdlib)``: ``json.dumps`` (compact, ``ensure_ascii=False``) / ``json.loads``, for reference.

Sizes are the serialized message bodies; gzip is applied to each message on its own (as HTTP
``Content-Encoding: gzip`` does for a body and gRPC compression does per message). Times are
nanoseconds-precise (``time.perf_counter_ns``), reported per message as the median over repeated runs
with the garbage collector paused. A last table compares one streamed reply on the wire: SSE
(``data: ...\\n\\n`` events and ``[DONE]``) vs gRPC length-prefixed messages.

Usage: ``python bench/payload.py`` (well under a minute) or ``python bench/payload.py --quick`` (a smoke run
with few repetitions; sizes are identical, timings are noisier).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import platform
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf import __version__ as protobuf_version
from google.protobuf.internal import api_implementation

from llmgateway.v1 import llm_service_pb2 as pb
from llmgw.chat import FINISH_BY_NAME
from llmgw.codecs import openai_chat

SEED = 20240501
CREATED = 1_730_000_000

# A plain vocabulary with some punctuation, digits, quotes, newlines and non-ASCII characters, so that the
# text exercises JSON escaping the way real chat text does.
_VOCABULARY = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this from or "
    "had by hot word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water than "
    "call first who may down side been now find any new work part take get place made live where after "
    "back little only round man year came show every good me give our under name very through just form "
    "sentence great think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off need house picture try "
    "us again animal point mother world near build self earth father model request response token stream "
    "latency gateway protobuf kubernetes cluster deploy service container function variable database query "
    "café naïve über résumé — \u201cquoted\u201d \u2018single\u2019 2024 42 3.14 100% x=1 f(x) {key} "
    '[list] <tag> "esc" path/to/file.py C:\\temp'
)
_WORDS = tuple(_VOCABULARY.split())
_PUNCT = (".", ",", ".", "?", "!", ":", ";")


def _text(rng: random.Random, n_words: int, *, newlines: bool = True) -> str:
    out: list[str] = []
    for i in range(n_words):
        word = rng.choice(_WORDS)
        out.append(word)
        if i and rng.random() < 0.08:
            out[-1] += rng.choice(_PUNCT)
            if newlines and rng.random() < 0.15:
                out[-1] += "\n"
    text = " ".join(out).replace("\n ", "\n")
    return text[0].upper() + text[1:] + "."


def _text_of_size(rng: random.Random, n_bytes: int) -> str:
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        paragraph = _text(rng, rng.randint(40, 120))
        parts.append(paragraph)
        size += len(paragraph.encode()) + 2
    return "\n\n".join(parts)[:n_bytes]


def _completion_id(rng: random.Random) -> str:
    return "chatcmpl-" + "".join(rng.choice("0123456789abcdef") for _ in range(24))


_MODELS = ("demo-model", "gpt-4o-mini", "claude-3-5-sonnet-20241022", "llama-3.1-70b-instruct")


def _sampling(rng: random.Random, req: pb.ChatRequest) -> None:
    if rng.random() < 0.7:
        req.temperature = rng.choice((0.0, 0.2, 0.7, 1.0))
    if rng.random() < 0.6:
        req.max_tokens = rng.choice((64, 256, 512, 1024, 4096))
    if rng.random() < 0.1:
        req.user = f"user-{rng.randint(1000, 99999)}"


def short_requests(rng: random.Random, n: int) -> list[pb.ChatRequest]:
    out = []
    for _ in range(n):
        req = pb.ChatRequest(
            model=rng.choice(_MODELS),
            messages=[
                pb.ChatMessage(role=pb.ROLE_USER, content=_text(rng, rng.randint(4, 30), newlines=False))
            ],
        )
        _sampling(rng, req)
        out.append(req)
    return out


def multi_turn_requests(rng: random.Random, n: int) -> list[pb.ChatRequest]:
    out = []
    for _ in range(n):
        messages = [pb.ChatMessage(role=pb.ROLE_SYSTEM, content=_text(rng, rng.randint(20, 60)))]
        for turn in range(rng.randint(3, 8)):
            role = pb.ROLE_USER if turn % 2 == 0 else pb.ROLE_ASSISTANT
            messages.append(pb.ChatMessage(role=role, content=_text(rng, rng.randint(10, 90))))
        if messages[-1].role != pb.ROLE_USER:
            messages.append(pb.ChatMessage(role=pb.ROLE_USER, content=_text(rng, rng.randint(5, 30))))
        req = pb.ChatRequest(model=rng.choice(_MODELS), messages=messages)
        _sampling(rng, req)
        out.append(req)
    return out


def long_context_requests(rng: random.Random, n: int) -> list[pb.ChatRequest]:
    out = []
    for _ in range(n):
        document = _text_of_size(rng, rng.randint(7_500, 8_500))
        messages = [
            pb.ChatMessage(role=pb.ROLE_SYSTEM, content="You answer questions about the document below.\n\n"),
            pb.ChatMessage(role=pb.ROLE_USER, content=document + "\n\nQuestion: " + _text(rng, 15)),
        ]
        req = pb.ChatRequest(model=rng.choice(_MODELS), messages=messages)
        _sampling(rng, req)
        out.append(req)
    return out


def responses(rng: random.Random, n: int) -> list[pb.ChatResponse]:
    out = []
    for i in range(n):
        words = rng.randint(20, 300)
        prompt = rng.randint(10, 2500)
        completion = int(words * 1.3)
        out.append(
            pb.ChatResponse(
                id=_completion_id(rng),
                model=rng.choice(_MODELS),
                content=_text(rng, words),
                finish_reason=pb.FINISH_REASON_STOP if rng.random() < 0.9 else pb.FINISH_REASON_LENGTH,
                usage=pb.Usage(
                    prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
                ),
                created=CREATED + i,
            )
        )
    return out


def token_chunks(rng: random.Random, replies: int, tokens: int) -> tuple[list[pb.ChatChunk], list[bool]]:
    """Single-token delta chunks of ``replies`` streams; the flags mark each stream's first chunk."""
    chunks: list[pb.ChatChunk] = []
    first: list[bool] = []
    for r in range(replies):
        cid, model = _completion_id(rng), rng.choice(_MODELS)
        for t in range(tokens):
            word = rng.choice(_WORDS)
            if rng.random() < 0.3:  # tokens are often word pieces
                word = word[: max(1, len(word) // 2)]
            chunks.append(pb.ChatChunk(id=cid, model=model, delta=" " + word, created=CREATED + r))
            first.append(t == 0)
    return chunks, first


def final_chunks(rng: random.Random, n: int) -> list[pb.ChatChunk]:
    out = []
    for i in range(n):
        prompt, completion = rng.randint(10, 2500), rng.randint(1, 1000)
        out.append(
            pb.ChatChunk(
                id=_completion_id(rng),
                model=rng.choice(_MODELS),
                finish_reason=pb.FINISH_REASON_STOP,
                usage=pb.Usage(
                    prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
                ),
                created=CREATED + i,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------


def _read_request(req: Any) -> None:
    req.model  # noqa: B018 -- touching the field is the point
    for m in req.messages:
        m.role  # noqa: B018
        m.content  # noqa: B018
    req.temperature  # noqa: B018
    req.max_tokens  # noqa: B018


def _read_response(resp: Any) -> None:
    resp.id  # noqa: B018
    resp.model  # noqa: B018
    resp.content  # noqa: B018
    resp.finish_reason  # noqa: B018
    resp.usage.total_tokens  # noqa: B018


def _read_chunk(chunk: Any) -> None:
    chunk.id  # noqa: B018
    chunk.model  # noqa: B018
    chunk.delta  # noqa: B018
    chunk.finish_reason  # noqa: B018
    if chunk.HasField("usage"):
        chunk.usage.total_tokens  # noqa: B018


def _request_from_json(body: Any) -> pb.ChatRequest:
    return openai_chat.request_from_json(body)[0]


def _simple_response_from_json(body: Any) -> pb.ChatResponse:
    """The reply as a gRPC client of the simple fields reads it (the corpus's protobuf side)."""
    full = openai_chat.response_from_json(body)
    return pb.ChatResponse(
        id=full.id,
        model=full.model,
        content=full.content,
        finish_reason=full.finish_reason,
        usage=full.usage,
        created=full.created,
    )


def _simple_chunk_from_json(body: Any) -> pb.ChatChunk:
    """The chunk in StreamingChat's simple layout (the corpus's protobuf side), as the gateway turns an
    OpenAI chunk into it."""
    full = openai_chat.chunk_from_json(body)
    chunk = pb.ChatChunk(id=full.id, model=full.model, created=full.created)
    for choice in full.choices:
        chunk.delta += choice.delta.content
        if choice.HasField("finish_reason"):
            chunk.finish_reason = FINISH_BY_NAME[choice.finish_reason]
    if full.HasField("usage"):
        chunk.usage.CopyFrom(full.usage)
    return chunk


@dataclass
class Category:
    name: str
    messages: Sequence[Any]  # protobuf messages
    bodies: list[dict[str, Any]]  # the OpenAI JSON of each
    to_json: Callable[[Any, int], dict[str, Any]]  # (message, index) -> JSON body, as the proxy builds it
    from_json: Callable[[Any], Any]  # JSON body -> protobuf message, as the proxy parses it
    read_fields: Callable[[Any], None]
    parse: Callable[[bytes], Any] = field(init=False)

    def __post_init__(self) -> None:
        self.parse = type(self.messages[0]).FromString


def build_corpus() -> list[Category]:
    rng = random.Random(SEED)
    cats: list[Category] = []

    def add_requests(name: str, reqs: list[pb.ChatRequest]) -> None:
        cats.append(
            Category(
                name,
                reqs,
                [openai_chat.request_to_json(r) for r in reqs],
                lambda m, _i: openai_chat.request_to_json(m),
                _request_from_json,
                _read_request,
            )
        )

    add_requests("request: short single-turn", short_requests(rng, 200))
    add_requests("request: multi-turn + system prompt", multi_turn_requests(rng, 100))
    add_requests("request: long context (~8 KB)", long_context_requests(rng, 20))
    resps = responses(rng, 100)
    cats.append(
        Category(
            "response: complete",
            resps,
            [openai_chat.response_to_json(r) for r in resps],
            lambda m, _i: openai_chat.response_to_json(m),
            _simple_response_from_json,
            _read_response,
        )
    )
    chunks, first = token_chunks(rng, replies=10, tokens=100)
    cats.append(
        Category(
            "stream chunk: single-token delta",
            chunks,
            [openai_chat.chunk_to_json(c, first=f) for c, f in zip(chunks, first, strict=True)],
            lambda m, i: openai_chat.chunk_to_json(m, first=first[i]),
            _simple_chunk_from_json,
            _read_chunk,
        )
    )
    finals = final_chunks(rng, 100)
    cats.append(
        Category(
            "stream chunk: final with usage",
            finals,
            [openai_chat.chunk_to_json(c, first=False) for c in finals],
            lambda m, _i: openai_chat.chunk_to_json(m, first=False),
            _simple_chunk_from_json,
            _read_chunk,
        )
    )
    return cats


# ---------------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    repeats: int  # timed runs per measurement; the median is reported
    ops_per_run: int  # message operations per timed run (whole passes over the category, at least one)


Op = tuple[Sequence[Any], Callable[[Any], Any]]  # (items, operation applied to each item)


def _run_once(items: Sequence[Any], op: Callable[[Any], Any], passes: int) -> float:
    """Nanoseconds per item of one timed run of ``passes`` passes over ``items``, the GC paused."""
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(passes):
            for item in items:
                op(item)
        elapsed = time.perf_counter_ns() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / (passes * len(items))


def time_interleaved(ops: dict[str, Op], settings: Settings) -> dict[str, float]:
    """Median nanoseconds per message of each operation.

    The operations take turns within every repetition, so that a burst of load from elsewhere on the
    machine hits all of them alike rather than skewing one codec's numbers.
    """
    samples: dict[str, list[float]] = {key: [] for key in ops}
    for _ in range(settings.repeats):
        for key, (items, op) in ops.items():
            samples[key].append(_run_once(items, op, max(1, settings.ops_per_run // len(items))))
    return {key: statistics.median(values) for key, values in samples.items()}


def _json_dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _gzip_total(blobs: Sequence[bytes]) -> int:
    return sum(len(gzip.compress(b, compresslevel=6, mtime=0)) for b in blobs)


@dataclass
class Row:
    codec: str
    size: int | None  # None: the bytes of the row named in ``same_as``
    gz: int | None
    encode_ns: float | None
    decode_ns: float | None
    same_as: str = ""


def measure(cat: Category, settings: Settings) -> list[Row]:
    msgs = cat.messages
    proto_blobs = [m.SerializeToString() for m in msgs]
    orjson_blobs = [orjson.dumps(b) for b in cat.bodies]
    json_blobs = [_json_dumps(b) for b in cat.bodies]
    # Sanity: the JSON decodes back to the same protobuf messages the corpus holds.
    for blob, msg in zip(orjson_blobs[:5], msgs[:5], strict=False):
        assert cat.from_json(orjson.loads(blob)) == msg, cat.name
    parse = cat.parse
    to_json, from_json = cat.to_json, cat.from_json

    def read_proto(blob: bytes) -> None:
        cat.read_fields(parse(blob))

    def encode_mapped(i: int) -> bytes:
        return orjson.dumps(to_json(msgs[i], i))

    def decode_mapped(blob: bytes) -> Any:
        return from_json(orjson.loads(blob))

    t = time_interleaved(
        {
            "protobuf encode": (msgs, lambda m: m.SerializeToString()),
            "protobuf decode": (proto_blobs, parse),
            "protobuf + field reads decode": (proto_blobs, read_proto),
            "orjson encode": (cat.bodies, orjson.dumps),
            "orjson decode": (orjson_blobs, orjson.loads),
            "orjson + mapping encode": (range(len(msgs)), encode_mapped),
            "orjson + mapping decode": (orjson_blobs, decode_mapped),
            "json (stdlib) encode": (cat.bodies, _json_dumps),
            "json (stdlib) decode": (json_blobs, json.loads),
        },
        settings,
    )
    sizes = {
        "protobuf": (sum(map(len, proto_blobs)), _gzip_total(proto_blobs)),
        "orjson": (sum(map(len, orjson_blobs)), _gzip_total(orjson_blobs)),
        "json (stdlib)": (sum(map(len, json_blobs)), _gzip_total(json_blobs)),
    }
    same_as = {"protobuf + field reads": "protobuf", "orjson + mapping": "orjson"}
    rows = []
    for codec in ("protobuf", "protobuf + field reads", "orjson", "orjson + mapping", "json (stdlib)"):
        size, gz = sizes.get(codec, (None, None))
        rows.append(
            Row(codec, size, gz, t.get(f"{codec} encode"), t[f"{codec} decode"], same_as.get(codec, ""))
        )
    return rows


def _us(ns: float | None) -> str:
    return "—" if ns is None else f"{ns / 1000:.2f}"


def _bytes(row: Row) -> str:
    return f"(as {row.same_as})" if row.size is None else f"{row.size:,}"


def _pct(n: int | None, of: int) -> str:
    return "" if n is None else f"{100 * n / of:.0f}%"


def category_table(cat: Category, rows: list[Row]) -> str:
    json_size = next(r.size for r in rows if r.codec == "orjson")
    json_gz = next(r.gz for r in rows if r.codec == "orjson")
    assert json_size is not None and json_gz is not None
    lines = [
        f"### {cat.name} ({len(cat.messages)} messages, {json_size / len(cat.messages):,.0f} B of JSON each)",
        "",
        "| codec | total bytes | % of JSON | gzip bytes | gzip % of JSON gzip "
        "| encode µs/msg | decode µs/msg |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.codec} | {_bytes(r)} | {_pct(r.size, json_size)} | "
            f"{'' if r.gz is None else f'{r.gz:,}'} | {_pct(r.gz, json_gz)} | "
            f"{_us(r.encode_ns)} | {_us(r.decode_ns)} |"
        )
    return "\n".join(lines)


def summary_table(results: list[tuple[Category, list[Row]]]) -> str:
    lines = [
        "| category | messages | JSON bytes | protobuf bytes | protobuf % of JSON | JSON gzip "
        "| protobuf gzip | encode speed-up | decode speed-up |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cat, rows in results:
        by = {r.codec: r for r in rows}
        pj, po, om = by["orjson"], by["protobuf"], by["orjson + mapping"]
        assert pj.size and po.size is not None and pj.gz and po.gz is not None
        assert om.decode_ns and om.encode_ns and po.encode_ns and by["protobuf + field reads"].decode_ns
        encode_speedup = om.encode_ns / po.encode_ns
        decode_speedup = om.decode_ns / by["protobuf + field reads"].decode_ns
        lines.append(
            f"| {cat.name} | {len(cat.messages)} | {pj.size:,} | {po.size:,} | {_pct(po.size, pj.size)} | "
            f"{pj.gz:,} | {po.gz:,} | {encode_speedup:.1f}x | {decode_speedup:.1f}x |"
        )
    return "\n".join(lines)


def _gzip_flushed(pieces: Sequence[bytes]) -> int:
    """Bytes of one gzip stream flushed after every piece, as a streaming HTTP response must be."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    size = sum(len(z.compress(p)) + len(z.flush(zlib.Z_SYNC_FLUSH)) for p in pieces)
    return size + len(z.flush())


def stream_wire_table(rng_seed: int = SEED + 1) -> str:
    """One reply of 200 single-token chunks plus the final chunk, as SSE events vs gRPC messages."""
    rng = random.Random(rng_seed)
    chunks, first = token_chunks(rng, replies=1, tokens=200)
    final = final_chunks(rng, 1)[0]
    final.id, final.model, final.created = chunks[0].id, chunks[0].model, chunks[0].created
    chunks.append(final)
    first.append(False)
    sse_events = [
        b"data: " + orjson.dumps(openai_chat.chunk_to_json(c, first=f)) + b"\n\n"
        for c, f in zip(chunks, first, strict=True)
    ] + [b"data: [DONE]\n\n"]
    grpc_messages = [c.SerializeToString() for c in chunks]
    grpc_frames = [b"\x00" + len(m).to_bytes(4, "big") + m for m in grpc_messages]
    sse, grpc_wire = b"".join(sse_events), b"".join(grpc_frames)
    sse_flushed = _gzip_flushed(sse_events)
    grpc_per_message = _gzip_total(grpc_messages) + 5 * len(grpc_messages)
    sse_whole, grpc_whole = len(gzip.compress(sse, mtime=0)), len(gzip.compress(grpc_wire, mtime=0))
    lines = [
        f"### one streamed reply on the wire ({len(chunks) - 1} token chunks + final chunk)",
        "",
        "| transport | bytes | % of SSE | compressed as the transport would | gzip of the whole stream |",
        "|---|--:|--:|--:|--:|",
        f"| SSE (REST: `data:` events + `[DONE]`) | {len(sse):,} | 100% | "
        f"{sse_flushed:,} (gzip body, flushed per event) | {sse_whole:,} |",
        f"| gRPC (5-byte prefix per message) | {len(grpc_wire):,} | {_pct(len(grpc_wire), len(sse))} | "
        f"{grpc_per_message:,} (grpc-encoding gzip, per message) | {grpc_whole:,} |",
        "",
        "HTTP/2 adds 9 bytes of frame header per DATA frame to both. The last column is a lower bound no "
        "streaming transport reaches (it needs the whole reply before sending anything).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repetitions: a smoke run of a few seconds")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (median reported)")
    args = parser.parse_args(argv)
    settings = Settings(repeats=3, ops_per_run=200) if args.quick else Settings(repeats=25, ops_per_run=1500)
    if args.repeats:
        settings.repeats = args.repeats

    started = time.perf_counter()
    corpus = build_corpus()
    results = [(cat, measure(cat, settings)) for cat in corpus]
    print("# Payload benchmark: protobuf vs OpenAI JSON\n")
    print(
        f"Python {platform.python_version()} ({platform.machine()}), protobuf {protobuf_version} "
        f"({api_implementation.Type()} backend), orjson {orjson.__version__}; "
        f"{'quick run' if args.quick else 'full run'}: median of {settings.repeats} runs of "
        f"≥{settings.ops_per_run} message operations. Corpus seed {SEED} (identical on every run).\n"
    )
    print("## Summary\n")
    print(summary_table(results))
    print()
    print(
        "Speed-ups compare what the proxy really does on each path. Encode: `SerializeToString` vs "
        "`openai_chat.*_to_json` + `orjson.dumps`. Decode: `FromString` + reading every field vs "
        "`orjson.loads` + building the protobuf message with `openai_chat.*_from_json`. JSON sizes are "
        "orjson's compact output (stdlib json with compact separators and `ensure_ascii=False` gives the "
        "same bytes); gzip compresses each message on its own.\n"
    )
    for cat, rows in results:
        print(category_table(cat, rows))
        print()
    print(stream_wire_table())
    print(f"\n_Ran in {time.perf_counter() - started:.1f} s._")
    return 0


if __name__ == "__main__":
    sys.exit(main())
