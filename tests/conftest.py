"""Shared fixtures: real fake providers and real proxies on 127.0.0.1, ports chosen by the OS."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import yaml

from llmgw import grpc_env

grpc_env.apply()  # in-process servers and clients run gRPC as llmgw's processes do

from llmgw.server import ProxyServer  # noqa: E402
from llmgw_dev.fakes import FakeProvider  # noqa: E402

pytest_plugins = ["k8s", "prometheus"]

ROOT = pathlib.Path(__file__).resolve().parent.parent
LLMGW = str(pathlib.Path(sys.executable).parent / "llmgw")


class Fakes:
    def __init__(self, openai: FakeProvider, anthropic: FakeProvider, grpc: FakeProvider) -> None:
        self.openai, self.anthropic, self.grpc = openai, anthropic, grpc


@pytest.fixture
async def fakes() -> AsyncIterator[Fakes]:
    async with (
        FakeProvider("openai") as openai,
        FakeProvider("anthropic") as anthropic,
        FakeProvider("grpc") as grpc,
    ):
        yield Fakes(openai, anthropic, grpc)


def proxy_config(fakes: Fakes, **overrides: Any) -> dict[str, Any]:
    """A proxy config in front of the fakes: demo-model (split), demo-claude, rest-only, grpc-only."""
    config: dict[str, Any] = {
        "generation": 1,
        "listen": {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"},
        "reloadIntervalSeconds": 0.1,
        "shutdown": {"drainSeconds": 5},
        "providers": [
            {
                "name": "openai-fake",
                "openai": {"baseURL": fakes.openai.base_url},
                "retries": {"maxAttempts": 3, "initialBackoffSeconds": 0.01, "maxBackoffSeconds": 0.05},
            },
            {"name": "anthropic-fake", "anthropic": {"baseURL": fakes.anthropic.base_url}},
            {
                "name": "grpc-fake",
                "llmgateway": {"target": fakes.grpc.target},
                "retries": {"maxAttempts": 3, "initialBackoffSeconds": 0.01, "maxBackoffSeconds": 0.05},
            },
        ],
        "routes": [
            {"model": "demo-model", "rest": "openai-fake", "grpc": "grpc-fake", "grpcWeight": 50},
            {"model": "demo-claude", "rest": "anthropic-fake"},
            {"model": "rest-only", "rest": "openai-fake", "upstreamModel": "demo-model"},
            {"model": "grpc-only", "grpc": "grpc-fake", "upstreamModel": "demo-model"},
        ],
    }
    config.update(overrides)
    return config


def set_weight(config: dict[str, Any], weight: int, model: str = "demo-model") -> dict[str, Any]:
    for route in config["routes"]:
        if route["model"] == model:
            route["grpcWeight"] = weight
    return config


@pytest.fixture
async def start_proxy(
    tmp_path: pathlib.Path,
) -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[ProxyServer]]]:
    """Start an in-process proxy from a config dict; its config file is ``server.config_path``."""
    servers: list[ProxyServer] = []

    async def start(config: dict[str, Any]) -> ProxyServer:
        path = tmp_path / f"proxy-{len(servers)}.yaml"
        path.write_text(yaml.safe_dump(config))
        server = ProxyServer(str(path))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.drain()


@pytest.fixture
def certificate(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key: (cert file, key file)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def write_config(path: pathlib.Path, config: dict[str, Any]) -> None:
    """Replace the file atomically, as kubelet does for a ConfigMap volume."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    os.replace(tmp, path)


class ProxyProcess:
    """``llmgw proxy`` in a child process; the ports come from its startup log line."""

    def __init__(self, config_path: pathlib.Path, env: dict[str, str] | None = None) -> None:
        self.log_path = config_path.with_suffix(".log")
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [LLMGW, "proxy", "--config", str(config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.grpc_port = self.rest_port = self.admin_port = 0

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"gRPC on port (\d+), REST on port (\d+), admin on port (\d+)")
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_text())
            if match:
                self.grpc_port, self.rest_port, self.admin_port = map(int, match.groups())
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"proxy not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


@pytest.fixture
def proxy_process(tmp_path: pathlib.Path) -> Iterator[Callable[..., ProxyProcess]]:
    procs: list[ProxyProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> ProxyProcess:
        path = tmp_path / f"proxy-process-{len(procs)}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = ProxyProcess(path, env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
