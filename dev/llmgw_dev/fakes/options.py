"""``llmgw fake-provider``: its options, the provider they describe, and the process that serves it.

``llmgw`` imports this module to register the subcommand, for ``--help`` too, so it imports neither grpc
nor aiohttp: the provider's modules are imported when :func:`provider_from_args` makes one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from typing import TYPE_CHECKING, Final

from llmgw_common.config import is_loopback
from llmgw_dev.fakes.faults import Faults
from llmgw_dev.fakes.kinds import KINDS

if TYPE_CHECKING:
    from llmgw_dev.fakes.server import FakeProvider

DEFAULT_LISTEN: Final = "127.0.0.1:18001"
# The Faults fields as options named "--" and the field's name: their metavar and help (type and default are
# the field's).
_FAULT_OPTIONS: Final = {
    "latency_ms": ("MS", "delay before answering"),
    "token_delay_ms": ("MS", "delay between streamed tokens"),
    "error_rate": ("P", "probability in [0, 1] that a request fails with --error-status"),
    "error_status": ("STATUS", "HTTP status of injected errors (mapped to a gRPC code for kind grpc)"),
    "fail_next": ("N", "fail the next N requests"),
    "rate_limit_every": ("N", "answer every Nth request with 429 / RESOURCE_EXHAUSTED"),
    "retry_after_s": ("SECONDS", "Retry-After seconds sent with rate limiting"),
    "stream_error_after_tokens": (
        "N",
        "break streams with a provider-native error after this many tokens (-1: never)",
    ),
    "stream_stall_after_tokens": (
        "N",
        "streams send nothing more after this many tokens, the connection held open (-1: never)",
    ),
}
_OPTION_NAMES: Final = {"retry_after_s": "--retry-after"}  # where the option is not named after the field


def _listen(value: str) -> tuple[str, int]:
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (for example {DEFAULT_LISTEN})")
    host = host.strip("[]")
    if not is_loopback(host):
        raise argparse.ArgumentTypeError(
            f"{host!r} is not a loopback address; the fake provider only listens on 127.0.0.1, ::1 or "
            "localhost"
        )
    return host, int(port_text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``fake-provider`` options to ``parser``."""
    parser.add_argument("--kind", required=True, choices=KINDS, help="the API to speak")
    parser.add_argument(
        "--listen",
        type=_listen,
        default=_listen(DEFAULT_LISTEN),
        metavar="HOST:PORT",
        help=f"loopback address to listen on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require the API key held in environment variable VAR (default: no auth)",
    )
    parser.add_argument(
        "--models", metavar="A,B", default="demo-model,demo-claude", help="comma-separated model names"
    )
    parser.add_argument(
        "--response-tokens", metavar="N", type=int, default=20, help="words per reply (default 20)"
    )
    parser.add_argument(
        "--control-port",
        metavar="PORT",
        type=int,
        default=None,
        help="gRPC kinds (grpc, vllm, sglang): serve the /_fake control API over HTTP on this port",
    )
    parser.add_argument(
        "--vision",
        action="store_true",
        help="kinds vllm, trtllm, vllm-http: a vision model, which takes images (data: URLs)",
    )
    defaults = Faults()
    faults = parser.add_argument_group("faults (changeable at runtime with PUT /_fake/faults)")
    for field, (metavar, text) in _FAULT_OPTIONS.items():
        option = _OPTION_NAMES.get(field) or "--" + field.replace("_", "-")
        default = getattr(defaults, field)
        faults.add_argument(
            option, metavar=metavar, dest=field, type=type(default), default=default, help=text
        )


def provider_from_args(args: argparse.Namespace) -> FakeProvider:
    """The (unstarted) provider that parsed ``configure_parser`` options describe; ValueError if invalid."""
    from llmgw_dev.fakes.server import FakeProvider

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set or empty")
    faults = Faults()
    faults.update({f.name: getattr(args, f.name) for f in dataclasses.fields(Faults)})
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    host, port = args.listen
    return FakeProvider(
        args.kind,
        host,
        port,
        api_key=api_key,
        models=models,
        faults=faults,
        response_tokens=args.response_tokens,
        control_port=args.control_port,
        vision=args.vision,
    )


async def _serve(provider: FakeProvider) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await provider.start()
    try:
        print(f"fake-provider kind={provider.kind} listening on {provider.target}", flush=True)
        await stop.wait()
    finally:
        await provider.stop()


def run(args: argparse.Namespace) -> int:
    """Run the provider with uvloop until SIGINT or SIGTERM; returns the process exit code."""
    import uvloop

    try:
        provider = provider_from_args(args)
    except ValueError as exc:
        print(f"fake-provider: {exc}", file=sys.stderr)
        return 2
    try:
        uvloop.run(_serve(provider))
    except OSError as exc:
        print(f"fake-provider: cannot listen on {provider.target}: {exc}", file=sys.stderr)
        return 1
    return 0
