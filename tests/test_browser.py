"""The demo's report in a real browser: headless Chromium (Debian's `chromium`, installed by
`install_chromium` when missing, as the SLURM helper installs SLURM) driven by Playwright with
`executable_path` pointing at it (Playwright's own browser download cannot work offline). No
console errors; every chart draws a non-empty SVG; changing a section's selector changes what its
charts draw; a full-page screenshot is saved beside the report (`results/report.png`)."""

import os
import shutil
import subprocess

import pytest


def install_chromium() -> str:
    """The path of a Chromium binary: on the PATH, or Debian's package installed now."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("no Chromium here, and installing Debian's chromium needs apt-get as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:  # stale package lists: refresh once
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode or not shutil.which("chromium"):
        pytest.fail(f"apt-get install chromium failed: {r.stderr[-500:]}")
    return shutil.which("chromium")


MARKS = ("path.mark-symbol, path.mark-rect, path.mark-line, path.mark-area, path.mark-rule, "
         "path.mark-tick, path.mark-arc, path.mark-trail, g.mark-text text")  # fmt: skip
# what a section shows: the marks each of its charts draws, and its table rows and traces that the
# selectors leave visible
COUNT_JS = f"""(sec) => Array.from(document.querySelectorAll('#' + sec + ' div.chart')).map(
    c => c.querySelectorAll('{MARKS}').length).concat([Array.from(document.querySelectorAll(
    '#' + sec + ' .rl-row')).filter(r => r.style.display !== 'none').length])"""


@pytest.fixture(scope="module")
def page(demo_run):
    playwright = pytest.importorskip("playwright.sync_api")
    exe = install_chromium()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.goto((demo_run / "results" / "report.html").as_uri(), wait_until="load")
        # every chart drawn (vegaEmbed renders asynchronously)
        pg.wait_for_function(
            "() => Array.from(document.querySelectorAll('div.chart'))"
            ".every(c => c.querySelector('svg') || c.querySelector('pre.warn'))",
            timeout=120_000,
        )
        yield pg, errors, demo_run
        browser.close()


def test_the_report_renders_without_errors_and_every_chart_draws(page):
    pg, errors, demo = page
    assert errors == []
    n = pg.eval_on_selector_all("div.chart", "cs => cs.length")
    assert n > 20
    assert pg.eval_on_selector_all("div.chart pre.warn", "cs => cs.length") == 0
    marks = pg.evaluate(f"() => Array.from(document.querySelectorAll('div.chart')).map("
                        f"c => c.querySelectorAll('{MARKS}').length)")  # fmt: skip
    assert len(marks) == n and min(marks) > 0, marks
    # the 3-D map (plotly) draws too
    pg.wait_for_function("() => document.querySelector('#plot3d canvas')", timeout=60_000)
    assert (
        pg.evaluate("() => document.getElementById('plot3d').getBoundingClientRect().height") > 300
    )
    shot = demo / "results" / "report.png"
    pg.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 100_000


def test_each_sections_selectors_change_what_its_charts_draw(page):
    """For every section with selectors: some choice of one of its selectors changes what it shows
    — the marks its charts draw or the rows and traces left visible (the charts follow the page's
    <select> elements through Vega's bindings, the rows through the page's script); restored."""
    pg, errors, _ = page
    sections = pg.eval_on_selector_all(
        "section", "ss => ss.filter(s => s.querySelector('form.selectors select')).map(s => s.id)"
    )
    assert len(sections) >= 4
    for sec in sections:
        before = pg.evaluate(COUNT_JS, sec)
        changed = None
        for select in pg.locator(f"#{sec} form.selectors select").all():
            current = select.evaluate("s => s.value")
            for v in select.evaluate("s => Array.from(s.options).map(o => o.value)"):
                if v == current:
                    continue
                select.select_option(v)
                pg.wait_for_timeout(200)
                if pg.evaluate(COUNT_JS, sec) != before:
                    changed = (select.get_attribute("data-sel"), v)
                    break
            select.select_option(current)
            pg.wait_for_timeout(200)
            if changed:
                break
        assert changed, f"no selector of section {sec} changes what it shows"
        assert pg.evaluate(COUNT_JS, sec) == before  # restored
    assert errors == []


def test_tables_sort_by_a_click_on_a_header_and_filter(page):
    pg, errors, _ = page
    table = pg.locator("section#guided table.rl-sortable").first
    heads = table.evaluate("t => Array.from(t.tHead.rows[0].cells).map(c => c.textContent)")
    i = heads.index("accuracy")
    column = f"t => Array.from(t.tBodies[0].rows).map(r => parseFloat(r.cells[{i}].textContent))"
    table.locator("thead th").nth(i).click()
    up = table.evaluate(column)
    table.locator("thead th").nth(i).click()
    down = table.evaluate(column)
    assert up == sorted(up) and down == sorted(up, reverse=True) and up != down
    box = pg.locator("section#overview input.rl-filter").first
    box.fill("tiny-high")
    rows = box.evaluate("b => Array.from(b.parentElement.querySelectorAll('tbody tr'))"
                        ".filter(r => getComputedStyle(r).display !== 'none').map(r => r.textContent)")  # fmt: skip
    assert rows and all("tiny-high" in r for r in rows)
    box.fill("")
    assert errors == []
