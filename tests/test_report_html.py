"""report.html from a small synthetic study: well-formed, report.md's cells, inline figures, the
provenance header, logged with the report, byte-for-byte deterministic; and the index page."""
from __future__ import annotations

import base64
import itertools
import shutil
from html import unescape
from html.parser import HTMLParser

import pytest
from mlflow.tracking import MlflowClient

from transquant.studies import report as rp
from transquant.studies import significance as S
from transquant.studies.html_report import write_html
from transquant.studies.queries import children_frame
from transquant.studies.tables import build_tables

from .test_report import N_VAL, _child, _correct, _quantized, _with_predictions, qparams

FP32 = {1000: 90.0, 1001: 91.0}
W8A8 = {1000: 50.0, 1001: 60.0}
VERSIONS = {"transquant.source_hash": "0123abcd", "transquant.version.torch": "2.0.0"}
VOID = {"meta", "img", "br", "hr", "link", "input"}


class Page(HTMLParser):
    """Tables as rows of cell texts, image sources, links, h2 titles; fails on an unbalanced tag."""

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.tables, self.imgs, self.links, self.h2 = [], [], [], [], []
        self.cell = self.heading = None
        self.feed(text)
        self.close()
        assert not self.stack, f"unclosed tags: {self.stack}"

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        if tag in VOID:
            return
        self.stack.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "h2":
            self.heading = ""

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self.cell)
            self.cell = None
        elif tag == "h2":
            self.h2.append(self.heading)
            self.heading = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data
        if self.heading is not None:
            self.heading += data


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two seeds of FP32 (with depth statistics), W8A8 and two PEG settings: Table I, its per-seed
    intervals, Table III, the PEG ablation and two figures."""
    base = tmp_path_factory.mktemp("html_store")
    uri = f"sqlite:///{base}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("transquant", artifact_location=str(base / "artifacts"))
    parent = client.create_run(exp, start_time=1_700_000_000_000, tags={
        "transquant.role": "sweep", "transquant.study": "htmlstudy", "mlflow.runName": "sweep: +experiment=paper"}
    ).info.run_id
    client.log_param(parent, "sweep_overrides", "+experiment=paper train.seed=1000,1001")
    ticks = itertools.count(1_700_000_010_000, 10_000)
    for s in FP32:
        m, pred = _with_predictions({"accuracy": FP32[s], "fp32_accuracy": FP32[s], "accuracy_drop": 0.0})
        _child(client, exp, parent, s, qparams("fp32"), m, next(ticks), tags=VERSIONS, predictions=pred,
               history={"kurtosis": [3.0, 30.0, 300.0], "max_abs": [1.0, 10.0, 100.0]})
        m, pred = _with_predictions(_quantized(FP32[s], W8A8[s]))
        _child(client, exp, parent, s, qparams("w8a8"), m, next(ticks), tags=VERSIONS, predictions=pred)
        for k, acc in ((2, 70.0), (4, 85.0)):
            _child(client, exp, parent, s, qparams("peg", k=k, permute=True, grouping="sorted"),
                   _quantized(FP32[s], acc), next(ticks), tags=VERSIONS)
    out = rp.report(["htmlstudy"], uri, base / "reports" / "htmlstudy")
    return {"client": client, "uri": uri, "parent": parent, "out": out, "base": base}


def test_report_html_page(study):
    out = study["out"]
    text = (out / "report.html").read_text()
    assert text.startswith("<!DOCTYPE html>")
    page = Page(text)
    rows = [r for t in page.tables for r in t]
    # Table I: W8A8 on seeds 1000 / 1001 (50 and 60 of FP32 90 and 91), significant on both, as report.md has it.
    assert ["W8A8", "2", "55.00 [50.00, 60.00]", "35.50 [31.00, 40.00]*", "<0.001"] in rows
    assert "| W8A8 | 2 | 55.00 [50.00, 60.00] | 35.50 [31.00, 40.00]\\* | <0.001 |" in (out / "report.md").read_text()
    lo, hi = S.accuracy_ci(_correct(50.0))
    assert any(r[:3] == ["W8A8", "1000", f"50.00 [{lo:.2f}, {hi:.2f}]"] for r in rows)  # per-seed interval
    assert ["2", "70.00 [70.00, 70.00]"] in rows  # PEG: K x grouping
    md_titles = [line[3:] for line in (out / "report.md").read_text().splitlines() if line.startswith("## ")]
    assert page.h2 == ["Provenance", "Reading the numbers", *md_titles, "Figures"]  # report.md's tables, its order
    assert S.RULE in unescape(text) and "not a finding" in text
    # The interval text uses the runs' own validation size and median accuracy, not the default task's.
    assert f"its {N_VAL:,} examples give an accuracy near" in text and "2,824" not in text

    # Provenance: the parent, the sweep and report commands, model / task / seeds / runs.
    assert study["parent"] in text and "python -m transquant.run -m +experiment=paper train.seed=1000,1001" in text
    assert "python -m transquant.report htmlstudy</pre>" in text  # the latest sweep: no --all
    facts = {r[0]: r[1] for r in page.tables[0]}
    assert (facts["Model"], facts["Task"], facts["Seeds"]) == ("tiny", "synthetic", "1000, 1001")
    assert facts["Runs"].startswith("8 (0 not finished")

    # Figures: every PNG of the report, inline, in plots' order.
    pngs = [out / "accuracy_vs_k.png", out / "depth_stats.png"]
    assert sorted(out.glob("*.png")) == sorted(pngs)
    assert page.imgs and all(src.startswith("data:image/png;base64,") for src in page.imgs)
    assert [base64.b64decode(src.removeprefix("data:image/png;base64,")) for src in page.imgs] == [
        p.read_bytes() for p in pngs]


def test_report_html_logged_deterministic_and_indexed(study, tmp_path):
    client, out = study["client"], study["out"]
    arts = {a.path for a in client.list_artifacts(study["parent"], "report")}
    assert "report/report.html" in arts
    logged = client.download_artifacts(study["parent"], "report/report.html", str(tmp_path))
    assert open(logged, "rb").read() == (out / "report.html").read_bytes()

    again = rp.report(["htmlstudy"], study["uri"], out.parent / "again", log=False)
    assert (again / "report.html").read_bytes() == (out / "report.html").read_bytes()  # no paths, no dates

    index = out.parent / "index.html"  # out.parent is a folder named reports
    page = Page(index.read_text())
    assert page.links == ["again/report.html", "htmlstudy/report.html"]
    alone = rp.report(["htmlstudy"], study["uri"], tmp_path / "mine", log=False)
    assert (alone / "report.html").exists() and not (tmp_path / "index.html").exists()  # a chosen out= stands alone


def test_report_html_versions(study, tmp_path):
    """Runs grouped by their source hash and library versions (the study table's ``source_hash`` and
    ``version.<library>`` columns, from the runs' ``transquant.*`` tags)."""
    client, parent = study["client"], study["parent"]
    df = children_frame(client, [parent])
    tags = [client.get_run(r).data.tags for r in df["run_id"]]
    df["source_hash"] = [t["transquant.source_hash"] for t in tags]
    df["version.torch"] = [t["transquant.version.torch"] for t in tags]
    df.loc[0, "version.torch"] = None  # a run logged before versions were tagged
    out = shutil.copytree(study["out"], tmp_path / "copy")
    write_html(build_tables(df), [client.get_run(parent)], ["htmlstudy"], out, df)
    text = (out / "report.html").read_text()
    versions = next(t for t in Page(text).tables if t[0] == ["Source hash", "torch", "runs"])
    assert versions[1:] == [["0123abcd", "2.0.0", "7"], ["0123abcd", "not recorded", "1"]]
    assert "ran different code or libraries" in text
