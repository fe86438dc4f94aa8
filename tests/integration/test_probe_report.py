"""`PROBE_QUICK=1 make probe-report`: the probe study end to end on tiny settings (6 configs x 2
seeds, 4 steps each, one sentence per cell), into a temp dir; then `--reuse` rewrites the doc
from the finished runs without training again."""

from __future__ import annotations

import json
import sys

from tests.integration.helpers import REPO, clean_env, run_bounded

SCRIPT = str(REPO / "scripts" / "probe_report.py")


def test_quick_probe_report_writes_tables_plots_and_histories(tmp_path):
    env = {**clean_env(), "PROBE_QUICK": "1"}
    docs_before = (REPO / "docs" / "probe.md").stat().st_mtime
    code, output = run_bounded([sys.executable, SCRIPT, "--out-dir", str(tmp_path)], env, 400)
    assert code == 0, output
    assert "[12/12]" in output and "started" in output and "done in" in output
    doc = (tmp_path / "probe.md").read_text()
    for title in (
        "Agreement accuracy (%) by subject-verb distance in tokens",
        "Agreement accuracy (%) by number of attractors",
        "Mean margin log P(agreeing) - log P(other form), nats, by subject-verb distance",
        "| nearest noun |",
        "hardest cells",
        "Best head: attention from the verb-predicting position to the subject",
        "## What it shows",
        "min",  # the wall time line
    ):
        assert title in doc, title
    for name in ("dot", "additive", "lstm"):
        assert f"| {name}-1m |" in doc and f"| {name}-0.3m |" in doc
    for image in ("probe.png", "probe-training.png"):
        assert (tmp_path / "img" / image).stat().st_size > 10_000
        assert f"img/{image}" in doc
    results = sorted(tmp_path.glob("runs/*/seed*/result.json"))
    assert len(results) == 12
    for path in results:
        result = json.loads(path.read_text())
        assert [h["step"] for h in result["history"]] == [2, 4]
        assert (result["probe"]["best_head"] is None) == result["config"].startswith("lstm")
        assert list(path.parent.glob("logs/version_0/probe_history.json"))
    assert (REPO / "docs" / "probe.md").stat().st_mtime == docs_before  # docs/ untouched

    code, output = run_bounded(
        [sys.executable, SCRIPT, "--out-dir", str(tmp_path), "--reuse"], env, 200
    )
    assert code == 0, output
    assert "12 runs reused, 0 to run" in output and "started" not in output
    again = (tmp_path / "probe.md").read_text()
    assert "written again from its saved results" in again.splitlines()[2]
    assert again.splitlines()[3:] == doc.splitlines()[3:]  # same runs, same study.json
