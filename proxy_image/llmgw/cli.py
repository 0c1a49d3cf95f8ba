"""``llmgw``: the project's one command.

Subcommands:
  proxy          run the gRPC+REST LLM proxy from a configuration file
  fake-provider  run a fake LLM provider (openai, anthropic or grpc) for tests, demos and benchmarks
  demo           run a local demo: fake providers, the proxy and a bounded load, then a summary
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import demo, fake_provider, server


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgw", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--log-level",
        default=os.environ.get("LLMGW_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env LLMGW_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    proxy = sub.add_parser("proxy", help="run the LLM proxy")
    proxy.add_argument("--config", required=True, metavar="FILE", help="the proxy's YAML configuration")

    fake = sub.add_parser("fake-provider", help="run a fake LLM provider on a loopback address")
    fake_provider.configure_parser(fake)

    demo = sub.add_parser("demo", help="run the local demo (fake providers + proxy + bounded load)")
    demo.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="proxy configuration (default: the embedded examples/proxy/local.yaml)",
    )
    demo.add_argument("--requests", type=int, default=200, help="requests to send per front (default 200)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "proxy":
        return server.run(args.config)
    if args.command == "fake-provider":
        return fake_provider.run(args)
    return demo.run(args.config, args.requests)


if __name__ == "__main__":
    sys.exit(main())
