"""docs/metrics.md names every metric sockscope can export (the golden exposition covers
the snapshot collector with peaks and kernel statistics; the Graphite self-metrics and
the process/platform collectors come from their own collectors)."""

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sockscope.graphite import GraphiteStats
from sockscope.prometheus import GraphiteCollector

ROOT = Path(__file__).resolve().parent.parent


def documented() -> str:
    return (ROOT / "docs" / "metrics.md").read_text()


def test_every_snapshot_metric_is_documented():
    golden = (ROOT / "tests" / "golden" / "metrics.prom").read_text()
    names = {fam.name for fam in text_string_to_metric_families(golden)}
    assert len(names) > 30
    doc = documented()
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?[`{{]", doc))
    assert missing == []


def test_every_graphite_self_metric_is_documented():
    names = {fam.name for fam in GraphiteCollector(lambda: GraphiteStats()).collect()}
    assert len(names) >= 5
    doc = documented()
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?[`{{]", doc))
    assert missing == []
