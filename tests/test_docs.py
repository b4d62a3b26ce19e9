"""docs/metrics.md names every metric of the catalogue (every feature's, their peak twins,
the poll loop's own, the Graphite pusher's and the HTTP server's)."""

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from sockscope import config, features, graphite, prometheus, selfmetrics, sweep

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


def catalogue() -> list:
    enabled = features.build(config.from_mapping({"tcp_info": {"enabled": True},  # off by default
                                                  "connections": {"enabled": True},
                                                  "owners": {"enabled": True},
                                                  "units": {"enabled": True}}))
    assert {f.name for f in enabled} == {e.name for e in features.REGISTRY}  # every feature on
    return [*(m for f in enabled for m in f.metrics), *selfmetrics.SCRAPE_METRICS, *selfmetrics.POLL_METRICS,
            *graphite.METRICS, *prometheus.HTTP_METRICS, *sweep.METRICS]


def test_every_metric_of_the_catalogue_is_documented():
    names = {m.name for m in catalogue()}
    assert len(names) > 60
    doc = documented()
    missing = sorted(n for n in names if not re.search(rf"`{n}(_total)?[`{{]", doc))
    assert missing == []


# -- README set-up and cited files (issue 10, defect 8) ---------------------------------

TOP_DIRS = ("daemon", "tests", "config", "systemd", "dashboards", "scripts", "docs", "bench")


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_quick_start_is_make_run_and_make_test():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)[1]
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    assert [c for c in commands if c] == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def cited_paths(page: Path) -> set[str]:
    """Project paths a page names: `dir/...` in backquotes, and relative links."""
    text = page.read_text()
    cited = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        token = token.rstrip(".,:;)")
        if token.split("/", 1)[0] in TOP_DIRS and "/" in token:
            cited.add(token)
    for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text):
        if "://" not in target and not target.startswith("mailto:"):
            cited.add(str((page.parent / target).resolve().relative_to(ROOT)))
    return cited


def test_files_cited_by_the_docs_exist():
    """service.md used to cite FIELD_NOTES, a notes file outside the project."""
    missing, count = [], 0
    for page in doc_pages():
        for path in cited_paths(page):
            count += 1
            if not list(ROOT.glob(path)):
                missing.append(f"{page.name}: {path}")
        text = page.read_text()
        for notes in ("FIELD_NOTES", "STYLE.md"):
            if notes in text:
                missing.append(f"{page.name}: {notes} (not part of the project)")
    assert count > 30  # the scan does find the citations
    assert missing == []


def test_modules_named_in_design_exist():
    design = (ROOT / "docs" / "design.md").read_text()
    table = {m for m in re.findall(r"^\| `(\w+\.py)` \|", design, re.M)}
    assert len(table) >= 10
    package = ROOT / "daemon" / "sockscope"
    assert sorted(m for m in table if not (package / m).exists()) == []
