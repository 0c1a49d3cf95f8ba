"""The migration's step logic, tick by tick with a fake clock: no cluster, no metrics, no I/O.

:class:`Run` plays the operator around :func:`advance`: it keeps the status as the API server would
(JSON, written by merge patch), renders a new config generation whenever the weight changes, and lets
a test say what the proxies report and what the metrics measure.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from llmgw_operator.migration import (
    ABORT,
    PROMOTE,
    RETRY,
    TOKEN_LIMIT,
    Action,
    Measurements,
    Proxies,
    advance,
    check_due,
    initial_weight,
    next_check_at,
    summary,
    window_start,
)
from llmgw_operator.spec import with_defaults

T0 = datetime(2026, 1, 1, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def window(
    requests: int = 100,
    errors: int = 0,
    p99: float | None = 0.5,
    rest_p99: float | None = 0.5,
    ttft: float | None = 0.2,
) -> Measurements:
    """One minute of gRPC-path metrics."""
    return Measurements(60, requests, errors, p99, rest_p99, ttft)


HEALTHY = window()
ERRORS = window(errors=5)  # 5% > maxErrorRate 1%
QUIET = window(requests=3)  # < minRequests 20


def migration_spec(**overrides: Any) -> dict[str, Any]:
    """A defaulted spec.migration with a one-minute interval and a ten-minute deadline."""
    base: dict[str, Any] = {"interval": "1m", "progressDeadline": "10m"}
    spec: dict[str, Any] = with_defaults({"migration": {**base, **overrides}})["migration"]
    return spec


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies the operator's status patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class Run:
    """The operator around :func:`advance`, with a fake clock and fake proxies."""

    def __init__(self, spec: dict[str, Any] | None = None, ready: int = 2, state: str = "{}") -> None:
        self.spec = spec or migration_spec()
        self.now = T0
        self.stored = json.loads(state)  # status.migration as stored: the only memory between ticks
        self.generation = 1  # the proxy config generation the operator rendered
        self.ready = ready
        self.proxy_weights = [0] * ready
        self.proxy_generations = [1] * ready
        self.commands: dict[str, str] = {}
        self.actions: list[Action] = []

    @property
    def state(self) -> dict[str, Any]:
        return self.stored

    @property
    def weight(self) -> int:
        return int(self.stored.get("weight", 0))

    def proxies(self) -> Proxies:
        return Proxies(self.ready, tuple(self.proxy_weights), tuple(self.proxy_generations))

    def catch_up(self) -> None:
        """Every proxy loads the latest rendered configuration."""
        self.proxy_weights = [self.weight] * self.ready
        self.proxy_generations = [self.generation] * self.ready

    def tick(self, measured: Measurements | None = None, after: timedelta = timedelta(0)) -> list[str]:
        """Advance the clock, run one tick, store the result as the API server would; the reasons."""
        self.now += after
        measurements = measured if check_due(self.spec, self.stored, self.now) else None
        before = json.dumps(self.stored)
        state, actions = advance(
            self.spec, self.stored, self.proxies(), measurements, self.generation, self.now, self.commands
        )
        assert json.dumps(self.stored) == before, "advance must not modify its input"
        text = json.dumps(state, allow_nan=False)  # JSON-serialisable, no NaN, at every tick
        assert "null" not in text, "a null would delete the field in a merge patch"
        assert merge_patch(self.stored, json.loads(text)) == json.loads(text), "a merge patch must store it"
        if state["weight"] != self.weight:
            self.generation += 1  # the reconciler renders the new weight
        self.stored = json.loads(text)
        self.actions = actions
        return [action.reason for action in actions]

    def live(self, measured: Measurements | None = None, after: timedelta = timedelta(0)) -> list[str]:
        """The proxies load the latest configuration, then one tick."""
        self.catch_up()
        return self.tick(measured, after)

    def message(self, reason: str) -> str:
        return next(a.message for a in self.actions if a.reason == reason)


def started(spec: dict[str, Any] | None = None) -> Run:
    """A run at its first step, weight live."""
    run = Run(spec)
    assert run.tick() == ["MigrationStarted", "StepStarted"]
    assert run.live() == ["WeightLive"]
    return run


def test_healthy_run_goes_through_every_step_to_succeeded() -> None:
    run = Run()
    seconds = timedelta(seconds=1)
    # (proxies load the latest config first?, time since the last tick, events, weight, phase)
    script: list[tuple[bool, timedelta, list[str], int, str]] = [
        (False, 0 * seconds, ["MigrationStarted", "StepStarted"], 10, "Progressing"),
        (True, 20 * seconds, ["WeightLive"], 10, "Progressing"),
        (False, 30 * seconds, [], 10, "Progressing"),  # half an interval: no check yet
        (False, 30 * seconds, ["CheckPassed", "StepAdvanced"], 25, "Progressing"),
        (True, 20 * seconds, ["WeightLive"], 25, "Progressing"),
        (False, 60 * seconds, ["CheckPassed", "StepAdvanced"], 50, "Progressing"),
        (True, 20 * seconds, ["WeightLive"], 50, "Progressing"),
        (False, 60 * seconds, ["CheckPassed", "StepAdvanced"], 100, "Progressing"),
        (True, 20 * seconds, ["WeightLive"], 100, "Progressing"),  # 100 is a step too: observed
        (False, 60 * seconds, ["CheckPassed", "Succeeded"], 100, "Succeeded"),
        (False, 3600 * seconds, [], 100, "Succeeded"),
    ]
    for tick, (load, after, events, weight, phase) in enumerate(script):
        got = run.live(HEALTHY, after) if load else run.tick(HEALTHY, after)
        assert (tick, got, run.weight, run.state["phase"]) == (tick, events, weight, phase)

    history = run.state["history"]
    assert [(h["step"], h["weight"], h["result"]) for h in history] == [
        (0, 10, "passed"),
        (1, 25, "passed"),
        (2, 50, "passed"),
        (3, 100, "passed"),
    ]
    assert history[0]["startedAt"] == "2026-01-01T00:00:00Z"
    assert history[0]["endedAt"] == "2026-01-01T00:01:20Z"  # live at 0:20, checked an interval later
    assert history[1]["startedAt"] == history[0]["endedAt"]
    analysis = run.state["lastAnalysis"]
    assert (analysis["verdict"], analysis["sampleCount"], analysis["windowSeconds"]) == ("passed", 100, 60)
    assert [(m["name"], m["value"], m["threshold"], m["ok"]) for m in analysis["metrics"]] == [
        ("errorRate", 0.0, 0.01, True),
        ("p99Latency", 0.5, 10.0, True),
    ]
    assert run.state["message"] == "Migrated: every request takes the gRPC path, all steps passed."
    assert summary(run.state).startswith("Succeeded at gRPC weight 100%: Migrated")


def test_an_idle_tick_changes_nothing() -> None:
    run = started()
    before = run.state
    for _ in range(3):
        assert run.tick(HEALTHY, after=timedelta(seconds=10)) == []
        assert run.state == before  # nothing to write to the API server


def test_checks_wait_until_every_ready_proxy_runs_the_weight_from_the_new_generation() -> None:
    run = Run()
    run.tick()
    assert (run.weight, run.generation) == (10, 2)
    # (proxy weights, proxy generations, events): live needs weight 10 AND generation >= 2 on all of them
    for weights, generations, events in [
        ([0, 0], [1, 1], []),  # the kubelet has not updated the ConfigMap volume yet
        ([10, 0], [2, 1], []),  # one proxy reloaded
        ([10, 10], [2, 1], []),  # an old generation cannot report the new weight; checked anyway
        ([10, 10], [2, 2], ["WeightLive"]),
    ]:
        run.proxy_weights, run.proxy_generations = weights, generations
        assert check_due(run.spec, run.state, run.now + timedelta(hours=1)) is False
        assert run.tick(HEALTHY, after=timedelta(minutes=2)) == events
        assert run.weight == 10
    assert run.state["message"].startswith("Step 1/4 (gRPC weight 10%) is live; first check at")
    assert window_start(run.state) == run.now
    assert next_check_at(run.spec, run.state) == run.now + MINUTE
    assert run.tick(HEALTHY, after=timedelta(seconds=59)) == []
    assert run.tick(HEALTHY, after=timedelta(seconds=1)) == ["CheckPassed", "StepAdvanced"]


def test_waiting_message_says_what_is_missing() -> None:
    run = Run()
    run.tick()
    run.proxy_weights = [10, 0]
    run.proxy_generations = [2, 1]
    run.tick()
    assert run.state["message"] == (
        "Step 1/4 (gRPC weight 10%): waiting for every ready proxy to run it:"
        " 1 of 2 ready proxies run it (config generation 2)."
    )
    run.catch_up()
    run.proxy_weights.pop()  # one ready proxy's metrics could not be read
    run.proxy_generations.pop()
    assert run.tick() == []
    assert run.state["message"].endswith("1 of 2 ready proxies reported their weight.")
    run.ready, run.proxy_weights, run.proxy_generations = 0, [], []
    assert run.tick() == []
    assert run.state["message"].endswith("no proxy is ready.")


def test_a_stale_generation_for_one_tick_does_not_make_the_new_weight_live() -> None:
    run = started()
    run.tick(HEALTHY, after=MINUTE)
    assert run.weight == 25
    # The caller passes the generation of weight 10 once more; the proxies still run 10 at it.
    run.generation -= 1
    assert run.tick() == []
    run.generation += 1
    assert run.tick() == []  # the proxies still report weight 10
    assert run.live() == ["WeightLive"]


def test_a_weight_that_stops_being_live_restarts_the_analysis() -> None:
    run = started()
    run.tick(HEALTHY, after=timedelta(seconds=30))
    run.generation += 1  # an unrelated change of the gateway: the proxies reload a new generation
    assert run.tick(HEALTHY, after=timedelta(seconds=30)) == ["WeightNotLive"]
    assert run.state["weightLiveAt"] == ""
    assert run.live(HEALTHY, after=timedelta(seconds=10)) == ["WeightLive"]
    assert run.tick(HEALTHY, after=timedelta(seconds=59)) == []
    assert run.tick(HEALTHY, after=timedelta(seconds=1)) == ["CheckPassed", "StepAdvanced"]


def test_pending_until_a_proxy_is_ready() -> None:
    run = Run(ready=0)
    assert run.tick() == []
    assert (run.state["phase"], run.weight, run.state["stepIndex"]) == ("Pending", 0, -1)
    assert run.state["message"] == "Waiting for a ready proxy before starting the migration."
    run.ready, run.proxy_weights, run.proxy_generations = 1, [0], [1]
    assert run.tick(after=timedelta(hours=2)) == ["MigrationStarted", "StepStarted"]
    assert run.tick(after=timedelta(minutes=9)) == []  # the deadline counts from the start, not creation
    assert run.state["phase"] == "Progressing"


def test_inconclusive_checks_hold_the_step_and_never_count_as_success() -> None:
    run = started(migration_spec(progressDeadline="1h"))
    for measured, reason in [
        (QUIET, "3 gRPC requests in the window, fewer than minRequests 20"),
        (None, "no metrics for the window"),
        (window(p99=float("nan")), "no gRPC latency data"),
        (
            window(requests=0, p99=None, rest_p99=None, ttft=None),
            "0 gRPC requests in the window, fewer than minRequests 20",
        ),
        (
            window(requests=19, errors=19),
            "19 gRPC requests in the window, fewer than minRequests 20",
        ),
    ]:
        assert run.tick(measured, after=MINUTE) == ["CheckInconclusive"]
        assert (run.weight, run.state["failures"]) == (10, 0)
        assert run.state["lastAnalysis"]["verdict"] == "inconclusive"
        assert run.state["lastAnalysis"]["reason"] == reason
        assert reason in run.message("CheckInconclusive")
    assert run.state["inconclusiveChecks"] == 5
    assert run.state["history"] == []


def test_a_metric_over_its_threshold_fails_until_failure_limit_rolls_back() -> None:
    run = started()
    assert run.tick(ERRORS, after=MINUTE) == ["CheckFailed"]
    assert (run.weight, run.state["failures"], run.state["phase"]) == (10, 1, "Progressing")
    assert run.actions[0].type == "Warning"
    assert run.state["message"].startswith("Step 1/4 (gRPC weight 10%): 1 of 2 allowed checks failed")

    assert run.tick(ERRORS, after=MINUTE) == ["CheckFailed", "RolledBack"]
    assert (run.weight, run.state["phase"]) == (0, "RolledBack")
    expected = "gRPC error rate 0.05 (5 of 100 requests) exceeds maxErrorRate 0.01"
    assert expected in run.message("RolledBack")
    assert expected in run.state["message"]
    assert run.state["history"][-1]["result"] == "rolledBack"
    # RolledBack is final: time and healthy metrics change nothing.
    assert run.live(HEALTHY, after=timedelta(hours=1)) == []
    assert run.weight == 0


@pytest.mark.parametrize(
    ("analysis", "measured", "failing"),
    [
        pytest.param(
            {"maxP99Latency": "2s"},
            window(p99=2.5),
            "gRPC p99 latency 2.5s exceeds maxP99Latency 2s",
            id="p99",
        ),
        pytest.param(
            {"maxP99Latency": "2s"},
            window(p99=float("inf")),
            "gRPC p99 latency above the largest histogram bucket exceeds maxP99Latency 2s",
            id="p99-beyond-buckets",
        ),
        pytest.param(
            {"maxP99LatencyRatio": 1.2},
            window(p99=0.9, rest_p99=0.6),
            "gRPC/REST p99 latency ratio 1.5 exceeds maxP99LatencyRatio 1.2",
            id="ratio",
        ),
        pytest.param(
            {"maxTimeToFirstToken": "500ms"},
            window(ttft=0.75),
            "gRPC p99 time to first token 750ms exceeds maxTimeToFirstToken 500ms",
            id="ttft",
        ),
    ],
)
def test_each_metric_can_fail_a_check(analysis: dict[str, Any], measured: Measurements, failing: str) -> None:
    run = started(migration_spec(analysis=analysis, failureLimit=1))
    assert run.tick(measured, after=MINUTE) == ["CheckFailed", "RolledBack"]
    assert run.state["lastAnalysis"]["reason"] == failing
    assert failing in run.message("RolledBack")
    assert run.weight == 0


@pytest.mark.parametrize(
    ("measured", "expected_metrics"),
    [
        pytest.param(
            window(ttft=0.3),
            [("errorRate", 0.0), ("p99Latency", 0.5), ("p99LatencyRatio", 1.0), ("timeToFirstToken", 0.3)],
            id="all-known",
        ),
        pytest.param(
            window(rest_p99=None, ttft=None),
            [
                ("errorRate", 0.0),
                ("p99Latency", 0.5),
                ("p99LatencyRatio", "no REST latency data to compare with"),
                ("timeToFirstToken", "no gRPC streams"),
            ],
            id="no-rest-no-streams",
        ),
    ],
)
def test_ratio_and_ttft_are_checked_when_known_and_skipped_otherwise(
    measured: Measurements, expected_metrics: list[tuple[str, Any]]
) -> None:
    run = started(migration_spec(analysis={"maxP99LatencyRatio": 1.2, "maxTimeToFirstToken": "1s"}))
    assert run.tick(measured, after=MINUTE) == ["CheckPassed", "StepAdvanced"]
    metrics = run.state["lastAnalysis"]["metrics"]
    assert [(m["name"], m.get("value", m.get("skipped"))) for m in metrics] == expected_metrics


def test_failures_count_per_step_and_a_pass_ends_the_step() -> None:
    run = started()  # failureLimit 2
    # (measurements, events, weight, failures)
    for measured, events, weight, failures in [
        (ERRORS, ["CheckFailed"], 10, 1),
        (HEALTHY, ["CheckPassed", "StepAdvanced"], 25, 0),  # the failure is forgotten with its step
        ("live", ["WeightLive"], 25, 0),
        (ERRORS, ["CheckFailed"], 25, 1),  # one failure in this step: below the limit
        (QUIET, ["CheckInconclusive"], 25, 1),  # inconclusive neither adds nor forgives
        (ERRORS, ["CheckFailed", "RolledBack"], 0, 2),
    ]:
        if measured == "live":
            assert run.live(after=timedelta(seconds=5)) == events
        else:
            assert isinstance(measured, Measurements)
            assert run.tick(measured, after=MINUTE) == events
        assert (run.weight, run.state["failures"]) == (weight, failures)


def test_progress_deadline_while_waiting_for_the_weight() -> None:
    run = Run()
    run.tick()
    assert run.tick(after=timedelta(minutes=10)) == []  # exactly the deadline: not over it
    assert run.tick(after=timedelta(seconds=1)) == ["ProgressDeadlineExceeded"]
    assert (run.weight, run.state["phase"]) == (0, "Failed")
    assert run.actions[0].type == "Warning"
    assert "did not pass within progressDeadline 10m (waiting for every ready proxy" in run.state["message"]
    assert run.state["history"][-1]["result"] == "deadlineExceeded"


def test_progress_deadline_when_checks_stay_inconclusive() -> None:
    run = started(migration_spec(progressDeadline="150s"))
    assert run.tick(QUIET, after=MINUTE) == ["CheckInconclusive"]
    assert run.tick(QUIET, after=MINUTE) == ["CheckInconclusive"]
    assert run.tick(QUIET, after=MINUTE) == ["CheckInconclusive", "ProgressDeadlineExceeded"]
    assert (run.weight, run.state["phase"]) == (0, "Failed")
    assert "checks inconclusive: 3 gRPC requests" in run.state["message"]


def test_an_interval_longer_than_the_deadline_still_gets_its_check() -> None:
    # The CRD now refuses a progressDeadline not longer than the interval; one stored before still behaves so.
    run = started(migration_spec(interval="1h", progressDeadline="10m"))
    assert run.tick(HEALTHY, after=timedelta(minutes=30)) == []
    assert run.tick(HEALTHY, after=timedelta(minutes=30)) == ["CheckPassed", "StepAdvanced"]


def test_pause_holds_the_weight_and_freezes_the_clocks_then_resume_restarts_the_analysis() -> None:
    run = started()
    run.tick(ERRORS, after=MINUTE)  # one failure, kept across the pause
    run.spec = migration_spec(paused=True)
    assert run.tick(after=timedelta(seconds=10)) == ["Paused"]
    assert (run.state["phase"], run.weight) == ("Paused", 10)
    assert run.state["message"] == "Paused at step 1/4 (gRPC weight 10%) by spec.migration.paused."
    assert check_due(run.spec, run.state, run.now + timedelta(days=1)) is False
    assert run.tick(ERRORS, after=timedelta(hours=3)) == []  # no checks, no deadline
    assert (run.state["phase"], run.weight, run.state["failures"]) == ("Paused", 10, 1)

    run.spec = migration_spec(paused=False)  # not a spec change: paused is left out of the hash
    assert run.tick() == ["Resumed", "WeightLive"]
    assert (run.state["phase"], run.state["failures"]) == ("Progressing", 1)
    assert run.state["pausedSeconds"] == 3 * 3600
    assert run.tick(HEALTHY, after=timedelta(seconds=59)) == []  # a full interval from the resume
    assert run.tick(HEALTHY, after=timedelta(seconds=1)) == ["CheckPassed", "StepAdvanced"]


def test_the_deadline_does_not_count_the_pause() -> None:
    run = Run()
    run.tick()
    run.tick(after=timedelta(minutes=8))  # 8 of 10 minutes waiting for the weight
    run.spec = migration_spec(paused=True)
    run.tick()
    run.spec = migration_spec()
    assert run.tick(after=timedelta(hours=1)) == ["Resumed"]
    assert run.tick(after=timedelta(minutes=2)) == []
    assert run.tick(after=timedelta(seconds=1)) == ["ProgressDeadlineExceeded"]


def test_paused_before_the_first_step() -> None:
    run = Run(migration_spec(paused=True))
    assert run.tick() == ["Paused"]
    assert (run.state["phase"], run.weight, run.state["stepIndex"]) == ("Paused", 0, -1)
    run.spec = migration_spec()
    assert run.tick() == ["Resumed", "MigrationStarted", "StepStarted"]
    assert run.weight == 10


@pytest.mark.parametrize("paused", [False, True])
def test_abort_goes_to_weight_zero_at_once(paused: bool) -> None:
    run = started()
    if paused:
        run.spec = migration_spec(paused=True)
        assert run.tick() == ["Paused"]
    run.commands = {ABORT: "1"}
    assert run.tick() == ["Aborted"]
    assert (run.weight, run.state["phase"]) == (0, "RolledBack")
    assert run.actions[0].type == "Warning"
    assert run.state["observedCommands"] == {ABORT: "1"}
    assert run.state["history"][-1]["result"] == "aborted"


@pytest.mark.parametrize("paused", [False, True])
def test_promote_goes_to_100_without_further_checks(paused: bool) -> None:
    run = started()
    if paused:
        run.spec = migration_spec(paused=True)
        assert run.tick() == ["Paused"]
    run.commands = {PROMOTE: "2026-01-01T00:05:00Z"}
    assert run.tick() == ["Promoted"]
    assert (run.weight, run.state["phase"], run.state["stepIndex"]) == (100, "Succeeded", 3)
    assert run.state["observedCommands"] == {PROMOTE: "2026-01-01T00:05:00Z"}
    assert run.state["history"][-1]["result"] == "promoted"


def test_retry_after_a_rollback_starts_again_from_the_first_step() -> None:
    run = started(migration_spec(failureLimit=1))
    run.tick(ERRORS, after=MINUTE)
    assert run.state["phase"] == "RolledBack"
    run.spec = migration_spec(failureLimit=3)  # a spec change alone does not retry
    assert run.tick() == ["SpecChanged"]
    assert (run.state["phase"], run.weight) == ("RolledBack", 0)
    run.commands = {RETRY: "a"}
    assert run.tick() == ["Retried", "MigrationStarted", "StepStarted"]
    assert (run.state["phase"], run.weight, run.state["stepIndex"], run.state["failures"]) == (
        "Progressing",
        10,
        0,
        0,
    )
    assert run.live() == ["WeightLive"]
    assert run.tick(HEALTHY, after=MINUTE) == ["CheckPassed", "StepAdvanced"]
    assert [h["result"] for h in run.state["history"]] == ["rolledBack", "passed"]


def test_retry_after_a_deadline_failure() -> None:
    run = Run()
    run.tick()
    run.tick(after=timedelta(minutes=11))
    assert run.state["phase"] == "Failed"
    run.commands = {RETRY: "1"}
    assert run.tick() == ["Retried", "MigrationStarted", "StepStarted"]
    assert run.weight == 10


def test_commands_are_acted_on_once_per_token_and_explained_when_they_do_not_apply() -> None:
    run = started()
    # (annotations, events, phase after)
    for commands, events, phase in [
        ({RETRY: "1"}, ["CommandIgnored"], "Progressing"),  # nothing to retry yet
        ({RETRY: "1"}, [], "Progressing"),  # same token: already acknowledged
        ({RETRY: "1", ABORT: "1"}, ["Aborted"], "RolledBack"),
        ({RETRY: "1", ABORT: "1"}, [], "RolledBack"),
        ({RETRY: "1", ABORT: "2"}, ["CommandIgnored"], "RolledBack"),  # already at weight 0
        ({RETRY: "2", ABORT: "2"}, ["Retried", "MigrationStarted", "StepStarted"], "Progressing"),
        ({RETRY: "2", ABORT: "2", PROMOTE: "1"}, ["Promoted"], "Succeeded"),
        ({RETRY: "2", ABORT: "2", PROMOTE: "2"}, ["CommandIgnored"], "Succeeded"),  # already succeeded
        ({RETRY: "2", ABORT: "3"}, ["CommandIgnored"], "Succeeded"),
        ({}, [], "Succeeded"),  # a removed annotation is no command
    ]:
        run.commands = commands
        assert (commands, run.tick(), run.state["phase"]) == (commands, events, phase)
    assert run.state["observedCommands"] == {RETRY: "2", ABORT: "3", PROMOTE: "2"}


def test_abort_wins_over_promote_in_the_same_tick() -> None:
    run = started()
    run.commands = {PROMOTE: "x", ABORT: "x"}
    assert run.tick() == ["Aborted", "CommandIgnored"]
    assert (run.state["phase"], run.weight) == ("RolledBack", 0)


def test_annotations_already_there_when_the_migration_is_created_are_not_commands() -> None:
    run = Run()
    run.commands = {PROMOTE: "old"}
    assert run.tick() == ["CommandIgnored", "MigrationStarted", "StepStarted"]
    assert "was there before the migration started" in run.message("CommandIgnored")
    assert (run.state["phase"], run.weight, run.state["observedCommands"]) == (
        "Progressing",
        10,
        {PROMOTE: "old"},
    )


def test_a_spec_change_mid_step_keeps_the_weight_and_restarts_its_analysis() -> None:
    run = started()
    run.tick(HEALTHY, after=MINUTE)
    run.live()
    run.tick(ERRORS, after=MINUTE)
    assert (run.weight, run.state["failures"]) == (25, 1)

    run.spec = migration_spec(analysis={"maxErrorRate": 0.1})
    assert run.tick(after=timedelta(seconds=30)) == ["SpecChanged", "WeightLive"]
    assert (run.weight, run.state["failures"], run.state["phase"]) == (25, 0, "Progressing")
    assert run.state["stepStartedAt"] == run.state["weightLiveAt"] == "2026-01-01T00:02:30Z"
    assert run.state["history"][-1] == {
        "step": 1,
        "weight": 25,
        "startedAt": "2026-01-01T00:01:00Z",
        "endedAt": "2026-01-01T00:02:30Z",
        "result": "specChanged",
    }
    assert run.tick(ERRORS, after=timedelta(seconds=59)) == []  # the timer restarted too
    assert run.tick(ERRORS, after=timedelta(seconds=1)) == ["CheckPassed", "StepAdvanced"]  # 5% <= 10%
    assert run.weight == 50


def test_new_steps_without_the_current_weight_continue_from_the_next_step_above_it() -> None:
    run = started()
    run.tick(HEALTHY, after=MINUTE)
    run.live()
    assert run.weight == 25
    run.spec = migration_spec(steps=[20, 40, 100])
    assert run.tick() == ["SpecChanged", "WeightLive"]
    assert (run.weight, run.state["stepIndex"], run.state["steps"]) == (25, 0, [20, 40, 100])
    assert "gRPC weight 25% (kept across a spec change; next step 40%)" in run.state["message"]
    assert run.tick(HEALTHY, after=MINUTE) == ["CheckPassed", "StepAdvanced"]
    assert (run.weight, run.state["stepIndex"]) == (40, 1)


def test_a_spec_change_after_success_keeps_it() -> None:
    run = started(migration_spec(steps=[100]))
    assert run.weight == 100
    assert run.tick(HEALTHY, after=MINUTE) == ["CheckPassed", "Succeeded"]
    run.spec = migration_spec(steps=[10, 100], interval="5m")
    assert run.tick() == ["SpecChanged"]
    assert (run.state["phase"], run.weight, run.state["stepIndex"]) == ("Succeeded", 100, 1)


def test_an_operator_restart_mid_step_continues_from_the_status_alone() -> None:
    run = started()
    run.tick(ERRORS, after=MINUTE)
    run.tick(after=timedelta(seconds=30))
    stored = json.dumps(run.state)

    restarted = Run(state=stored)  # a new process: nothing but the stored status
    restarted.now, restarted.generation = run.now, run.generation
    restarted.catch_up()
    assert restarted.tick(after=timedelta(seconds=29)) == []
    assert check_due(restarted.spec, restarted.state, restarted.now + timedelta(seconds=1))
    # The restarted caller lost its counter baseline: no measurements, inconclusive, not a failure.
    assert restarted.tick(None, after=timedelta(seconds=1)) == ["CheckInconclusive"]
    assert restarted.state["failures"] == 1
    assert restarted.tick(ERRORS, after=MINUTE) == ["CheckFailed", "RolledBack"]


def test_history_keeps_the_last_20_steps() -> None:
    run = started()
    for attempt in range(25):
        run.commands = {ABORT: str(attempt)}
        run.tick()
        run.commands = {ABORT: str(attempt), RETRY: str(attempt)}
        run.tick(after=MINUTE)
    history = run.state["history"]
    assert len(history) == 20
    assert {h["result"] for h in history} == {"aborted"}
    assert history[-1]["endedAt"] == "2026-01-01T00:24:00Z"  # the newest kept, the oldest dropped


def test_initial_weight_and_summary() -> None:
    assert initial_weight(migration_spec(), {}) == 0
    assert summary({}) == "not started"
    run = started()
    assert initial_weight(run.spec, run.state) == 10
    assert summary(run.state).startswith("Progressing at gRPC weight 10%: Step 1/4 (gRPC weight 10%) is live")


def test_measurements_are_ignored_when_no_check_is_due() -> None:
    run = started()
    state, actions = advance(run.spec, run.state, run.proxies(), ERRORS, run.generation, run.now, {})
    assert (actions, state) == ([], run.state)


def test_a_naive_now_is_taken_as_utc() -> None:
    run = started()
    naive = (run.now + MINUTE).replace(tzinfo=None)
    assert check_due(run.spec, run.state, naive)
    _, actions = advance(run.spec, run.state, run.proxies(), HEALTHY, run.generation, naive, {})
    assert [a.reason for a in actions] == ["CheckPassed", "StepAdvanced"]


def test_a_long_command_value_is_quoted_cut_in_messages_and_events() -> None:
    """A 10 KB annotation value is kept whole once (observedCommands: the value acted on) and quoted in at
    most TOKEN_LIMIT characters everywhere else."""
    run = started()
    token = "x" * 10_000
    run.commands = {ABORT: token}
    assert run.tick() == ["Aborted"]
    assert run.state["observedCommands"] == {ABORT: token}
    for text in [run.state["message"], run.message("Aborted")]:
        assert "x" * (TOKEN_LIMIT + 1) not in text and "x" * TOKEN_LIMIT + "… (10000 characters)" in text
    stored = json.dumps(run.state)
    assert stored.count(token) == 1  # observedCommands; the message quotes TOKEN_LIMIT characters
    assert len(stored) < len(token) + 2 * TOKEN_LIMIT + 2000
    run.commands = {ABORT: token, PROMOTE: "y" * 5000}  # a command that does not apply: quoted cut too
    assert run.tick() == ["CommandIgnored"]
    assert "y" * (TOKEN_LIMIT + 1) not in run.message("CommandIgnored")
    assert run.tick() == []  # each value acted on once


def test_a_check_without_metrics_says_why_when_the_caller_knows() -> None:
    run = started()
    run.now += MINUTE
    why = (
        "cannot reach Prometheus at http://prometheus.monitoring:9090: Connect call failed ('10.0.0.9', 9090)"
    )
    state, actions = advance(run.spec, run.stored, run.proxies(), None, run.generation, run.now, {}, why)
    assert state["lastAnalysis"]["verdict"] == "inconclusive"
    assert state["lastAnalysis"]["reason"] == why
    assert why in state["message"]
    (inconclusive,) = actions
    assert inconclusive.reason == "CheckInconclusive" and why in inconclusive.message
    # Without a reason from the caller, as before.
    state, _ = advance(run.spec, run.stored, run.proxies(), None, run.generation, run.now, {})
    assert state["lastAnalysis"]["reason"] == "no metrics for the window"
    # A long reason is cut.
    state, _ = advance(run.spec, run.stored, run.proxies(), None, run.generation, run.now, {}, "e" * 5000)
    assert len(state["lastAnalysis"]["reason"]) < 600
