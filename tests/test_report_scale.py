"""The report at cluster scale: every stage's real aggregation over per-job outputs of 10 models x
20 checkpoints x 3 data sets (tests/scale.py, from the demo's own job outputs), the report built
from them: under 25 MB, every chart's default view a bounded number of series, every slice
still in the page."""

import re

import pytest
import scale
import yaml
from e2e import ROOT
from test_report import series_per_panel, title

from reasonlab.report import build
from reasonlab.report.html import chart_specs, unpacked

pytestmark = pytest.mark.e2e

MODELS, CKPTS, DATASETS = 10, 20, 3
MAX_BYTES = 25_000_000
SHOWN = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())["properties"][
    "report"]["properties"]["checkpoints_shown"]["default"]  # fmt: skip
MAX_PANELS = 12  # the most panels a chart's default view draws


@pytest.fixture(scope="module")
def tables(demo_run, tmp_path_factory):
    return scale.build(demo_run / "results", tmp_path_factory.mktemp("scale"), MODELS, CKPTS,
                       DATASETS)  # fmt: skip


@pytest.fixture(scope="module")
def big(tables, tmp_path_factory):
    doc = tmp_path_factory.mktemp("scale-report") / "report.html"
    built = build.build_report(tables, {"title": "scale"}, doc)
    return built, doc


def test_the_report_of_a_large_study_stays_small(big):
    built, doc = big
    assert len(built) == len(build.SECTIONS)  # every section has its tables
    assert doc.stat().st_size < MAX_BYTES, doc.stat().st_size


@pytest.mark.parametrize("shown", [SHOWN, 3])
def test_every_chart_default_view_draws_a_bounded_number_of_series(big, tables, shown, tmp_path):
    """With report.checkpoints_shown = n (the default, and 3): every chart's default view draws at
    most 2n series (n checkpoints x correct/wrong traces at most; the other series — clusters,
    sample types, policies, levels — are the demo's few) in at most MAX_PANELS panels."""
    _, doc = big
    if shown != SHOWN:
        doc = tmp_path / "report.html"
        build.build_report(tables, {"title": "scale", "checkpoints_shown": shown}, doc)
    specs = chart_specs(doc.read_text())
    assert len(specs) >= 25
    worst = 0
    for spec in specs:
        panels = series_per_panel(spec)
        assert panels, title(spec)  # the default slice draws something
        assert max(panels.values()) <= 2 * shown, (title(spec), panels)
        assert len(panels) <= MAX_PANELS, (title(spec), len(panels))
        worst = max(worst, max(panels.values()))
    assert worst == 2 * shown  # the step charts: n checkpoints, correct and wrong


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
