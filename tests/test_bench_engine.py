"""Smoke test of bench/engine_latency.py: ``--quick`` starts the fake engine, SMG, the llmgw proxy and the
vllm-http fake, measures and reports.

No timing assertions: the numbers of a quick run on a shared machine are noise. This checks that the
benchmark runs end to end, prints its tables with every row (measured, or skipped with a message while llmgw
has no vllm provider), and leaves no child process behind.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "engine_latency.py"


def _llmgw_has_vllm() -> bool:
    from llmgw.providers import CLIENTS

    return "vllm" in CLIENTS


def _row(out: str, start: str) -> list[str]:
    """The cells of the table row that starts with ``start``."""
    for line in out.splitlines():
        if line.startswith(f"| {start} |"):
            return [c.strip() for c in line.strip().strip("|").split("|")]
    raise AssertionError(f"missing row {start!r} in:\n{out}")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_quick_run_prints_the_tables(tmp_path: pathlib.Path) -> None:
    raw = tmp_path / "raw.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(raw)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=130,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    data = json.loads(raw.read_text())
    engine = data["llmgw_engine_provider"]
    assert engine == _llmgw_has_vllm()
    assert "Command: `" in out
    assert (
        "| measurement | direct | via SMG | via llmgw | SMG added | llmgw added | "
        "llmgw - SMG (per-round range) | target | met? |" in out
    )
    tokens = data["prompt_tokens"]
    assert set(tokens) == {"100", "2000", "8000"}
    for size, label in (("100", "~100"), ("2000", "~2,000"), ("8000", "~8,000")):
        assert abs(tokens[size] - int(size)) <= int(size) // 50, tokens  # about the size asked for
        prompt = f"{label}-token prompt ({tokens[size]:,})"
        for q in ("p50", "p99"):
            cells = _row(out, f"engine path, TTFT, {prompt}, c=1, {q}")
            assert cells[1].endswith(" ms") and cells[2].endswith(" ms"), cells  # direct, via SMG
            assert cells[3].endswith(" ms") if engine else cells[3] == "skipped", cells
            cells = _row(out, f"REST path (vllm-http fake), TTFT, {prompt}, c=1, {q}")
            assert cells[1].endswith(" ms") and cells[3].endswith(" ms"), cells
        verdict = _row(out, f"engine path, TTFT, {prompt}, c=1, p50")[-1]
        assert verdict in ("yes", "**no**") if engine else verdict == "not measured"
    cells = _row(out, "streamed tokens/s, c=64, 200-token answers")
    assert cells[1].replace(",", "").isdigit(), cells
    assert cells[2].replace(",", "").isdigit() if engine else cells[2] == "skipped", cells
    assert cells[-1] in ("yes", "**no**") if engine else cells[-1] == "not measured"
    for process in ("the router (SMG / llmgw proxy)", "fake engine", "load generator", "all three"):
        cells = _row(out, process)
        assert cells[1].endswith(" ms") and cells[2].endswith(" µs"), cells
    assert "llmgw's streamed tokens/s at c=64 at least 0.8x SMG's: " in out
    if engine:  # the tokenization table: both encoders, every size (the ids were checked equal)
        assert "llmgw EngineTokenizer (tiktoken path)" in out
        for label in ("~100", "~2,000", "~8,000"):
            cells = _row(out, f"{label} tokens")
            assert cells[1].endswith(" ms") and cells[2].endswith(" ms") and cells[3].endswith("x"), cells
        assert set(data["tokenization_ms"]) == {"100", "2000", "8000"}
    if not engine:
        assert "**Skipped:** llmgw has no vllm provider yet" in out

    # Every block ran and answered: no failed request.
    blocks = data["blocks"]
    targets = {"direct", "smg", "rest-direct", "rest-llmgw"} | ({"llmgw"} if engine else set())
    assert {b["target"] for b in blocks if b["measurement"] == "ttft/8000"} == targets
    assert {b["target"] for b in blocks if b["measurement"] == "throughput"} == (
        {"smg", "llmgw"} if engine else {"smg"}
    )
    assert all(b["completed"] > 0 and b["errors"] == 0 for b in blocks), [
        (b["measurement"], b["target"], b["first_error"]) for b in blocks if b["errors"]
    ]
    assert all(b["tokens"] == 200 * b["completed"] for b in blocks if b["measurement"] == "throughput")

    # The fakes, SMG and the proxy were stopped and reaped: none of them is still alive.
    assert set(data["child_pids"]) == {"fake engine", "vllm-http fake", "SMG", "llmgw proxy"}
    for name, pid in data["child_pids"].items():
        try:
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone, as it should be (or no /proc on this platform)
        assert b"llmgw_common.cli" not in cmdline and b"smg" not in cmdline, (
            f"{name} (pid {pid}) is still running"
        )
