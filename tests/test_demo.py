"""The README's "run it" command keeps working: `llmgw demo` end to end, with a small bounded load."""

from __future__ import annotations

import pathlib
import socket
import subprocess

import pytest

from conftest import LLMGW


def test_proxy_only_demo_runs_and_leaves_nothing_behind() -> None:
    result = subprocess.run(
        [LLMGW, "demo", "--proxy-only", "--requests", "20"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "| REST front |       20 |      0 |" in out
    assert "| gRPC front |       20 |      0 |" in out
    assert "| demo-model  | grpc | 200  |" in out and "| demo-model  | rest | 200  |" in out
    assert "all child processes stopped" in out
    for port in (50051, 8080, 9090, 18001, 18002, 18003):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on port {port}"


def _llmgw_processes() -> list[str]:
    """Command lines of running llmgw proxy/operator processes and control-plane binaries started by a demo."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (
            "llmgw-demo-" in cmdline
            or "llmgw.local_kubelet" in cmdline
            or (" operator" in cmdline and "llmgw" in cmdline)
        ):
            found.append(cmdline)
    return found


@pytest.mark.timeout(600)
def test_kubernetes_demo_rolls_out_to_100_percent_and_leaves_nothing_behind(k8s_binaries: object) -> None:
    before = set(_llmgw_processes())
    result = subprocess.run([LLMGW, "demo"], capture_output=True, text=True, timeout=540)
    out = result.stdout
    assert result.returncode == 0, out[-4000:] + result.stderr[-4000:]
    assert "Migration Succeeded" in out
    assert "| 4 | 100% |" in out and "passed |" in out
    assert "failed: none" in out
    assert "gRPC weight: [########################################] gRPC 100% | REST 0%" in out
    assert "stopped: operator, proxies, fake providers, control plane; files removed" in out
    assert set(_llmgw_processes()) - before == set()
