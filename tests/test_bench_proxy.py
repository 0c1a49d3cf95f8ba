"""Smoke test of bench/proxy_latency.py: ``--quick`` starts the fakes and the proxy, measures and reports.

No timing assertions: the numbers of a quick run on a shared machine are noise. This only checks that the
benchmark runs end to end, prints its tables and leaves no child process behind.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "proxy_latency.py"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quick_run_prints_the_tables(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    assert "| measurement | direct | via proxy | added / ratio | target | met? |" in out
    for row in (
        "REST front, unary latency, c=1, p50",
        "gRPC front, unary latency, c=1, p99",
        "REST front, streaming TTFT, c=1, p50",
        "gRPC front, streaming TTFT, c=1, p50",
        "REST front, unary throughput, c=64",
        "gRPC front, unary throughput, c=32",
        "REST front, paced stream (20 tokens, 5 ms apart), whole stream, c=1, p50",
        "gRPC front, paced stream (20 tokens, 5 ms apart), whole stream, c=1, p50",
        "REST front, tool call, unary, c=1, p50",
        "gRPC front, tool call, streamed, first fragment, c=1, p50",
        "Messages front, to an anthropic provider, unary, c=1, p50",
        "Messages front, to an anthropic provider, streamed, TTFT, c=1, p50",
    ):
        assert row in out, f"missing row {row!r} in:\n{out}"
    assert "| comparison | candidate | result | relative to the first |" in out
    assert "Command: `" in out

    data = json.loads(raw.read_text())
    assert {b["target"] for b in data["blocks"]} == {"direct", "proxy"}
    assert all(b["completed"] > 0 for b in data["blocks"])

    # The fakes and the proxy were stopped (and reaped): none of them is still alive.
    assert set(data["child_pids"]) == {
        "proxy",
        "upstream (openai fake)",
        "upstream (grpc fake)",
        "upstream (openai fake, paced)",
        "upstream (grpc fake, paced)",
        "upstream (anthropic fake)",
    }
    for name, pid in data["child_pids"].items():
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone, as it should be (or no /proc on this platform)
        assert b"llmgw_common.cli" not in cmdline, f"{name} (pid {pid}) is still running"
