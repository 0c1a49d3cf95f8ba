"""What the adversarial suites share: the proxy's memory, descriptors and CPU read from /proc, its limit hits
read from the admin port, and the honest client that keeps asking while an attack runs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from typing import Final

import aiohttp

from llmgw_common.limits import MiB

MEMORY_BOUND: Final = 64 * MiB  # what an attack may grow the proxy by
HONEST_LATENCY: Final = 2.0  # seconds: a loose bound on an honest answer, on a loaded 2-core machine
_LIMIT_HIT = re.compile(r'^llmgw_limit_hits_total\{limit="([^"]+)"\} (\S+)$', re.M)


def rss(pid: int | None = None) -> int:
    """The resident memory of process ``pid`` (this one by default), in bytes."""
    with open(f"/proc/{pid or 'self'}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def limit_hits(admin_port: int, block: str = "") -> dict[str, float]:
    """``llmgw_limit_hits_total`` by limit (``<block>.<key>``); with ``block``, that block's, by key."""
    async with aiohttp.ClientSession() as session:
        text = await (await session.get(f"http://127.0.0.1:{admin_port}/metrics")).text()
    hits = {limit: float(value) for limit, value in _LIMIT_HIT.findall(text)}
    if not block:
        return hits
    return {limit.removeprefix(f"{block}."): n for limit, n in hits.items() if limit.startswith(f"{block}.")}


class HonestClient:
    """A client that asks all along while an attack runs (``async with``): on leaving, it must have had one
    more answer after the attack, no failure, and (with ``latency_bound``) no slow answer. A subclass
    defines :meth:`ask`, and may open and close what it needs in :meth:`setup` and :meth:`teardown`."""

    pause = 0.02  # between two questions
    latency_bound: float | None = HONEST_LATENCY

    def __init__(self) -> None:
        self.answers = 0
        self.slowest = 0.0
        self.failures: list[str] = []
        self._task: asyncio.Task[None] | None = None

    async def ask(self) -> str | None:
        """One question: None when answered, else what went wrong."""
        raise NotImplementedError

    async def setup(self) -> None:
        """Before the first question."""

    async def teardown(self) -> None:
        """After the last question."""

    async def _once(self) -> None:
        started = time.monotonic()
        failure = await self.ask()
        self.slowest = max(self.slowest, time.monotonic() - started)
        if failure is None:
            self.answers += 1
        else:
            self.failures.append(failure)

    async def _run(self) -> None:
        while True:
            await self._once()
            await asyncio.sleep(self.pause)

    async def __aenter__(self) -> HonestClient:
        await self.setup()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        before = self.answers
        for _ in range(200):  # one more answer, after the attack
            if self.answers > before:
                break
            await asyncio.sleep(0.025)
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.teardown()
        print(f"honest client: {self.answers} answers, slowest {self.slowest:.3f}s")
        if exc[0] is not None:
            return  # the test's own failure says more
        assert self.answers > before, f"the honest client got no answer after the attack: {self.failures}"
        assert not self.failures, self.failures[:5]
        if self.latency_bound is not None:
            assert self.slowest < self.latency_bound, f"an answer took {self.slowest:.2f}s"
