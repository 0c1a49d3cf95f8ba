"""The operator keeps serving every gateway whatever the others are: hundreds of them at startup (more than
any worker limit, with a gateway created meanwhile served first), and gateways whose pass fails (a bad
Prometheus URL, an unusable bearer token, a hand-edited ConfigMap). Against the real API server, the
operator as a process (see ``test_operator``)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from k8s import Kubectl
from test_operator import Operator, condition, events, gateway, get, operator, secret, wait_for

from llmgw_operator.reconcile import GatewayProblem, Reconciler
from llmgw_operator.settings import Settings

__all__ = ["operator"]  # the fixture, used by name

# Gateways found by a restarted operator. 300 converge in 50-80 s on a loaded 2-core machine that also runs
# the API server, etcd and the controllers (the whole test: 60-95 s); see the test's docstring.
RESTART_GATEWAYS = 300


def gateways(kubectl: Kubectl, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kubectl.json("get", "llmgw", "-n", namespace)["items"]
    return items


def converged(item: dict[str, Any]) -> bool:
    status = item.get("status") or {}
    return status.get("observedGeneration") == item["metadata"]["generation"] and (
        condition(status, "ConfigValid").get("status") == "True"
    )


def test_restart_with_hundreds_of_gateways(operator: Operator, kubectl: Kubectl, namespace: str) -> None:
    """A restart with 300 gateways (more than kopf's old worker limit of 64): every one converges, each is
    handled once, and a gateway created right after gets its Deployment within seconds.

    This once took 198 s, and a gateway created after the restart waited 20-60 s for its Deployment: every
    gateway's pass ran at once, each turn of the event loop ran hundreds of callbacks, and kopf's readers of
    the watch streams fell tens of seconds behind; kopf's wait for the event of its own annotation write
    (5 s) ran out and it handled every gateway a second time as a new creation, and the new gateway's event
    waited in the lagging stream. Passes now take one of 16 slots, by priority (a created gateway first)."""
    operator.stop()
    operator.env["LLMGW_LOG_LEVEL"] = "info"  # kopf's debug lines carry whole objects: 300 of them, often
    kubectl.apply(secret(), namespace)
    many = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [gateway(f"gw-{i:03d}", replicas=0) for i in range(RESTART_GATEWAYS)],
    }
    kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=json.dumps(many), timeout=60)
    started = time.monotonic()
    operator.start()
    wait_for(
        f"all {RESTART_GATEWAYS} gateways to converge",
        lambda: sum(map(converged, gateways(kubectl, namespace))) == RESTART_GATEWAYS,
        timeout=150,
        operator=operator,
    )
    print(f"{RESTART_GATEWAYS} gateways converged {time.monotonic() - started:.1f}s after the start")
    created = time.monotonic()
    kubectl.apply(gateway("late", replicas=0), namespace)
    wait_for(
        "the Deployment of a gateway created after the restart",
        lambda: get(kubectl, namespace, "deployment", "late-proxy"),
        timeout=15,
        operator=operator,
    )
    print(f"a new gateway got its Deployment in {time.monotonic() - created:.1f}s")
    log = operator.log()
    handled = log.count("Creation is processed")
    print(f"{handled} gateways handled as created")
    assert handled <= (RESTART_GATEWAYS + 1) * 1.05, "gateways handled twice: kopf's watch lagged behind"
    assert "Traceback" not in log


def migrating(name: str, prometheus: dict[str, Any]) -> dict[str, Any]:
    return gateway(
        name, replicas=0, migration={"steps": [50, 100], "interval": "1m", "prometheus": prometheus}
    )


def degraded_reason(kubectl: Kubectl, namespace: str, name: str) -> str | None:
    status = (get(kubectl, namespace, "llmgw", name) or {}).get("status") or {}
    cond = condition(status, "Degraded")
    return cond.get("reason") if cond.get("status") == "True" else None


def config_text(kubectl: Kubectl, namespace: str, name: str) -> str:
    return str(
        ((get(kubectl, namespace, "configmap", f"{name}-config") or {}).get("data") or {}).get(
            "config.yaml", ""
        )
    )


def test_a_failing_gateway_does_not_stop_the_others(
    operator: Operator, kubectl: Kubectl, namespace: str
) -> None:
    operator.stop()
    operator.env["LLMGW_RESYNC_SECONDS"] = "2"
    operator.env["LLMGW_MIGRATION_TICK_SECONDS"] = "1"
    operator.start()
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway("ok", replicas=0), namespace)
    kubectl.apply(gateway("badgen", replicas=0), namespace)
    wait_for(
        "the healthy gateway's ConfigMap", lambda: config_text(kubectl, namespace, "ok"), operator=operator
    )
    wait_for("badgen's ConfigMap", lambda: config_text(kubectl, namespace, "badgen"), operator=operator)

    non_utf8 = {**secret("prom-token"), "data": {"token": base64.b64encode(b"\xff\xfe token").decode()}}
    kubectl.apply(non_utf8, namespace)
    kubectl.apply(secret("good-token", value="abc123", key="token"), namespace)
    kubectl.apply(migrating("badurl", {"url": "http://[::1"}), namespace)
    kubectl.apply(
        migrating("badtoken", {"url": "http://127.0.0.1:9", "bearerTokenSecretRef": {"name": "prom-token"}}),
        namespace,
    )
    # The CRD refuses user:password@ in the URL; an older CRD did not (see the in-process test below).
    refused = kubectl(
        "apply", "-n", namespace, "-f", "-", check=False,
        input=json.dumps(migrating("userinfo", {"url": "http://u:p@127.0.0.1:9", "bearerTokenSecretRef": {"name": "good-token"}})),
    )  # fmt: skip
    assert refused.returncode != 0 and "user:password@" in refused.stderr, refused.stderr
    # A hand edit that makes the ConfigMap unreadable as a generation.
    edited = config_text(kubectl, namespace, "badgen").replace("generation: 1", "generation: abc")
    assert "generation: abc" in edited
    kubectl("patch", "-n", namespace, "configmap", "badgen-config", "--type=merge",
            "-p", json.dumps({"data": {"config.yaml": edited}}))  # fmt: skip

    for name, reason in [("badurl", "InvalidPrometheusURL"), ("badtoken", "InvalidPrometheusToken")]:
        wait_for(
            f"{name} to report {reason}",
            lambda n=name, r=reason: degraded_reason(kubectl, namespace, n) == r,
            timeout=30,
            operator=operator,
        )
        warnings = [
            e for e in events(kubectl, namespace)
            if e["involvedObject"]["name"] == name and e["reason"] == reason and e["type"] == "Warning"
        ]  # fmt: skip
        assert warnings, f"no {reason} event for {name}"
    wait_for(
        "the drift check to repair badgen's ConfigMap",
        lambda: (
            "generation: abc" not in config_text(kubectl, namespace, "badgen")
            and "generation: 2" in config_text(kubectl, namespace, "badgen")
        ),
        timeout=30,
        operator=operator,
    )

    # The healthy gateway is still looked after, several ticks later: a hand edit is undone.
    time.sleep(3)
    original = config_text(kubectl, namespace, "ok")
    kubectl("patch", "-n", namespace, "configmap", "ok-config", "--type=merge",
            "-p", json.dumps({"data": {"config.yaml": "hand-edited: true\n"}}))  # fmt: skip
    wait_for(
        "the drift check to undo the edit of the healthy gateway's ConfigMap",
        lambda: (
            "hand-edited" not in config_text(kubectl, namespace, "ok")
            and "demo-model" in config_text(kubectl, namespace, "ok")
        ),
        timeout=30,
        operator=operator,
    )
    assert "demo-model" in original
    assert degraded_reason(kubectl, namespace, "ok") is None

    # Each problem is logged once (not at every tick), and never as a crash of the loop.
    log = operator.log()
    assert log.count("InvalidPrometheusURL") == 1, log[-3000:]
    assert log.count("InvalidPrometheusToken") == 1, log[-3000:]
    assert "periodic pass" not in log and "Traceback" not in log, log[-3000:]

    # Fixing the spec clears the condition.
    kubectl.apply(migrating("badurl", {"url": "http://127.0.0.1:9"}), namespace)
    wait_for(
        "badurl's Degraded condition to clear",
        lambda: degraded_reason(kubectl, namespace, "badurl") is None,
        timeout=30,
        operator=operator,
    )


class _Kube:
    """Just enough of :class:`llmgw_operator.kube.Kube` for :meth:`Reconciler._metrics_source`."""

    def __init__(self, secrets: dict[str, dict[str, Any]]) -> None:
        self.secrets = secrets

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.secrets.get(name)


@pytest.mark.parametrize(
    ("url", "token", "reason"),
    [
        ("http://[::1", None, "InvalidPrometheusURL"),
        ("http://user:pw@127.0.0.1:9", b"abc", "InvalidPrometheusURL"),
        ("http://127.0.0.1:9", b"\xff\xfe", "InvalidPrometheusToken"),
        ("http://127.0.0.1:9", b"two words", "InvalidPrometheusToken"),
    ],
)
async def test_metrics_source_problems_are_named(url: str, token: bytes | None, reason: str) -> None:
    data = {"token": base64.b64encode(token).decode()} if token is not None else {}
    reconciler = Reconciler(_Kube({"t": {"data": data}}), Settings())  # type: ignore[arg-type]
    plan = {"prometheus": {"url": url, **({"bearerTokenSecretRef": {"name": "t"}} if token else {})}}
    with pytest.raises(GatewayProblem) as raised:
        await reconciler._metrics_source("ns", plan)
    assert raised.value.reason == reason
    assert "pw" not in raised.value.message
    await reconciler.close()
