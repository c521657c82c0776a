"""The README's result tables are what `reports/` say: generated, never typed, so they cannot drift."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.tools import readme_tables as T
from tests.factories import ROOT


def test_the_committed_readme_tables_are_generated_from_the_committed_reports():
    readme = (ROOT / "README.md").read_text()
    assert T.fill(readme, T.render(ROOT / "reports")) == readme, (
        "README.md's tables differ from reports/: run `make tables` (python -m pipeline readme_tables)"
    )


def test_a_changed_report_changes_its_table(tmp_path):
    reports = tmp_path / "reports"
    shutil.copytree(ROOT / "reports", reports, ignore=shutil.ignore_patterns("*.png", "*.csv"))
    before = T.render(reports)
    report = json.loads((reports / "ensemble.json").read_text())
    report["chosen"]["cv_logloss"] = 0.123456
    (reports / "ensemble.json").write_text(json.dumps(report))
    after = T.render(reports)
    assert "0.123" in after["results"] and after["results"] != before["results"]
    assert after["benchmarks"] == before["benchmarks"]


def test_only_the_marked_bodies_are_replaced():
    text = ("intro\n<!-- table:results -->\nold\n<!-- /table:results -->\nkept\n"
            "<!-- table:other -->\nx\n<!-- /table:other -->\n")
    out = T.fill(text, {"results": "new\n"})
    assert out == text.replace("old\n", "new\n")
    with pytest.raises(ValueError, match="no markers for table"):
        T.fill("no markers here", {"results": "new\n"})


def test_check_mode_fails_on_a_hand_edited_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().replace("| VGG16 | ", "| VGG16 | 0.1 ", 1))
    assert T.main(["--check", "--readme", str(readme), "--reports", str(ROOT / "reports")]) == 1
    assert "generated" in capsys.readouterr().out
    assert T.main(["--readme", str(readme), "--reports", str(ROOT / "reports")]) == 0
    assert T.main(["--check", "--readme", str(readme), "--reports", str(ROOT / "reports")]) == 0
