"""``llmgw``: the project's one command.

Subcommands:
  proxy          run the gRPC+REST LLM proxy from a configuration file
  fake-provider  run a fake LLM provider (openai, anthropic or grpc) for tests, demos and benchmarks
  demo           the local demo: control plane, operator, proxies and a live REST-to-gRPC rollout
  cluster        run a local Kubernetes control plane in the background (up, down, status)
  operator       run the Kubernetes operator that turns LLMGateway resources into proxies
  status         show one LLMGateway's rollout (phase, step, weight, analysis, events), optionally live
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import grpc_env

grpc_env.apply()  # before the modules below import grpc

from . import demo, fake_provider, server  # noqa: E402


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

    demo = sub.add_parser(
        "demo",
        help="the local demo: a control plane, the operator, proxies, fake providers, a live REST-to-gRPC rollout",
    )
    demo.add_argument(
        "--fail-grpc-at",
        type=int,
        default=None,
        metavar="WEIGHT",
        help="make the gRPC provider fail once the rollout reaches this weight (10, 25, 50 or 100): a rollback",
    )
    demo.add_argument(
        "--proxy-only",
        action="store_true",
        help="only the proxy and fake providers (no Kubernetes): REST and gRPC fronts, a stream, a load",
    )
    demo.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="--proxy-only: proxy configuration (default: the embedded examples/proxy/local.yaml)",
    )
    demo.add_argument(
        "--requests", type=int, default=200, help="--proxy-only: requests per front (default 200)"
    )

    sub.add_parser(
        "operator",
        help="run the operator (kubeconfig from $KUBECONFIG or the pod's service account)",
        description="Run the operator. Settings come from LLMGW_* environment variables: "
        "LLMGW_NAMESPACES, LLMGW_PROXY_IMAGE, LLMGW_RESYNC_SECONDS, LLMGW_HEALTH_LISTEN, LLMGW_PROMETHEUS_URL "
        "(see the README).",
    )

    status = sub.add_parser("status", help="show an LLMGateway's rollout; --watch keeps it live")
    status.add_argument("name", help="the LLMGateway's name")
    status.add_argument("-n", "--namespace", default=None, help="its namespace (default: the kubeconfig's)")
    status.add_argument("-w", "--watch", action="store_true", help="redraw as it changes, until Ctrl-C")
    status.add_argument(
        "--until-done", action="store_true", help="with --watch: stop when the migration ends"
    )

    cluster = sub.add_parser("cluster", help="run a local Kubernetes control plane (state in ./.llmgw)")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("up", help="start etcd, kube-apiserver and kube-controller-manager in the background")
    actions.add_parser("down", help="stop them and delete their data")
    actions.add_parser("status", help="say whether the control plane runs (non-zero exit if not)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "proxy":
        return server.run(args.config)
    if args.command == "fake-provider":
        return fake_provider.run(args)
    if args.command == "operator":
        from llmgw_operator import main as operator_main
        from llmgw_operator.settings import Settings, SettingsError

        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            print(f"llmgw operator: {exc}", file=sys.stderr)
            return 2
        return operator_main.run(settings)
    if args.command == "status":
        from llmgw_operator import status_view

        return status_view.run(args.name, args.namespace, args.watch, until_done=args.until_done)
    if args.command == "cluster":
        # The operator package is not installed in the proxy image: import it only for this command.
        from llmgw_operator import cluster

        return cluster.run(args.action)
    if args.proxy_only:
        return demo.run(args.config, args.requests)
    from llmgw_operator import kube_demo

    return kube_demo.run(args.fail_grpc_at)


if __name__ == "__main__":
    sys.exit(main())
