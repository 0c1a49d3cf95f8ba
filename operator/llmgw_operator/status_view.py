"""``llmgw status NAME [-n NAMESPACE] [--watch]``: one gateway's rollout, live, in a terminal.

Like ``kubectl argo rollouts get rollout --watch``: the phase, the step (i of n), the gRPC weight as a bar,
the last analysis (each metric against its threshold), the proxies and conditions, and the most recent
events. :func:`render` is pure (a gateway and its events in, text out); the rest reads them from the API
server and redraws: in place on a terminal, a new block per change otherwise (a log, a pipe).
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

from lightkube import ApiError, Client
from lightkube.resources.core_v1 import Event

from .kube import LLMGateway
from .migration import FINAL_PHASES

BAR_WIDTH = 40
_METRIC_LABELS = {
    "errorRate": ("gRPC error rate", "ratio"),
    "p99Latency": ("gRPC p99 latency", "seconds"),
    "p99LatencyRatio": ("gRPC/REST p99 ratio", "ratio"),
    "timeToFirstToken": ("gRPC p99 time to first token", "seconds"),
}


def _fmt(value: float, kind: str) -> str:
    if kind == "seconds":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.4g}"


def bar(weight: int, width: int = BAR_WIDTH) -> str:
    filled = round(width * weight / 100)
    return "[" + "#" * filled + "." * (width - filled) + f"] gRPC {weight}% | REST {100 - weight}%"


def _steps_line(steps: list[int], index: int, phase: str) -> str:
    marks = []
    for i, step in enumerate(steps):
        if i < index or (i == index and phase == "Succeeded"):
            marks.append(f"{step}% done")
        elif i == index:
            marks.append(f"[{step}%]")
        else:
            marks.append(f"{step}%")
    return " -> ".join(marks)


def _age(timestamp: str | None, now: datetime.datetime) -> str:
    if not timestamp:
        return "-"
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    seconds = max(0, int((now - then).total_seconds()))
    return (
        f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"
    )


def render(
    gateway: dict[str, Any], events: list[dict[str, Any]], now: datetime.datetime, max_events: int = 8
) -> str:
    meta, spec, status = gateway["metadata"], gateway.get("spec") or {}, gateway.get("status") or {}
    state = status.get("migration") or {}
    lines = [
        f"Name:        {meta['namespace']}/{meta['name']}",
        f"Phase:       {status.get('phase', 'Unknown')}"
        + (
            ""
            if status.get("observedGeneration") == meta.get("generation")
            else "  (status is for an older spec)"
        ),
        f"Proxies:     {status.get('readyReplicasText', '-')} ready, config generation {status.get('configGeneration', '-')}",
        f"gRPC weight: {bar(int(status.get('grpcWeight', 0)))}",
    ]
    if "migration" in spec:
        steps = list(state.get("steps") or spec["migration"].get("steps") or [])
        index = int(state.get("stepIndex", -1))
        step_text = f"{index + 1} of {len(steps)}" if index >= 0 else f"not started (of {len(steps)})"
        lines += [
            f"Migration:   {state.get('phase', 'Pending')}, step {step_text}",
            f"Steps:       {_steps_line(steps, index, state.get('phase', ''))}",
            f"Why:         {state.get('message', '-')}",
        ]
        analysis = state.get("lastAnalysis") or {}
        if analysis.get("time"):
            lines.append(
                f"Last check:  {analysis.get('verdict', '?')} {_age(analysis['time'], now)} ago, "
                f"{analysis.get('sampleCount', 0)} gRPC requests in {analysis.get('windowSeconds', 0):g}s"
                f" (failures in this step: {state.get('failures', 0)})"
            )
            for metric in analysis.get("metrics", []):
                label, kind = _METRIC_LABELS.get(metric["name"], (metric["name"], "ratio"))
                limit = _fmt(float(metric["threshold"]), kind)
                if "value" in metric:
                    verdict = "ok" if metric.get("ok") else "FAILED"
                    lines.append(
                        f"  {label:<30} {_fmt(float(metric['value']), kind):>10}  <= {limit:<10} {verdict}"
                    )
                else:
                    lines.append(
                        f"  {label:<30} {'-':>10}  <= {limit:<10} {metric.get('skipped') or metric.get('note', '')}"
                    )
    else:
        lines.append("Migration:   none (spec.migration is not set)")
    conditions = status.get("conditions", [])
    if conditions:
        lines.append(
            "Conditions:  "
            + ", ".join(f"{c['type']}={c['status']} ({c.get('reason', '')})" for c in conditions)
        )
    recent = sorted(events, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")[-max_events:]
    if recent:
        lines.append("Events:")
        for event in recent:
            when = _age(event.get("lastTimestamp") or event.get("eventTime"), now)
            lines.append(
                f"  {when:>4} ago  {event.get('type', ''):<7} {event.get('reason', ''):<20} {event.get('message', '')}"
            )
    return "\n".join(lines)


def _read(client: Client, namespace: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    gateway = client.get(LLMGateway, name, namespace=namespace).to_dict()
    selector: dict[str, Any] = {"involvedObject.name": name, "involvedObject.kind": "LLMGateway"}
    events = [e.to_dict() for e in client.list(Event, namespace=namespace, fields=selector)]
    return gateway, events


class Screen:
    """Shows successive renderings: redrawn in place on a terminal, else a new block per change."""

    def __init__(self, in_place: bool) -> None:
        self.in_place = in_place and sys.stdout.isatty()
        self.shown = ""

    def show(self, text: str) -> None:
        if text == self.shown:
            return
        if self.in_place:
            sys.stdout.write("\x1b[H\x1b[J")
        elif self.shown:
            print("-" * 80)
        print(text, flush=True)
        self.shown = text


def read(client: Client, namespace: str, name: str) -> str:
    """The gateway's current rendering, read from the API server."""
    gateway, events = _read(client, namespace, name)
    return render(gateway, events, datetime.datetime.now(datetime.UTC))


def run(
    name: str, namespace: str | None, watch: bool, interval: float = 1.0, until_done: bool = False
) -> int:
    """Print the gateway's status once, or keep redrawing it (``watch``) until Ctrl-C or, with
    ``until_done``, until its migration has finished (Succeeded, RolledBack or Failed)."""
    client = Client()
    namespace = namespace or client.namespace
    screen = Screen(in_place=watch)
    try:
        while True:
            try:
                gateway, events = _read(client, namespace, name)
            except ApiError as exc:
                print(f"llmgw status: {namespace}/{name}: {exc.status.message}", file=sys.stderr)
                return 1
            screen.show(render(gateway, events, datetime.datetime.now(datetime.UTC)))
            phase = ((gateway.get("status") or {}).get("migration") or {}).get("phase")
            if not watch or (until_done and phase in FINAL_PHASES):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
