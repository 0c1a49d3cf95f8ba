"""The proxy's subcommand of ``llmgw`` (an entry point of the ``llmgw.commands`` group)."""

from __future__ import annotations

import argparse

SubParsers = argparse._SubParsersAction


def _run_proxy(args: argparse.Namespace) -> int:
    from llmgw import redact, server

    redact.install_log_filter()  # configured keys and credential headers never reach the log
    return server.run(args.config)


def register_proxy(sub: SubParsers) -> None:
    proxy = sub.add_parser("proxy", help="run the gRPC+REST LLM proxy from a configuration file")
    proxy.add_argument("--config", required=True, metavar="FILE", help="the proxy's YAML configuration")
    proxy.set_defaults(run=_run_proxy)
