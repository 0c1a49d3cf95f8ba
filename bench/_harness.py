"""What the benchmarks that start processes share: child processes in their own process groups (killed with
this one), CPU time from /proc, the machine's description, percentiles and the table cells.

The scripts import it as a sibling module (``python bench/proxy_latency.py`` puts ``bench/`` on the path).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import pathlib
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

_T0 = time.monotonic()
READY_TIMEOUT_S = 90.0  # a child's readiness line (SMG fetches a tokenizer first)


def log(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ processes

_LIBC: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:
    """In the child, before exec: its own process group, and SIGTERM when this process dies (Linux)."""
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def llmgw_argv(*args: str) -> list[str]:
    """The ``llmgw`` command of this interpreter (the one the benchmark runs with)."""
    return [sys.executable, "-m", "llmgw_common.cli", *args]


def raise_on_sigterm(signum: int, frame: Any) -> None:
    """A SIGTERM handler: unwinds like Ctrl-C, so that every child is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


class Child:
    """One child process, its output in a log file, in its own process group (killed with this one)."""

    def __init__(self, name: str, argv: list[str], log_path: pathlib.Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,  # children start before this process has any thread
            close_fds=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")

    def wait_for(self, pattern: str, timeout: float = READY_TIMEOUT_S) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output())
            if match:
                return match
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready within {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.02)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to its process group, SIGKILL after ``grace``; always reaped."""
        try:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(grace)
        finally:
            self._log.close()


# ---------------------------------------------------------------------------------------- CPU accounting

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None where /proc is not available."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_seconds() -> float | None:
    """CPU seconds the machine has spent busy since boot (all CPUs, /proc/stat); None if unknown."""
    try:
        first = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if first[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait (guest is in user)
    values = [int(v) for v in first[1:9]]
    return (sum(values) - values[3] - values[4]) / _CLK_TCK


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def command_line() -> str:
    exe = sys.executable
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(exe)
        if not rel.startswith(".."):
            exe = rel
    return shlex.join([exe, *sys.argv])


# ------------------------------------------------------------------------------------------ the tables


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(us: float) -> str:
    return "n/a" if math.isnan(us) else f"{us / 1000:.3f} ms"


def signed_ms(us: float) -> str:
    return "n/a" if math.isnan(us) else f"{us / 1000:+.3f} ms"


def met(ok: bool | None) -> str:
    return "not measured" if ok is None else "yes" if ok else "**no**"
