"""pytest plugin: real Prometheus servers on 127.0.0.1, scraping static loopback targets.

Loaded by ``pytest_plugins = [..., "prometheus"]`` in ``conftest.py``. Fixtures:

  prometheus_binary  ``/usr/bin/prometheus`` (Debian's ``prometheus`` package). When it is missing and the
                     tests run as root, it is installed once, right after collection, with
                     ``apt-get install --no-install-recommends prometheus`` (so no node-exporter); otherwise
                     every test that needs it fails, saying how to install it. Nothing is skipped.
  start_prometheus   ``await start_prometheus(targets, scrape_interval=...)`` starts a Prometheus (config,
                     data and log in the test's tmp dir) and waits until it is ready; stopped afterwards.

Only the binary runs, with our own config: no rule files, no alerting, no remote write, and the system's
``prometheus`` service (if the package's install enabled one) is neither used nor started by us.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml

from llmgw_common.config import is_loopback

PROMETHEUS = "/usr/bin/prometheus"
_STATE = pytest.StashKey["str"]()  # the binary's path, or why there is none


def _install(write: Callable[[str], None]) -> str:
    """The binary's path, installing Debian's package when it is missing and we may; else an error text."""
    if os.path.exists(PROMETHEUS):
        return PROMETHEUS
    how = "apt-get update && apt-get install -y --no-install-recommends prometheus"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"ERROR: {PROMETHEUS} is missing; install Debian's package as root: {how}"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    write(f"prometheus: {PROMETHEUS} missing, running: {how}")
    for argv in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            output = proc.stdout[-2000:] + proc.stderr[-2000:]
            return f"ERROR: {' '.join(argv)} exited with {proc.returncode}:\n{output}"
    if not os.path.exists(PROMETHEUS):
        return f"ERROR: the prometheus package was installed but {PROMETHEUS} is not there"
    write(f"prometheus: installed in {time.monotonic() - started:.1f}s")
    return PROMETHEUS


def _state(config: pytest.Config) -> str:
    if _STATE not in config.stash:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capture = config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            config.stash[_STATE] = _install(reporter.write_line)
    return config.stash[_STATE]


def pytest_collection_finish(session: pytest.Session) -> None:
    # Install before the first test, so the apt-get time counts against no test's timeout.
    if session.config.option.collectonly:
        return
    if any("prometheus_binary" in getattr(item, "fixturenames", ()) for item in session.items):
        _state(session.config)


@pytest.fixture(scope="session")
def prometheus_binary(pytestconfig: pytest.Config) -> str:
    state = _state(pytestconfig)
    if state.startswith("ERROR: "):
        pytest.fail(state.removeprefix("ERROR: "), pytrace=False)
    return state


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class Target:
    """One static scrape target (``HOST:PORT`` on loopback) and the labels Prometheus puts on its series."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def _check_loopback(address: str) -> None:
    host = address.rsplit(":", 1)[0].strip("[]")
    if not is_loopback(host):
        raise ValueError(f"scrape target {address} is not on loopback; tests only scrape loopback")


class PrometheusServer:
    """A Prometheus child process with a generated config; :attr:`url` is its HTTP API base URL."""

    def __init__(
        self, binary: str, workdir: pathlib.Path, targets: Sequence[Target], scrape_interval: str
    ) -> None:
        for target in targets:
            _check_loopback(target.address)
        self.targets = list(targets)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "scrape_configs": [
                {
                    "job_name": "llmgw",
                    "static_configs": [
                        {"targets": [t.address], "labels": dict(t.labels)} for t in self.targets
                    ],
                    # Targets known only later (pods): set_targets() writes them here, read within ~1 s.
                    "file_sd_configs": [{"files": [str(workdir / "targets.json")], "refresh_interval": "1s"}],
                }
            ],
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                "--storage.tsdb.retention.time=1h",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.startup_seconds = 0.0

    def set_targets(self, targets: Sequence[Target]) -> None:
        """Scrape these too (file-based discovery; the file is replaced atomically)."""
        for target in targets:
            _check_loopback(target.address)
        groups = [{"targets": [t.address], "labels": dict(t.labels)} for t in targets]
        path = self.config_path.parent / "targets.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        os.replace(tmp, path)
        self.targets = [*self.targets, *targets]

    def output(self) -> str:
        return self.log_path.read_text()

    async def _get(self, path: str, **params: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
            session.get(f"{self.url}{path}", params=params) as response,
        ):
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.output()}")
            try:
                status, _ = await self._get("/-/ready")
                if status == 200:
                    self.startup_seconds = time.monotonic() - self.started
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"prometheus not ready after {timeout}s:\n{self.output()}")

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector (raises on an API error)."""
        status, body = await self._get("/api/v1/query", query=promql)
        if status != 200 or body.get("status") != "success":
            raise AssertionError(f"query {promql!r} failed: HTTP {status}: {body}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def value(self, promql: str) -> float | None:
        result = await self.query(promql)
        return float(result[0]["value"][1]) if result else None

    async def wait_until(
        self, promql: str, check: Callable[[float | None], bool], what: str, timeout: float = 10.0
    ) -> float | None:
        """Poll ``promql`` until ``check`` holds for its value; bounded in time."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.value(promql)
            if check(value):
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what}: {promql} is {value} after {timeout}s\n{self.output()}")

    async def wait_scraped(self, timeout: float = 10.0) -> None:
        """Until every target has been scraped successfully."""
        await self.wait_until(
            "sum(up)", lambda v: v == len(self.targets), f"{len(self.targets)} targets up", timeout
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


StartPrometheus = Callable[..., Awaitable[PrometheusServer]]


@pytest.fixture
async def start_prometheus(prometheus_binary: str, tmp_path: pathlib.Path) -> AsyncIterator[StartPrometheus]:
    """``await start_prometheus([Target("127.0.0.1:PORT", {...}), ...], scrape_interval="1s")``: ready,
    targets not necessarily scraped yet (``await server.wait_scraped()``)."""
    servers: list[PrometheusServer] = []

    async def start(targets: Sequence[Target] = (), scrape_interval: str = "1s") -> PrometheusServer:
        server = PrometheusServer(
            prometheus_binary, tmp_path / f"prometheus-{len(servers)}", targets, scrape_interval
        )
        servers.append(server)
        await server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()
