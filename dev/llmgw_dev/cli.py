"""The development package's subcommands of ``llmgw`` (entry points of the ``llmgw.commands`` group).

They exist only where ``llmgw_dev`` is installed (the ``[dev]`` extra, the README's commands), never in an
image.
"""

from __future__ import annotations

import argparse

from llmgw import grpc_env

grpc_env.apply()  # the fakes and the demos use grpcio: before anything imports grpc

SubParsers = argparse._SubParsersAction


def _run_fake_provider(args: argparse.Namespace) -> int:
    from llmgw_dev.fakes.options import run

    return run(args)


def register_fake_provider(sub: SubParsers) -> None:
    from llmgw_dev.fakes.options import configure_parser  # imports neither grpc nor aiohttp

    parser = sub.add_parser("fake-provider", help="run a fake LLM provider on a loopback address")
    configure_parser(parser)
    parser.set_defaults(run=_run_fake_provider)


def _run_demo(args: argparse.Namespace) -> int:
    if args.proxy_only:
        from llmgw_dev import proxy_demo

        return proxy_demo.run(args.config, args.requests)
    from llmgw_dev import demo

    return demo.run(args.fail_grpc_at)


def register_demo(sub: SubParsers) -> None:
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
    demo.set_defaults(run=_run_demo)


def _run_cluster(args: argparse.Namespace) -> int:
    from llmgw_dev import cluster

    return cluster.run(args.action)


def register_cluster(sub: SubParsers) -> None:
    cluster = sub.add_parser("cluster", help="run a local Kubernetes control plane (state in ./.llmgw)")
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("up", help="start etcd, kube-apiserver and kube-controller-manager in the background")
    actions.add_parser("down", help="stop them and delete their data")
    actions.add_parser("status", help="say whether the control plane runs (non-zero exit if not)")
    cluster.set_defaults(run=_run_cluster)
