"""What the operator watches and how it paces itself, against the real API server: hand edits of its children
undone at once (not at the next drift check), a gateway whose children the API server refuses retried with
exponential backoff, kopf's bookkeeping small whatever the size of the spec, and the liveness endpoint
failing when the operator is stuck. Pure parts (the slots, the backoff, the digest, the watchdog) in-process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kopf
import pytest
from k8s import Kubectl
from test_operator import Operator, condition, gateway, get, operator, operator_writes, secret, wait_for

from llmgw_dev.cluster import ControlPlane
from llmgw_operator import main
from llmgw_operator.handlers import (
    PERIODIC,
    ROUTINE,
    URGENT,
    Backoff,
    Children,
    DigestDiffBaseStorage,
    Passes,
    PassFailed,
    Slots,
    Watchdog,
    build_registry,
    fingerprint,
)
from llmgw_operator.kube import Kube
from llmgw_operator.reconcile import ApplyFailed
from llmgw_operator.settings import Settings, SettingsError

__all__ = ["operator"]  # the fixture, used by name


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())


def ready(kubectl: Kubectl, namespace: str, name: str) -> bool:
    status = (get(kubectl, namespace, "llmgw", name) or {}).get("status") or {}
    return bool(
        status.get("observedGeneration") == 1 and condition(status, "ConfigValid").get("status") == "True"
    )


def test_hand_edits_of_children_are_undone_at_once(
    operator: Operator, kubectl: Kubectl, namespace: str, control_plane: ControlPlane
) -> None:
    """With the drift check 300 s away, an edit of the ConfigMap (a provider pointed elsewhere), the Service's
    selector or the Deployment is put back within seconds; the operator's own writes cause no pass loop."""
    kubectl.apply(secret(), namespace)
    kubectl.apply(gateway(replicas=0), namespace)
    wait_for("the gateway's status", lambda: ready(kubectl, namespace, "gw"), operator=operator)
    original = get(kubectl, namespace, "configmap", "gw-config")
    assert original is not None and "127.0.0.1:18001" in original["data"]["config.yaml"]
    service = get(kubectl, namespace, "service", "gw")
    assert service is not None
    selector = service["spec"]["selector"]

    edits: list[tuple[str, list[str], Any]] = [
        (
            "the ConfigMap's provider URL",
            ["configmap", "gw-config", "--type=merge", "-p",
             json.dumps({"data": {"config.yaml": original["data"]["config.yaml"].replace("127.0.0.1:18001", "evil.example:80")}})],
            lambda: "127.0.0.1:18001" in (get(kubectl, namespace, "configmap", "gw-config") or {}).get("data", {}).get("config.yaml", ""),
        ),
        (
            "the Service's selector",
            ["service", "gw", "--type=merge", "-p", json.dumps({"spec": {"selector": {**selector, "app.kubernetes.io/instance": "other"}}})],
            lambda: (get(kubectl, namespace, "service", "gw") or {}).get("spec", {}).get("selector") == selector,
        ),
        (
            "the Deployment's container image",
            ["deployment", "gw-proxy", "--type=json", "-p",
             json.dumps([{"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "evil:latest"}])],
            lambda: (get(kubectl, namespace, "deployment", "gw-proxy") or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", [{}])[0].get("image") == "llmgw-proxy:test",
        ),
    ]  # fmt: skip
    for what, patch, repaired in edits:
        kubectl("patch", "-n", namespace, *patch)
        started = time.monotonic()
        wait_for(f"the operator to undo the edit of {what}", repaired, timeout=15, operator=operator)
        print(f"{what}: put back in {time.monotonic() - started:.1f}s")

    # The repairs' own writes come back as watch events; none of them starts a pass that writes again: once
    # the rollout's status has settled, 6 s go by without a write (a loop would write all the time).
    deadline = time.monotonic() + 30
    while True:
        window = now()
        time.sleep(6)
        if not (writes := operator_writes(control_plane, namespace, window)):
            break
        assert time.monotonic() < deadline, f"the operator keeps writing: {writes}"
    assert "Traceback" not in operator.log()


def test_refused_children_are_retried_with_backoff(
    operator: Operator, kubectl: Kubectl, namespace: str, control_plane: ControlPlane
) -> None:
    """A pod label the CRD lets through and the API server refuses on the Deployment: the gateway is
    Degraded, and its passes back off (10 s, 20 s, ...) instead of writing every 10 s, or at every drift
    check (here every second). Fixing the spec is acted on at once."""
    operator.stop()
    operator.env["LLMGW_RESYNC_SECONDS"] = "1"
    operator.env["LLMGW_MIGRATION_TICK_SECONDS"] = "1"
    operator.start()
    kubectl.apply(secret(), namespace)
    bad = gateway("refused", replicas=0)
    bad["spec"]["proxy"]["podLabels"] = {"team": "not a label value!"}
    started = now()
    kubectl.apply(bad, namespace)
    wait_for(
        "the gateway to report the refused Deployment",
        lambda: (
            condition(
                (get(kubectl, namespace, "llmgw", "refused") or {}).get("status") or {}, "Degraded"
            ).get("status")
            == "True"
        ),
        operator=operator,
    )
    time.sleep(13)
    attempts = [
        w for w in operator_writes(control_plane, namespace, started) if w.startswith("patch deployments/")
    ]
    # Passes at 0 and 10 s (the next would come at 30 s). Without the backoff: one at every drift check (here
    # every second) and kopf's retries every 10 s, over a dozen.
    print(f"{len(attempts)} attempts to write the refused Deployment in 15 s")
    assert 1 <= len(attempts) <= 3, attempts

    good = gateway("refused", replicas=0)
    good["spec"]["proxy"]["podLabels"] = {"team": "a-label-value"}
    kubectl.apply(good, namespace)
    wait_for(
        "the Deployment once the spec is fixed, without waiting for the backoff",
        lambda: get(kubectl, namespace, "deployment", "refused-proxy"),
        timeout=8,
        operator=operator,
    )
    assert "Traceback" not in operator.log()


def big_gateway(name: str) -> dict[str, Any]:
    """A valid gateway whose spec is over 400 KiB: 32 providers listing 64 models of 200 characters each."""
    body = gateway(name, replicas=0)
    body["spec"]["providers"] = [
        {
            "name": f"p{i:02d}",
            "openai": {"baseURL": f"http://127.0.0.1:{18100 + i}/v1"},
            "models": [f"model-{i:02d}-{j:02d}-" + "x" * 190 for j in range(64)],
        }
        for i in range(32)
    ]
    body["spec"]["routes"] = [{"model": "demo-model", "rest": "p00"}]
    return body


def test_large_spec_keeps_kopf_bookkeeping_small(
    operator: Operator, kubectl: Kubectl, namespace: str
) -> None:
    """kopf's last-handled-configuration used to hold the whole spec: over 256 KiB of annotations, a 422 at
    every pass, and every touch handled as a new creation. Now it is a digest: one pass per change."""
    body = big_gateway("big")
    assert len(json.dumps(body["spec"])) > 400 * 1024
    kubectl(
        "create", "-n", namespace, "-f", "-", input=json.dumps(body), timeout=60
    )  # no client-side apply copy
    wait_for(
        "the big gateway's status", lambda: ready(kubectl, namespace, "big"), timeout=60, operator=operator
    )
    stored = wait_for(
        "kopf's bookkeeping annotation",
        lambda: (
            (g := get(kubectl, namespace, "llmgw", "big"))
            and "kopf.llmgateway.io/last-handled-configuration" in g["metadata"].get("annotations", {})
            and g
        ),
        operator=operator,
    )
    kopf_annotations = {
        k: v for k, v in stored["metadata"].get("annotations", {}).items() if k.startswith("kopf.")
    }
    assert "kopf.llmgateway.io/last-handled-configuration" in kopf_annotations
    assert sum(len(k) + len(v) for k, v in kopf_annotations.items()) < 1024, kopf_annotations

    def passes() -> int:
        return operator.log().count("Handler 'build_registry.<locals>.gateway_changed' is invoked")

    time.sleep(2)
    before = passes()
    kubectl(
        "patch", "-n", namespace, "llmgw", "big", "--type=merge", "-p", '{"spec":{"proxy":{"replicas":1}}}'
    )
    wait_for(
        "the change to be handled",
        lambda: (
            ((get(kubectl, namespace, "llmgw", "big") or {}).get("status") or {}).get("observedGeneration")
            == 2
        ),
        timeout=30,
        operator=operator,
    )
    time.sleep(4)
    assert passes() == before + 1, operator.log()[-3000:]
    log = operator.log()
    # An API refusal shows as 422 "Unprocessable Entity" ("422" alone also matches a log line's milliseconds).
    for problem in ("Traceback", "Unprocessable", "Too long"):
        assert problem not in log, log[-3000:]


def test_digest_diffbase_storage() -> None:
    storage = DigestDiffBaseStorage(prefix="kopf.llmgateway.io", key="last-handled-configuration")
    body = kopf.Body(
        {"metadata": {"name": "gw", "annotations": {"a": "1"}}, "spec": {"x": 1}, "status": {"s": 1}}
    )
    essence = storage.build(body=body)
    assert set(essence) == {"digest"}
    assert storage.build(body=kopf.Body({**body, "status": {"s": 2}})) == essence  # status is no change
    progress = {
        "metadata": {"name": "gw", "annotations": {"a": "1", "kopf.llmgateway.io/gateway_changed": "{}"}}
    }
    assert storage.build(body=kopf.Body({**body, **progress})) == essence  # nor kopf's own progress
    assert storage.build(body=kopf.Body({**body, "spec": {"x": 2}})) != essence
    command = {"metadata": {"name": "gw", "annotations": {"a": "1", "llmgateway.io/promote": "1"}}}
    assert storage.build(body=kopf.Body({**body, **command})) != essence  # the migration's commands are
    patch = kopf.Patch()
    storage.store(body=body, patch=patch, essence=essence)
    stored = kopf.Body(
        {
            **body,
            "metadata": {**body["metadata"], "annotations": {"a": "1", **patch["metadata"]["annotations"]}},
        }
    )
    assert storage.fetch(body=stored) == essence
    assert storage.build(body=stored) == essence  # its own annotation is left out of the digest


async def test_slots_by_priority_then_arrival() -> None:
    slots = Slots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def take(name: str, priority: int) -> None:
        async with slots.hold(priority):
            order.append(name)
            if name == "first":
                await release.wait()

    first = asyncio.create_task(take("first", ROUTINE))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(take(n, p)) for n, p in [("periodic", PERIODIC), ("resume", ROUTINE), ("created", URGENT), ("edited", URGENT)]]  # fmt: skip
    cancelled = asyncio.create_task(take("cancelled", URGENT))
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    assert slots.waiting == 4
    release.set()
    await asyncio.gather(first, *tasks)
    assert order == ["first", "created", "edited", "resume", "periodic"]


def test_backoff_doubles_to_five_minutes() -> None:
    clock = [0.0]
    backoff = Backoff(clock=lambda: clock[0])
    delays = [backoff.failed("ns", "gw") for _ in range(8)]
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]
    assert backoff.waiting("ns", "gw") == 300 and not backoff.due("ns", "gw")
    clock[0] = 299.5
    assert backoff.waiting("ns", "gw") == pytest.approx(0.5)
    clock[0] = 300
    assert backoff.due("ns", "gw") and not backoff.due("ns", "other")
    assert backoff.waiting("ns", "other") == 0
    backoff.succeeded("ns", "gw")
    assert (
        backoff.waiting("ns", "gw") == 0 and not backoff.due("ns", "gw") and backoff.failed("ns", "gw") == 10
    )


async def test_children_tell_own_writes_from_edits() -> None:
    kube = Kube()
    children = Children(kube)
    cm = {"kind": "ConfigMap", "metadata": {"namespace": "ns", "name": "gw-config", "resourceVersion": "5"}, "data": {"a": "1"}}  # fmt: skip
    assert await children.changed(None, cm) is None  # the listing at startup
    kube._written[("ConfigMap", "ns", "gw-config")] = "6"
    ours = {**cm, "metadata": {**cm["metadata"], "resourceVersion": "6"}, "data": {"a": "2"}}
    assert await children.changed("MODIFIED", ours) is None  # the operator's own write
    edited = {**cm, "metadata": {**cm["metadata"], "resourceVersion": "7"}, "data": {"a": "3"}}
    assert await children.changed("MODIFIED", edited) == URGENT
    status_only = {**edited, "metadata": {**edited["metadata"], "resourceVersion": "8"}, "status": {"x": 1}}
    assert await children.changed("MODIFIED", status_only) is None
    assert await children.changed("DELETED", status_only) == URGENT
    deployment = {"kind": "Deployment", "metadata": {"namespace": "ns", "name": "gw-proxy", "resourceVersion": "1"}, "spec": {}, "status": {}}  # fmt: skip
    assert await children.changed(None, deployment) is None
    failing = {**deployment, "metadata": {**deployment["metadata"], "resourceVersion": "2"},
               "status": {"conditions": [{"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate"}]}}  # fmt: skip
    assert await children.changed("MODIFIED", failing) == ROUTINE
    assert fingerprint(failing) == fingerprint(deployment)


def test_watchdog() -> None:
    clock = [0.0]
    watchdog = Watchdog(10, clock=lambda: clock[0])
    assert watchdog.problems() == []
    clock[0] = 11
    assert "no progress" in watchdog.problems()[0]
    watchdog.beat()
    assert watchdog.problems() == []
    with pytest.raises(SettingsError, match="LLMGW_WATCHDOG_SECONDS"):
        Settings.from_env({"LLMGW_WATCHDOG_SECONDS": "2", "LLMGW_MIGRATION_TICK_SECONDS": "1"})
    assert Settings.from_env({}).watchdog_seconds == 120
    assert Settings.from_env({"LLMGW_MIGRATION_TICK_SECONDS": "60"}).watchdog_seconds == 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def probe(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def test_liveness_fails_when_the_operator_is_stuck(
    kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator in-process with kopf's liveness endpoint: 200 while the periodic loop ticks; a listing
    that hangs (injected) stops its progress and the endpoint answers 500; once it ends, 200 again."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    url = f"http://127.0.0.1:{free_port()}/healthz"
    settings = Settings(
        namespaces=(namespace,),
        migration_tick_seconds=0.3,
        watchdog_seconds=2,
        health_listen=url.removeprefix("http://").removesuffix("/healthz"),
    )
    hang = asyncio.Event()
    hang.set()
    list_gateways = Kube.list_gateways

    async def stuck_listing(self: Kube, namespace: str | None = None) -> list[dict[str, Any]]:
        await hang.wait()
        return await list_gateways(self, namespace)

    monkeypatch.setattr(Kube, "list_gateways", stuck_listing)
    operator_task = asyncio.create_task(main.serve(settings))

    async def status() -> int:
        return await asyncio.to_thread(probe, url)

    async def until(code: int, timeout: float) -> float:
        started = time.monotonic()
        while (got := await status()) != code:
            assert time.monotonic() - started < timeout, f"the endpoint answers {got}, not {code}"
            assert not operator_task.done(), operator_task
            await asyncio.sleep(0.3)
        return time.monotonic() - started

    try:
        await until(200, 30)
        hang.clear()  # the periodic loop now hangs in its listing
        took = await until(500, 20)  # kopf caches a probe's result for up to 10 s
        print(f"the liveness endpoint failed {took:.1f}s after the loop got stuck")
        hang.set()
        await until(200, 20)
    finally:
        operator_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await operator_task


class _Reconciler:
    """Just enough of :class:`Reconciler` for :class:`Passes`: counts passes, holds "a" until released."""

    def __init__(self) -> None:
        self.passes: list[str] = []
        self.release = asyncio.Event()
        self.refuse = False
        self.kube = None

    async def sync(self, namespace: str, name: str) -> None:
        self.passes.append(name)
        if name == "a":
            await self.release.wait()
        if self.refuse:
            raise ApplyFailed(f"{namespace}/{name}: Invalid: refused")


async def test_passes_share_a_queued_pass_and_skip_routine_triggers_in_backoff() -> None:
    reconciler = _Reconciler()
    passes = Passes(reconciler, slots=1)  # type: ignore[arg-type]
    holder = asyncio.create_task(passes.run("ns", "a"))
    await asyncio.sleep(0)
    triggers = [asyncio.create_task(passes.run("ns", "b", p)) for p in (ROUTINE, ROUTINE, PERIODIC)]
    await asyncio.sleep(0.01)
    assert passes.busy("ns", "b") and passes.slots.waiting == 1  # three triggers, one pass waiting
    reconciler.release.set()
    await asyncio.gather(holder, *triggers)
    assert reconciler.passes == ["a", "b"]

    reconciler.refuse = True
    with pytest.raises(PassFailed) as failed:
        await passes.run("ns", "b")
    assert failed.value.refused and failed.value.delay == 10
    await passes.triggered("ns", "b", "its Deployment's rollout moved", ROUTINE)  # in backoff: no pass
    assert reconciler.passes == ["a", "b", "b"]
    await passes.triggered("ns", "b", "its ConfigMap was edited", URGENT)  # a person's edit: a pass
    assert reconciler.passes == ["a", "b", "b", "b"] and passes.backoff.waiting("ns", "b") > 10
    reconciler.refuse = False
    await passes.run("ns", "b")
    assert passes.backoff.waiting("ns", "b") == 0


def test_every_resource_handler_runs_on_the_event_loop() -> None:
    """kopf runs a plain function in a thread: a handler there could change what the loop's handlers are
    reading (the gateways' Secret and ConfigMap users once did: "dictionary changed size during iteration")."""
    registry = build_registry(Settings(), _Reconciler())  # type: ignore[arg-type]
    handlers = [
        *registry._watching.get_all_handlers(),
        *registry._changing.get_all_handlers(),
    ]
    assert len(handlers) >= 5
    plain = [h.id for h in handlers if not asyncio.iscoroutinefunction(h.fn)]
    assert plain == []
