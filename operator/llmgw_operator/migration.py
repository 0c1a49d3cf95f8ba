"""The REST-to-gRPC migration of one gateway, one tick at a time, as a pure function.

How a migration runs (``spec.migration``)
-----------------------------------------
The proxies split every route's traffic between its REST path and its gRPC path by a *gRPC weight*
(percent of requests on gRPC). A migration walks that weight through ``steps`` (default 10, 25, 50,
100) and observes each step before taking the next, in the manner of Flagger's canary analysis:

1. **Start.** Once at least one proxy is ready (phase ``Pending`` until then), the first step's weight
   is written into the proxies' configuration (phase ``Progressing``).
2. **Going live.** A weight counts only once *every* ready proxy reports it, from the configuration
   generation the operator rendered it in (the proxies export ``llmgw_route_grpc_weight`` and
   ``llmgw_config_generation``). The kubelet takes up to a minute or two to update a mounted
   ConfigMap, and traffic measured before that would describe the old weight, so no check runs until
   then. If the weight stops being live mid-step (a proxy reports an older generation, say after an
   unrelated change of the gateway), the step's analysis starts again once it is live again.
3. **Checks.** Every ``interval`` after the weight went live, one check looks at the gRPC path over
   the interval just ended (all proxies summed): the share of gRPC requests that failed with a
   server-side error (``maxErrorRate``), the gRPC p99 latency (``maxP99Latency``), and, when set,
   the gRPC p99 relative to the REST p99 of the same window (``maxP99LatencyRatio``; skipped while
   the REST path has no latency data, as at weight 100) and the p99 time to first token of gRPC
   streams (``maxTimeToFirstToken``; skipped when no stream ran). A value equal to its threshold
   passes.
4. **Verdicts.** A check is

   - *inconclusive* when the window saw fewer than ``minRequests`` gRPC requests, or there were no
     metrics at all, or no gRPC latency data. The step holds: it is neither a success nor a failure.
   - *failed* when any metric is over its threshold. ``failureLimit`` failed checks in one step roll
     the migration back: the weight goes to 0 at once (all traffic on REST), phase ``RolledBack``.
   - *passed* otherwise. The next step starts; a pass of the last step (100) ends the migration,
     phase ``Succeeded``.

   Failed checks are counted per step: a passed check ends the step, so a failure followed by a pass
   is forgotten when the next step starts. ``failureLimit`` bounds the failures of one step, not of
   the whole migration.
5. **Progress deadline.** A step may take at most ``progressDeadline`` to pass, counted from its
   start (time spent paused excluded). The deadline is enforced while the step waits for its weight
   to go live and at each inconclusive check: the migration fails, weight 0, phase ``Failed``. It is
   not enforced at a failed check (``failureLimit`` decides those) nor before the first check of a
   live weight, so even an ``interval`` longer than the deadline gets its check, and a passing check
   always wins.

Controls
--------
- ``spec.migration.paused: true`` holds the current weight (phase ``Paused``): no checks, and the
  progress-deadline clock stops. On resume the step's analysis starts afresh: the weight must be
  seen live again, then a full ``interval`` passes before the next check. Failed checks so far in the
  step are kept (pausing is not a way around ``failureLimit``).
- Annotations on the gateway, each acted on once per distinct value (use a timestamp and change it to
  give the command again); the value acted on is recorded in ``status.migration.observedCommands``:

  - ``llmgateway.io/promote``: while the migration runs, skip the remaining analysis: weight 100,
    phase ``Succeeded``.
  - ``llmgateway.io/abort``: weight 0 at once, phase ``RolledBack``.
  - ``llmgateway.io/retry``: after ``RolledBack`` or ``Failed``, start again from the first step.

  A command that does not apply (promote or abort after the migration ended, retry before it
  ended, or an annotation already there when the migration was created) is recorded and explained
  in a ``CommandIgnored`` event. Given together in one tick, they are acted on in the order retry,
  abort, promote, so abort wins over promote.
- Changing ``spec.migration`` (anything but ``paused``) mid-step keeps the current weight and restarts
  that step's analysis under the new spec: failed checks, the progress deadline and the check timer
  start again, since checks judged against the old thresholds say nothing under the new ones. If the
  new ``steps`` no longer contain the current weight, the next pass moves to the first new step above
  it. After ``Succeeded`` the migration stays succeeded; after ``RolledBack`` or ``Failed`` it stays
  there until retried.
- ``Succeeded``, ``RolledBack`` and ``Failed`` are final: only commands and spec changes act on them.

State (``status.migration``)
----------------------------
:func:`advance` takes the previous state and returns the next one; nothing else is remembered, so a
restarted operator carries on from the status alone. The caller measures the window since
:func:`window_start` when :func:`check_due` says so. A caller that computes rates from its own
in-memory counter baseline (scraping the proxies without Prometheus) loses that baseline on restart;
it then passes ``None``, the check is inconclusive, and the following one measures normally.

Every field is always present and never null, and a nested object only ever gains keys (lists hold
the parts that vary): the operator writes the status with a JSON merge patch, which merges objects
key by key, so a key left out would keep its old value in the stored status, and a null would delete
it. Unset timestamps are ``""``.

=======================  ===============================================================================
``phase``                Pending, Progressing, Paused, Succeeded, RolledBack or Failed.
``message``              One sentence: why the migration is where it is.
``stepIndex``            Index in ``steps`` of the current step (-1 before the first). After a rollback
                         or failure: the step that failed.
``steps``                The steps in effect (a copy of ``spec.migration.steps``).
``weight``               The gRPC weight to render now.
``stepStartedAt``        When the current step (or its analysis, after a spec change) started.
``weightLiveAt``         When every ready proxy first reported ``weight`` at ``requiredGeneration`` or
                         later. Checks are timed from here.
``lastCheckAt``          When the last check of this step ran.
``pausedAt``             When the migration was paused (while ``Paused``).
``pausedSeconds``        Time spent paused in this step; the progress deadline does not count it.
``failures``             Failed checks in this step.
``inconclusiveChecks``   Inconclusive checks in this step.
``requiredGeneration``   The highest proxy config generation the caller reported for this step's weight.
``lastAnalysis``         The last check: ``time``, ``windowSeconds``, ``sampleCount`` (gRPC requests),
                         ``verdict`` (passed, failed, inconclusive), ``reason``, and ``metrics``: per
                         metric ``name``, ``threshold``, then ``value`` and ``ok``, or ``skipped`` (why).
``history``              The last 20 ended steps: ``step``, ``weight``, ``startedAt``, ``endedAt``,
                         ``result`` (passed, rolledBack, deadlineExceeded, promoted, aborted, specChanged).
``specHash``             Hash of ``spec.migration`` without ``paused``; a change restarts the step.
``observedCommands``     Annotation key -> the value last acted on.
=======================  ===============================================================================

Events (:class:`Action`): MigrationStarted, StepStarted, WeightLive, WeightNotLive, CheckPassed,
CheckInconclusive, CheckFailed (Warning), StepAdvanced, Succeeded, RolledBack (Warning),
ProgressDeadlineExceeded (Warning), Paused, Resumed, Promoted, Aborted (Warning), Retried,
SpecChanged, CommandIgnored.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .spec import GROUP, parse_duration, shown, with_defaults

PROMOTE = f"{GROUP}/promote"
ABORT = f"{GROUP}/abort"
RETRY = f"{GROUP}/retry"
# The order commands given in one tick are acted on: a retry first (it only applies to an ended
# migration), then abort before promote, so that asking for both leaves the traffic on REST.
COMMANDS = (RETRY, ABORT, PROMOTE)

PENDING = "Pending"
PROGRESSING = "Progressing"
PAUSED = "Paused"
SUCCEEDED = "Succeeded"
ROLLED_BACK = "RolledBack"
FAILED = "Failed"
FINAL_PHASES = frozenset({SUCCEEDED, ROLLED_BACK, FAILED})

HISTORY_LIMIT = 20
# A command's value is quoted in messages and events up to this many characters (an ellipsis and its length
# mark a cut); status.migration.observedCommands keeps it whole, as the value acted on.
TOKEN_LIMIT = 256
# What a step starts with: no live weight yet, no check, not paused, nothing counted.
_FRESH_STEP_CLOCKS: dict[str, Any] = {
    "weightLiveAt": "",
    "lastCheckAt": "",
    "pausedAt": "",
    "pausedSeconds": 0.0,
    "failures": 0,
    "inconclusiveChecks": 0,
}


@dataclass(frozen=True)
class Measurements:
    """What the metrics said about one analysis window, for one gateway (all proxies summed)."""

    window_seconds: float
    grpc_requests: int  # requests that went on the gRPC path in the window
    grpc_errors: int  # of those, failed with a server-side error (5xx / UNAVAILABLE / INTERNAL / timeouts)
    grpc_p99_seconds: float | None  # None (or NaN, as Prometheus says it) when no data
    rest_p99_seconds: float | None
    grpc_ttft_p99_seconds: float | None


@dataclass(frozen=True)
class Proxies:
    """What the proxies report right now (read back each tick, never trusted from memory)."""

    ready: int  # ready proxy replicas
    # One entry per ready proxy: the gRPC weight it exports (llmgw_route_grpc_weight) and the config
    # generation it runs (llmgw_config_generation). A proxy whose metrics could not be read is missing.
    live_weights: tuple[int, ...]
    live_generations: tuple[int, ...]


@dataclass(frozen=True)
class Action:
    """An event to record on the gateway: a distinct ``reason`` per kind of change."""

    type: str  # "Normal" | "Warning"
    reason: str
    message: str


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with a ``Z``; fractions of a second only when there are some."""
    moment = moment.astimezone(UTC)
    pattern = "%Y-%m-%dT%H:%M:%S.%fZ" if moment.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return moment.strftime(pattern)


def parse_time(text: str) -> datetime | None:
    """The moment :func:`format_time` wrote; None for ``""`` (unset)."""
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _known(value: float | None) -> float | None:
    """A measured value, or None when there is none (Prometheus says NaN for "no data")."""
    if value is None or math.isnan(value):
        return None
    return float(value)


def _seconds_text(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if math.isinf(seconds):
        return "above the largest histogram bucket"
    return f"{seconds:.3g}s" if seconds >= 1 else f"{seconds * 1000:.3g}ms"


@dataclass(frozen=True)
class _Plan:
    """``spec.migration`` parsed once per call: durations in seconds, thresholds, the spec hash."""

    steps: tuple[int, ...]
    interval: float
    interval_text: str
    max_error_rate: float
    max_p99: float
    max_p99_text: str
    max_ratio: float | None
    max_ttft: float | None
    max_ttft_text: str
    min_requests: int
    failure_limit: int
    progress_deadline: float
    progress_deadline_text: str
    paused: bool
    spec_hash: str

    @classmethod
    def parse(cls, migration_spec: dict[str, Any]) -> _Plan:
        # The caller passes the defaulted spec; defaulting again is idempotent and makes the hash of
        # "{}" and of the same defaults spelled out equal.
        spec = with_defaults({"migration": dict(migration_spec)})["migration"]
        analysis = spec["analysis"]
        ratio = analysis.get("maxP99LatencyRatio")
        ttft_text = analysis.get("maxTimeToFirstToken", "")
        hashed = {key: value for key, value in spec.items() if key != "paused"}
        return cls(
            steps=tuple(sorted(set(spec["steps"]))),
            interval=parse_duration(spec["interval"]),
            interval_text=spec["interval"],
            max_error_rate=float(analysis["maxErrorRate"]),
            max_p99=parse_duration(analysis["maxP99Latency"]),
            max_p99_text=analysis["maxP99Latency"],
            max_ratio=None if ratio is None else float(ratio),
            max_ttft=parse_duration(ttft_text) if ttft_text else None,
            max_ttft_text=ttft_text,
            min_requests=int(analysis["minRequests"]),
            failure_limit=int(spec["failureLimit"]),
            progress_deadline=parse_duration(spec["progressDeadline"]),
            progress_deadline_text=spec["progressDeadline"],
            paused=bool(spec.get("paused", False)),
            spec_hash=hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()[:16],
        )


def _blank_state(plan: _Plan) -> dict[str, Any]:
    return {
        "phase": PENDING,
        "message": "",
        "stepIndex": -1,
        "steps": list(plan.steps),
        "weight": 0,
        "stepStartedAt": "",
        **_FRESH_STEP_CLOCKS,
        "requiredGeneration": 0,
        "lastAnalysis": {},
        "history": [],
        "specHash": plan.spec_hash,
        "observedCommands": {},
    }


def window_start(state: dict[str, Any]) -> datetime | None:
    """Start of the window the next check measures: the last check, or when the weight went live."""
    return parse_time(state.get("lastCheckAt", "")) or parse_time(state.get("weightLiveAt", ""))


def _check_due_at(plan: _Plan, state: dict[str, Any], now: datetime) -> bool:
    start = window_start(state)
    return start is not None and now >= start + timedelta(seconds=plan.interval)


def next_check_at(migration_spec: dict[str, Any], state: dict[str, Any]) -> datetime | None:
    """When the next check falls due (for scheduling the next tick), or None if none is scheduled."""
    start = window_start(state)
    if start is None or state.get("phase") != PROGRESSING:
        return None
    return start + timedelta(seconds=_Plan.parse(migration_spec).interval)


def check_due(migration_spec: dict[str, Any], state: dict[str, Any], now: datetime) -> bool:
    """Whether :func:`advance` will run a check at ``now``, i.e. whether to fetch measurements."""
    plan = _Plan.parse(migration_spec)
    if state.get("phase") != PROGRESSING or plan.paused or state.get("specHash") != plan.spec_hash:
        return False  # a pause or a spec change is applied first, and neither checks
    return _check_due_at(plan, state, _utc(now))


def initial_weight(migration_spec: dict[str, Any], state: dict[str, Any]) -> int:
    """The gRPC weight to render for ``state``: 0 before the migration has state."""
    return max(0, min(100, int(state.get("weight", 0))))


def summary(state: dict[str, Any]) -> str:
    """One line for people (the CLI): phase, weight, and why."""
    if not state:
        return "not started"
    return (
        f"{state.get('phase', PENDING)} at gRPC weight {state.get('weight', 0)}%: {state.get('message', '')}"
    )


@dataclass(frozen=True)
class _Verdict:
    result: str  # passed | failed | inconclusive
    reason: str  # why inconclusive; the failing metrics; or what passed
    record: dict[str, Any]  # lastAnalysis


def _metric(name: str, value: float | None, threshold: float, skipped: str = "") -> dict[str, Any]:
    item: dict[str, Any] = {"name": name, "threshold": threshold}
    if value is None:
        item["skipped"] = skipped
    elif math.isinf(value):
        # JSON has no infinity: a p99 beyond the last histogram bucket is recorded without a value.
        item.update(ok=False, note="above the largest histogram bucket")
    else:
        item.update(value=round(value, 6), ok=value <= threshold)
    return item


def _analyse(
    plan: _Plan, measured: Measurements | None, default_window: float, now: datetime, unavailable: str = ""
) -> _Verdict:
    def verdict(
        result: str, reason: str, requests: int, window: float, metrics: list[dict[str, Any]]
    ) -> _Verdict:
        record = {
            "time": format_time(now),
            "windowSeconds": round(window, 3),
            "sampleCount": requests,
            "verdict": result,
            "reason": reason,
            "metrics": metrics,
        }
        return _Verdict(result, reason, record)

    if measured is None:
        # Why there are none, when the caller knows (Prometheus unreachable, a proxy unreadable).
        reason = shown(unavailable, 512) if unavailable else "no metrics for the window"
        return verdict("inconclusive", reason, 0, default_window, [])
    requests = max(0, measured.grpc_requests)
    window = measured.window_seconds if math.isfinite(measured.window_seconds) else default_window
    error_rate = max(0, measured.grpc_errors) / requests if requests else None
    grpc_p99 = _known(measured.grpc_p99_seconds)
    rest_p99 = _known(measured.rest_p99_seconds)
    ttft = _known(measured.grpc_ttft_p99_seconds)

    # Per metric: its record in lastAnalysis, what was measured and the threshold, for messages.
    checks = [
        (
            _metric("errorRate", error_rate, plan.max_error_rate, "no gRPC requests"),
            f"gRPC error rate {error_rate or 0:.4g} ({measured.grpc_errors} of {requests} requests)",
            f"maxErrorRate {plan.max_error_rate:g}",
        ),
        (
            _metric("p99Latency", grpc_p99, plan.max_p99, "no gRPC latency data"),
            f"gRPC p99 latency {_seconds_text(grpc_p99)}",
            f"maxP99Latency {plan.max_p99_text}",
        ),
    ]
    if plan.max_ratio is not None:
        ratio = (
            grpc_p99 / rest_p99 if grpc_p99 is not None and rest_p99 is not None and rest_p99 > 0 else None
        )
        checks.append(
            (
                _metric("p99LatencyRatio", ratio, plan.max_ratio, "no REST latency data to compare with"),
                f"gRPC/REST p99 latency ratio {ratio:.3g}" if ratio is not None else "",
                f"maxP99LatencyRatio {plan.max_ratio:g}",
            )
        )
    if plan.max_ttft is not None:
        checks.append(
            (
                _metric("timeToFirstToken", ttft, plan.max_ttft, "no gRPC streams"),
                f"gRPC p99 time to first token {_seconds_text(ttft)}",
                f"maxTimeToFirstToken {plan.max_ttft_text}",
            )
        )
    metrics = [record for record, _, _ in checks]

    if requests < plan.min_requests:
        reason = f"{requests} gRPC requests in the window, fewer than minRequests {plan.min_requests}"
        return verdict("inconclusive", reason, requests, window, metrics)
    if grpc_p99 is None:
        return verdict("inconclusive", "no gRPC latency data", requests, window, metrics)
    failing = [
        f"{measured_text} exceeds {limit}"
        for record, measured_text, limit in checks
        if record.get("ok") is False
    ]
    if failing:
        return verdict("failed", "; ".join(failing), requests, window, metrics)
    passing = [
        f"{measured_text} within {limit}" for record, measured_text, limit in checks if record.get("ok")
    ]
    return verdict("passed", "; ".join(passing), requests, window, metrics)


class _Tick:
    """One call of :func:`advance`: works on a copy of the state and collects the events."""

    def __init__(
        self,
        plan: _Plan,
        state: dict[str, Any],
        proxies: Proxies,
        config_generation: int,
        now: datetime,
        unavailable: str = "",
    ) -> None:
        self.plan = plan
        self.unavailable = unavailable
        self.state = state
        self.proxies = proxies
        self.config_generation = config_generation
        self.now = now
        self.actions: list[Action] = []

    # -- small helpers -------------------------------------------------------------------------------

    def emit(self, reason: str, message: str, warning: bool = False) -> None:
        self.actions.append(Action("Warning" if warning else "Normal", reason, message))

    def say(self, sentence: str) -> None:
        # "gRPC" keeps its case at the start of a sentence.
        self.state["message"] = (
            sentence if sentence.startswith("gRPC") else sentence[0].upper() + sentence[1:]
        )

    def position(self) -> str:
        """Where the migration is, for messages: "step 2/4 (gRPC weight 25%)"."""
        steps, index, weight = self.state["steps"], self.state["stepIndex"], self.state["weight"]
        if 0 <= index < len(steps) and steps[index] == weight:
            return f"step {index + 1}/{len(steps)} (gRPC weight {weight}%)"
        following = self.next_weight()
        return f"gRPC weight {weight}% (kept across a spec change; next step {following}%)"

    def next_weight(self) -> int | None:
        """The first step above the current weight; None at 100."""
        steps = self.state["steps"]
        index = bisect.bisect_right(steps, self.state["weight"])
        return steps[index] if index < len(steps) else None

    def started(self) -> bool:
        return bool(self.state["stepStartedAt"])

    def next_check_text(self) -> str:
        start = window_start(self.state)
        assert start is not None
        return format_time(start + timedelta(seconds=self.plan.interval))

    def enter_step(self, weight: int) -> None:
        self.state.update(
            stepIndex=bisect.bisect_right(self.state["steps"], weight) - 1,
            weight=weight,
            stepStartedAt=format_time(self.now),
            **_FRESH_STEP_CLOCKS,
            # The generation the caller passes this tick may be the one of the previous weight; the
            # weight comparison covers that, and the next tick's generation raises this.
            requiredGeneration=self.config_generation,
        )

    def end_step(self, result: str) -> None:
        state = self.state
        entry = {
            "step": state["stepIndex"],
            "weight": state["weight"],
            "startedAt": state["stepStartedAt"],
            "endedAt": format_time(self.now),
            "result": result,
        }
        state["history"] = [*state["history"], entry][-HISTORY_LIMIT:]

    def deadline_passed(self) -> bool:
        started = parse_time(self.state["stepStartedAt"])
        assert started is not None
        elapsed = (self.now - started).total_seconds() - float(self.state["pausedSeconds"])
        return elapsed > self.plan.progress_deadline

    # -- the tick ------------------------------------------------------------------------------------

    def run(self, measurements: Measurements | None, commands: dict[str, str], fresh: bool) -> None:
        if not fresh:
            self.apply_spec_change()
        self.apply_commands(commands, ignore_all=fresh)
        if self.state["phase"] in FINAL_PHASES:
            return
        self.apply_pause()
        if self.state["phase"] == PAUSED:
            return
        if self.state["phase"] == PENDING:
            self.start()
            return  # the new weight is not even rendered yet: nothing to observe this tick
        self.progress(measurements)

    def apply_spec_change(self) -> None:
        state, plan = self.state, self.plan
        if state["specHash"] == plan.spec_hash:
            return
        state["specHash"] = plan.spec_hash
        state["steps"] = list(plan.steps)
        phase = state["phase"]
        if phase in (PROGRESSING, PAUSED) and self.started():
            self.end_step("specChanged")
            weight = state["weight"]
            self.enter_step(weight)  # keeps the weight: resets failures, timers and the deadline
            if phase == PAUSED:
                state["pausedAt"] = format_time(self.now)
            self.emit(
                "SpecChanged",
                f"spec.migration changed: the analysis of gRPC weight {weight}% restarts under the new spec"
                " (the weight is kept; failed checks and the progress deadline start again)",
            )
        elif phase in (PENDING, PAUSED):
            self.emit(
                "SpecChanged", "spec.migration changed before the first step: the migration will follow it"
            )
        elif phase == SUCCEEDED:
            state["stepIndex"] = len(state["steps"]) - 1
            self.emit("SpecChanged", "spec.migration changed after the migration succeeded: nothing to redo")
        else:
            self.emit(
                "SpecChanged",
                f"spec.migration changed; the migration stays {phase} until the annotation {RETRY}"
                " starts it again with the new spec",
            )

    def apply_commands(self, commands: dict[str, str], ignore_all: bool) -> None:
        observed = self.state["observedCommands"]
        for key in COMMANDS:
            token = commands.get(key)
            if token is None or observed.get(key) == token:
                continue
            observed[key] = token
            token = shown(token, TOKEN_LIMIT)  # as messages and events quote it
            if ignore_all:
                # A command is a change of the annotation; one already there when the migration was
                # created (copied from another gateway, left from an earlier migration) is not one.
                self.emit(
                    "CommandIgnored",
                    f"{key}={token} was there before the migration started; change its value to give it",
                )
            elif key == RETRY:
                self.retry(token)
            elif key == ABORT:
                self.abort(token)
            else:
                self.promote(token)

    def ignore(self, key: str, token: str, why: str) -> None:
        self.emit("CommandIgnored", f"{key}={token} ignored: {why}")

    def retry(self, token: str) -> None:
        phase = self.state["phase"]
        if phase not in (ROLLED_BACK, FAILED):
            self.ignore(RETRY, token, f"only a RolledBack or Failed migration can be retried; it is {phase}")
            return
        self.state.update(
            phase=PENDING,
            stepIndex=-1,
            weight=0,
            stepStartedAt="",
            **_FRESH_STEP_CLOCKS,
        )
        self.emit(
            "Retried", f"{RETRY}={token}: the migration starts again from its first step (it was {phase})"
        )
        self.say("waiting for a ready proxy before starting the migration again.")

    def abort(self, token: str) -> None:
        state = self.state
        phase = state["phase"]
        if phase in FINAL_PHASES:
            why = (
                "the migration succeeded; to send traffic back to REST, replace spec.migration by"
                " spec.grpcWeight: 0"
                if phase == SUCCEEDED
                else f"the migration is already {phase} at gRPC weight 0%"
            )
            self.ignore(ABORT, token, why)
            return
        where = self.position() if self.started() else "before the first step"
        if self.started():
            self.end_step("aborted")
        state.update(phase=ROLLED_BACK, weight=0, pausedAt="")
        self.emit(
            "Aborted", f"{ABORT}={token}: aborted at {where}; gRPC weight 0%, all traffic on REST", True
        )
        self.say(f"aborted by {ABORT}={token} at {where}: all traffic on REST.")

    def promote(self, token: str) -> None:
        state = self.state
        phase = state["phase"]
        if phase == SUCCEEDED:
            self.ignore(PROMOTE, token, "the migration already succeeded")
            return
        if phase in FINAL_PHASES:
            # Only a retry leaves RolledBack and Failed, so abort-then-promote cannot undo a rollback.
            self.ignore(PROMOTE, token, f"the migration is {phase}; retry it with {RETRY} first")
            return
        where = self.position() if self.started() else "before the first step"
        if self.started():
            self.end_step("promoted")
        state.update(phase=SUCCEEDED, weight=100, stepIndex=len(state["steps"]) - 1, pausedAt="")
        self.emit(
            "Promoted", f"{PROMOTE}={token}: promoted from {where} to gRPC weight 100% without further checks"
        )
        self.say(f"promoted by {PROMOTE}={token}: all traffic on gRPC.")

    def apply_pause(self) -> None:
        state = self.state
        if self.plan.paused and state["phase"] in (PENDING, PROGRESSING):
            state.update(phase=PAUSED, pausedAt=format_time(self.now))
            where = self.position() if self.started() else "before the first step"
            self.emit("Paused", f"paused at {where}: no checks until spec.migration.paused is false")
            self.say(f"paused at {where} by spec.migration.paused.")
        elif not self.plan.paused and state["phase"] == PAUSED:
            paused_at = parse_time(state["pausedAt"]) or self.now
            state["pausedAt"] = ""
            if not self.started():
                state["phase"] = PENDING
                self.emit("Resumed", "resumed before the first step")
                return
            state.update(
                phase=PROGRESSING,
                pausedSeconds=float(state["pausedSeconds"]) + (self.now - paused_at).total_seconds(),
                # What the proxies ran while paused is unknown: see the weight live again, then wait
                # a full interval before judging it.
                weightLiveAt="",
                lastCheckAt="",
            )
            self.emit("Resumed", f"resumed at {self.position()}: its analysis starts again")

    def start(self) -> None:
        if self.proxies.ready < 1:
            self.say("waiting for a ready proxy before starting the migration.")
            return
        steps = self.state["steps"]
        self.state["phase"] = PROGRESSING
        self.enter_step(steps[0])
        self.emit(
            "MigrationStarted",
            f"migrating from REST to gRPC through gRPC weights {', '.join(map(str, steps))}%,"
            f" checking every {self.plan.interval_text}",
        )
        self.emit("StepStarted", f"{self.position()}: waiting for every ready proxy to run it")
        self.say(f"{self.position()}: waiting for every ready proxy to run it.")

    def weight_live(self) -> tuple[bool, str]:
        """(whether every ready proxy runs the weight from the required generation or later, why not)."""
        proxies, weight = self.proxies, self.state["weight"]
        generation = self.state["requiredGeneration"]
        if proxies.ready < 1:
            return False, "no proxy is ready"
        reported = min(len(proxies.live_weights), len(proxies.live_generations))
        if reported < proxies.ready:
            return False, f"{reported} of {proxies.ready} ready proxies reported their weight"
        running = sum(
            1
            for live_weight, live_generation in zip(
                proxies.live_weights, proxies.live_generations, strict=False
            )
            if live_weight == weight and live_generation >= generation
        )
        if running < proxies.ready:
            return (
                False,
                f"{running} of {proxies.ready} ready proxies run it (config generation {generation})",
            )
        return True, ""

    def progress(self, measurements: Measurements | None) -> None:
        state = self.state
        state["requiredGeneration"] = max(int(state["requiredGeneration"]), self.config_generation)
        live, why_not = self.weight_live()
        if not state["weightLiveAt"]:
            if live:
                state["weightLiveAt"] = format_time(self.now)
                self.emit(
                    "WeightLive",
                    f"{self.position()} is live on all {self.proxies.ready} ready proxies;"
                    f" checks every {self.plan.interval_text} from now",
                )
                self.say(f"{self.position()} is live; first check at {self.next_check_text()}.")
            else:
                self.wait(why_not)
            return
        if not live:
            state.update(weightLiveAt="", lastCheckAt="")
            self.emit(
                "WeightNotLive",
                f"{self.position()} is no longer live on every ready proxy ({why_not});"
                " its analysis starts again once it is",
            )
            self.wait(why_not)
            return
        if _check_due_at(self.plan, state, self.now):
            self.check(measurements)

    def wait(self, why_not: str) -> None:
        if self.deadline_passed():
            self.fail(f"waiting for every ready proxy to run it: {why_not}")
            return
        self.say(f"{self.position()}: waiting for every ready proxy to run it: {why_not}.")

    def check(self, measurements: Measurements | None) -> None:
        state = self.state
        start = window_start(state)
        assert start is not None
        verdict = _analyse(
            self.plan, measurements, (self.now - start).total_seconds(), self.now, self.unavailable
        )
        state.update(lastCheckAt=format_time(self.now), lastAnalysis=verdict.record)
        where = self.position()
        if verdict.result == "inconclusive":
            state["inconclusiveChecks"] += 1
            self.emit("CheckInconclusive", f"{where}: check inconclusive ({verdict.reason}); the step holds")
            if self.deadline_passed():
                self.fail(f"checks inconclusive: {verdict.reason}")
                return
            self.say(
                f"{where}: the last check was inconclusive ({verdict.reason});"
                f" next check at {self.next_check_text()}."
            )
        elif verdict.result == "failed":
            state["failures"] += 1
            failures, limit = state["failures"], self.plan.failure_limit
            self.emit(
                "CheckFailed",
                f"{where}: check failed ({failures} of {limit} allowed): {verdict.reason}",
                True,
            )
            if failures >= limit:
                self.roll_back(verdict.reason)
                return
            self.say(
                f"{where}: {failures} of {limit} allowed checks failed ({verdict.reason});"
                f" next check at {self.next_check_text()}."
            )
        else:
            self.emit("CheckPassed", f"{where}: check passed: {verdict.reason}")
            self.pass_step()

    def pass_step(self) -> None:
        state = self.state
        self.end_step("passed")
        following = self.next_weight()
        if following is None:
            state["phase"] = SUCCEEDED
            self.emit("Succeeded", "migration complete: every request takes the gRPC path (gRPC weight 100%)")
            self.say("migrated: every request takes the gRPC path, all steps passed.")
            return
        passed = self.position()
        self.enter_step(following)
        self.emit("StepAdvanced", f"{passed} passed; now {self.position()}")
        self.say(f"{self.position()}: waiting for every ready proxy to run it.")

    def roll_back(self, reason: str) -> None:
        state = self.state
        where, failures = self.position(), state["failures"]
        self.end_step("rolledBack")
        state.update(phase=ROLLED_BACK, weight=0)
        text = (
            f"rolled back at {where} to gRPC weight 0% (all traffic on REST)"
            f" after {failures} failed checks: {reason}"
        )
        self.emit("RolledBack", text, True)
        self.say(text + ".")

    def fail(self, why: str) -> None:
        state = self.state
        where = self.position()
        self.end_step("deadlineExceeded")
        state.update(phase=FAILED, weight=0)
        text = (
            f"{where} did not pass within progressDeadline {self.plan.progress_deadline_text} ({why});"
            " gRPC weight 0%, all traffic on REST"
        )
        self.emit("ProgressDeadlineExceeded", text, True)
        self.say(text + ".")


def advance(
    migration_spec: dict[str, Any],
    state: dict[str, Any],
    proxies: Proxies,
    measurements: Measurements | None,
    config_generation: int,
    now: datetime,
    commands: dict[str, str],
    unavailable: str = "",
) -> tuple[dict[str, Any], list[Action]]:
    """One tick of the migration: the next ``status.migration`` and the events to record.

    ``state`` is the previous ``status.migration`` (``{}`` for a new migration; never modified);
    ``measurements`` covers the window since :func:`window_start` and is used only when a check is due
    (None then means "no metrics": inconclusive); ``config_generation`` is the proxy config generation
    the caller rendered for ``state["weight"]``; ``commands`` the gateway's annotations (only the
    ``llmgateway.io/{promote,abort,retry}`` keys matter; a value is quoted in messages up to
    :data:`TOKEN_LIMIT` characters); ``unavailable`` says why there are no measurements, when the caller
    knows (e.g. "cannot reach Prometheus at URL: ..."), for the inconclusive check's reason. Every time is
    judged against ``now``.
    """
    plan = _Plan.parse(migration_spec)
    fresh = not state
    working = {**_blank_state(plan), **copy.deepcopy(state)}
    tick = _Tick(plan, working, proxies, int(config_generation), _utc(now), unavailable)
    tick.run(measurements, commands, fresh)
    return tick.state, tick.actions
