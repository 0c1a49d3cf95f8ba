"""h2spec, an independent HTTP/2 conformance suite, against llmgw's gRPC server (``llmgw._net.grpc_server``).

h2spec (github.com/summerwind/h2spec) sends 145 cases of well-formed and malformed HTTP/2: bad frame
sizes, frames on idle or closed streams, flow-control edge cases, HPACK errors, malformed requests. Each
case expects the error RFC 7540/9113 names, or a normal answer; they run in cleartext and over TLS. The
binary is built once with the Go toolchain (the one the local control plane is built with) and kept in
``~/.cache/llmgw/h2spec/VERSION/``.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import ssl
import subprocess
import tempfile

import pytest
from grpc_health.v1 import health_pb2

from llmgw._net.grpc_server import UNARY, Method, Server, ServerCall
from llmgw_common.limits import HTTP2Limits

H2SPEC_MODULE = "github.com/summerwind/h2spec/cmd/h2spec"
H2SPEC_VERSION = "v2.2.1+incompatible"

pytestmark = pytest.mark.slow


def _go() -> str | None:
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and pathlib.Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def h2spec() -> pathlib.Path:
    cache = pathlib.Path.home() / ".cache" / "llmgw" / "h2spec" / H2SPEC_VERSION
    binary = cache / "h2spec"
    if binary.is_file():
        return binary
    go = _go()
    if go is None:
        pytest.skip("no Go toolchain to build h2spec with")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmgw-h2spec-") as scratch:  # Go's caches: gone afterwards
        env = {
            **os.environ,
            "GOBIN": str(cache),
            "GOPATH": f"{scratch}/gopath",
            "GOMODCACHE": f"{scratch}/gomod",
            "GOCACHE": f"{scratch}/gocache",
            "GOTOOLCHAIN": "local",
            "CGO_ENABLED": "0",
        }
        subprocess.run(
            [go, "install", f"{H2SPEC_MODULE}@{H2SPEC_VERSION}"],
            env=env,
            check=True,
            capture_output=True,
            timeout=600,
        )
        subprocess.run(["chmod", "-R", "u+w", scratch], check=False)  # Go's module cache is read-only
    return binary


@pytest.mark.parametrize("tls", [False, True], ids=["cleartext", "tls"])
async def test_h2spec_finds_no_violation(
    h2spec: pathlib.Path, tls: bool, certificate: tuple[pathlib.Path, pathlib.Path]
) -> None:
    async def echo(request: health_pb2.HealthCheckRequest, call: ServerCall) -> health_pb2.HealthCheckRequest:
        return request

    server = Server(
        {"/t.S/Echo": Method(UNARY, health_pb2.HealthCheckRequest, echo)},
        HTTP2Limits(max_message_bytes=1 << 20),
    )
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*certificate)
    port = await server.start("127.0.0.1", 0, context)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(h2spec),
            *(["--tls", "--insecure"] if tls else []),  # TLS with ALPN "h2"; the certificate is self-signed
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), 110)
    finally:
        await server.stop(0)
    text = output.decode(errors="replace")
    summary = text.strip().splitlines()[-1]
    failures = [
        line.strip() for line in text.splitlines() if line.strip().startswith("\u00d7")
    ]  # a failed case
    assert proc.returncode == 0 and " 0 failed" in summary, f"{summary}\n" + "\n".join(failures)
    assert "145 tests" in summary, summary
