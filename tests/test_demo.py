"""The README's "run it" command keeps working: `llmgw demo` end to end, with a small bounded load."""

from __future__ import annotations

import socket
import subprocess

from conftest import LLMGW


def test_demo_runs_and_leaves_nothing_behind() -> None:
    result = subprocess.run([LLMGW, "demo", "--requests", "20"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "| REST front |       20 |      0 |" in out
    assert "| gRPC front |       20 |      0 |" in out
    assert "| demo-model  | grpc | 200  |" in out and "| demo-model  | rest | 200  |" in out
    assert "all child processes stopped" in out
    for port in (50051, 8080, 9090, 18001, 18002, 18003):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on port {port}"
