"""The report at cluster scale: every stage's real aggregation over per-job outputs of 10 models x
20 checkpoints x 3 data sets (tests/scale.py, from the demo's own job outputs), the report built
from them: under 25 MB, every chart's default view a bounded number of series, every slice
still in the page."""

import re

import pytest
import scale
from test_report import series_per_panel, title

from reasonlab.report import build
from reasonlab.report.html import chart_specs, unpacked

pytestmark = pytest.mark.e2e

MODELS, CKPTS, DATASETS = 10, 20, 3
MAX_BYTES = 25_000_000
MAX_SERIES = 10  # what a chart draws before a selector is changed (README: The report)
MAX_PANELS = 12  # and in how many panels


@pytest.fixture(scope="module")
def big(demo_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("scale")
    tables = scale.build(demo_run / "results", out, MODELS, CKPTS, DATASETS)
    doc = out / "report.html"
    built = build.build_report(tables, {"title": "scale"}, doc)
    return built, doc


def test_the_report_of_a_large_study_stays_small(big):
    built, doc = big
    assert len(built) == len(build.SECTIONS)  # every section has its tables
    assert doc.stat().st_size < MAX_BYTES, doc.stat().st_size


def test_every_chart_default_view_draws_a_bounded_number_of_series(big):
    _, doc = big
    specs = chart_specs(doc.read_text())
    assert len(specs) >= 25
    for spec in specs:
        panels = series_per_panel(spec)
        assert panels, title(spec)  # the default slice draws something
        assert max(panels.values()) <= MAX_SERIES, (title(spec), panels)
        assert len(panels) <= MAX_PANELS, (title(spec), len(panels))


def test_every_slice_is_still_in_the_page(big):
    """The selectors offer every model, checkpoint and data set; choosing "all" draws all of
    them (the entropy histograms: one curve per model x checkpoint of a text set)."""
    _, doc = big
    text = unpacked(doc.read_text())
    models, ckpts, sets = scale.names(MODELS, CKPTS, DATASETS)
    offered = set(re.findall(r'<option value="([^"]*)"', text))
    assert set(models) | set(ckpts) | set(sets) <= offered
    hist = next(s for s in chart_specs(doc.read_text()) if title(s) == "Token entropy distribution")
    every = {p["name"]: "(all)" for p in hist["params"]}
    assert series_per_panel(hist, every)[sets[0]] == MODELS * CKPTS
    # one map per model and data set, each offered by the map selector
    assert {f"{m} · {d}" for m in models for d in sets} <= offered
