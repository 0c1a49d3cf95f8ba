"""bench/payload.py runs (in its quick mode) and prints markdown tables with the same sizes every time."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "payload.py"

CATEGORIES = (
    "request: short single-turn",
    "request: multi-turn + system prompt",
    "request: long context (~8 KB)",
    "response: complete",
    "stream chunk: single-token delta",
    "stream chunk: final with usage",
)


def run_quick() -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def size_rows(output: str) -> list[str]:
    """The summary rows without the timing columns (sizes only depend on the fixed corpus)."""
    rows = []
    for line in output.splitlines():
        if line.startswith("| ") and any(line.startswith(f"| {c} |") for c in CATEGORIES):
            rows.append("|".join(line.split("|")[:8]))
    return rows


def test_quick_run_prints_markdown_tables() -> None:
    output = run_quick()
    assert "## Summary" in output
    assert "| codec | total bytes | % of JSON |" in output
    for category in CATEGORIES:
        assert f"### {category}" in output
    for codec in ("protobuf", "protobuf + field reads", "orjson", "orjson + mapping", "json (stdlib)"):
        assert re.search(rf"^\| {re.escape(codec)} \| ", output, re.MULTILINE), codec
    # Timings are numbers (µs per message), not placeholders.
    proto_row = re.search(
        r"^\| protobuf \| [\d,]+ \| \d+% \| [\d,]+ \| \d+% \| ([\d.]+) \| ([\d.]+) \|$", output, re.M
    )
    assert proto_row is not None and float(proto_row.group(1)) > 0
    assert "one streamed reply on the wire" in output
    # Every markdown table row has as many cells as its header.
    for block in output.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            assert len({line.count("|") for line in lines}) == 1, block


def test_sizes_are_deterministic() -> None:
    first, second = size_rows(run_quick()), size_rows(run_quick())
    assert len(first) == len(CATEGORIES)
    assert first == second
