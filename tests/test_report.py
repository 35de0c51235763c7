"""The report of a smoke-scale suite: both documents, every figure, the verdicts the analyses computed."""

import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from sgdstab.errors import RunFolderError
from sgdstab.io import read_json, write_json_atomic
from sgdstab.report import VERDICTS, fmt, render_html, render_markdown, write_report

FIGURES = ["E1.png", "E2.png", "E3.png", "E4.png", "E5.png", "curvature_density.png"]


def test_report_has_documents_figures_and_configuration(smoke_suite):
    root, analyses = smoke_suite
    markdown, page = (root / "report.md").read_text(), (root / "report.html").read_text()
    for figure in FIGURES:
        assert (root / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(figures/{figure})" in markdown and f"src='figures/{figure}'" in page
    for name, analysis in analyses.items():
        assert f"| {name} |" in markdown
        assert f"## {name}: {analysis['title']}" in markdown
        assert f"Verdict: **{VERDICTS[analysis['holds']]}**" in markdown
    configuration = re.search(r"## Full configuration\n\n```json\n(.*)\n```", markdown, re.S).group(1)
    assert json.loads(configuration) == read_json(root / "config.json")
    assert "## Curvature summary of one trained model" in markdown and "top-5 eigenvalues" in markdown


def test_html_is_well_formed(smoke_suite):
    root, _ = smoke_suite
    opened = []

    class Checker(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag not in ("img", "meta"):
                opened.append(tag)

        def handle_endtag(self, tag):
            assert opened.pop() == tag

    Checker().feed((root / "report.html").read_text())
    assert opened == []


def test_a_failed_claim_is_reported_as_failed(smoke_suite, tmp_path):
    source, analyses = smoke_suite
    for name in ("E1", "E2"):
        shutil.copytree(source / name, tmp_path / name, ignore=shutil.ignore_patterns("*-*"))
    analysis = read_json(tmp_path / "E1" / "analysis.json")
    analysis["holds"] = False
    analysis["checks"][0].update(holds=False, detail="min mu per family: linear: 0.001")
    write_json_atomic(tmp_path / "E1" / "analysis.json", analysis)
    markdown = write_report(tmp_path)[0].read_text()
    assert "| E1 |" in markdown and "| does not hold | min mu per family: linear: 0.001 " in markdown
    assert "[does not hold] min mu" in markdown
    assert "| E3 |" not in markdown  # only what was run is reported


def test_render_helpers():
    assert [fmt(v) for v in (1 / 3, None, float("nan"), float("inf"), True, 7)] == [
        "0.3333",
        "-",
        "-",
        "inf",
        "yes",
        "7",
    ]
    blocks = [("heading", 1, "T"), ("text", "a **b** `c` <d>"), ("table", ["x"], [["||H||_F | 2"]])]
    assert "| ‖H‖_F \\| 2 |" in render_markdown(blocks)
    assert "<p>a <b>b</b> <code>c</code> &lt;d&gt;</p>" in render_html(blocks)


def test_an_empty_folder_has_no_report(tmp_path):
    with pytest.raises(RunFolderError, match="no experiment results"):
        write_report(tmp_path)
