"""bench/sweep.py cannot rot: a 10k-socket table, 3 namespaces, 1 round (< 30 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.root


def test_bench_sweep_10k(tmp_path, root):
    out = tmp_path / "results"
    r = subprocess.run(
        [sys.executable, "-m", "bench.sweep", "--size", "10000", "--namespaces", "3", "--rounds", "1",
         "--polls", "2", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO}"},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    result = json.loads((out / "sweep-latest.json").read_text())
    (one,), (sweep,), (empty,) = (result["rounds"][k] for k in ("one", "sweep", "empty"))
    assert 9000 <= one["sockets"] <= 12000 and sweep["sockets"] == one["sockets"] and empty["sockets"] == 0
    assert (one["dumps"], sweep["dumps"], empty["dumps"]) == (2, 6, 4)  # TCP + UDP per namespace
    assert sweep["lanes"] == 3 and empty["lanes"] == 2
    assert 0 < one["cpu"] and 0 < empty["cpu"]
    assert "| sweep: host (the table) + 2 empty | 3 | 6 |" in (out / "sweep-latest.md").read_text()
    assert not [n for n in result["names"] if os.path.exists(f"/run/netns/{n}")]  # removed afterwards
