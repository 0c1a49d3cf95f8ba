"""The operator's subcommands of ``llmgw`` (entry points of the ``llmgw.commands`` group)."""

from __future__ import annotations

import argparse
import sys

SubParsers = argparse._SubParsersAction


def _run_operator(args: argparse.Namespace) -> int:
    from llmgw_operator import main as operator_main
    from llmgw_operator.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"llmgw operator: {exc}", file=sys.stderr)
        return 2
    return operator_main.run(settings)


def register_operator(sub: SubParsers) -> None:
    parser = sub.add_parser(
        "operator",
        help="run the operator (kubeconfig from $KUBECONFIG or the pod's service account)",
        description="Run the operator. Settings come from LLMGW_* environment variables: "
        "LLMGW_NAMESPACES, LLMGW_PROXY_IMAGE, LLMGW_LOG_LEVEL, LLMGW_RESYNC_SECONDS, LLMGW_MIGRATION_TICK_SECONDS, "
        "LLMGW_HEALTH_LISTEN, LLMGW_WATCHDOG_SECONDS, LLMGW_PROMETHEUS_URL "
        "(see the README).",
    )
    parser.set_defaults(run=_run_operator)


def _run_status(args: argparse.Namespace) -> int:
    from llmgw_operator import status_view

    return status_view.run(args.name, args.namespace, args.watch, until_done=args.until_done)


def register_status(sub: SubParsers) -> None:
    status = sub.add_parser("status", help="show an LLMGateway's rollout; --watch keeps it live")
    status.add_argument("name", help="the LLMGateway's name")
    status.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    status.add_argument("-w", "--watch", action="store_true", help="redraw as it changes, until Ctrl-C")
    status.add_argument(
        "--until-done", action="store_true", help="with --watch: stop when the migration ends"
    )
    status.set_defaults(run=_run_status)
