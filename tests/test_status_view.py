"""``llmgw status``'s rendering: pure, from a gateway and its events."""

from __future__ import annotations

import datetime

from llmgw_operator.status_view import bar, render

NOW = datetime.datetime(2026, 1, 1, 12, 0, 30, tzinfo=datetime.UTC)


def _gateway() -> dict:
    return {
        "metadata": {"name": "chat", "namespace": "team-a", "generation": 2},
        "spec": {"migration": {"steps": [10, 25, 50, 100]}},
        "status": {
            "observedGeneration": 2,
            "phase": "Progressing",
            "grpcWeight": 25,
            "configGeneration": 4,
            "readyReplicasText": "2/2",
            "conditions": [{"type": "Ready", "status": "True", "reason": "ProxiesReady"}],
            "migration": {
                "phase": "Progressing",
                "stepIndex": 1,
                "steps": [10, 25, 50, 100],
                "weight": 25,
                "failures": 1,
                "message": "observing gRPC weight 25%",
                "lastAnalysis": {
                    "time": "2026-01-01T12:00:00Z",
                    "windowSeconds": 10,
                    "sampleCount": 140,
                    "verdict": "failed",
                    "metrics": [
                        {"name": "errorRate", "threshold": 0.01, "value": 0.3, "ok": False},
                        {"name": "p99Latency", "threshold": 2.0, "value": 0.12, "ok": True},
                        {"name": "timeToFirstToken", "threshold": 0.5, "skipped": "no gRPC streams"},
                    ],
                },
            },
        },
    }


def test_bar() -> None:
    assert bar(25, width=8) == "[##......] gRPC 25% | REST 75%"
    assert bar(0, width=4) == "[....] gRPC 0% | REST 100%"


def test_render_shows_step_weight_analysis_and_events() -> None:
    events = [
        {
            "type": "Normal",
            "reason": "StepAdvanced",
            "message": "gRPC weight 10% -> 25%",
            "lastTimestamp": "2026-01-01T11:59:50Z",
        },
        {
            "type": "Warning",
            "reason": "CheckFailed",
            "message": "gRPC error rate 0.3",
            "lastTimestamp": "2026-01-01T12:00:00Z",
        },
    ]
    text = render(_gateway(), events, NOW)
    assert "Phase:       Progressing" in text
    assert "step 2 of 4" in text
    assert "10% done -> [25%] -> 50% -> 100%" in text
    assert "gRPC 25% | REST 75%" in text
    assert "failed 30s ago, 140 gRPC requests in 10s (failures in this step: 1)" in text
    error_line = next(line for line in text.splitlines() if "gRPC error rate" in line)
    assert "0.3" in error_line and "FAILED" in error_line
    assert "120 ms" in text and "no gRPC streams" in text
    assert text.index("StepAdvanced") < text.index("CheckFailed")  # oldest first, newest last


def test_render_without_migration() -> None:
    gateway = _gateway()
    del gateway["spec"]["migration"], gateway["status"]["migration"]
    assert "Migration:   none" in render(gateway, [], NOW)
