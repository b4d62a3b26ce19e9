"""The benchmark cannot rot: a 10k-socket run of bench/ in its own namespace (< 60 s).

Asserts that sockscope's per-state counts equalled `ss` (the bench fails otherwise) and
that the result files are written. Tools that are not installed (collectd,
node_exporter) are skipped by the bench itself; the full runs are `make bench`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.root


def test_bench_10k_sanity(tmp_path, root):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "bench.run", "--sizes", "10000", "--runs", "1",
         "--tools", "floor,sockscope,ss", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO}"},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads((out / "latest.json").read_text())
    (size,) = result["sizes"]
    assert size["counts"]["equal"] and size["counts_after"]["equal"]
    assert size["counts"]["sockscope"] == size["counts"]["ss"]
    assert 9000 <= size["sockets"] <= 12000
    assert {"floor", "sockscope", "ss"} <= set(size["tools"])
    assert size["tools"]["sockscope"]["median"]["cpu"] > 0
    assert (out / "latest.md").read_text().count("|") > 20
    assert (out / "chart.svg").read_text().startswith("<svg")
    assert "sockscope/floor" in size["ratios"]
