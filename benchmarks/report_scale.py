"""The report of a large study: its size and the time headless Chromium takes to draw it.

    .venvs/core/bin/python benchmarks/report_scale.py [--results results] [--models 10]
        [--checkpoints 20] [--datasets 3] [--runs 3]

From a finished demo (`make demo`; `--results` is its results directory) every stage's real
aggregation runs over per-job outputs of models x checkpoints x data sets (tests/scale.py: the
demo's own job outputs, relabelled, numbers varied), the report is built from them, and Debian's
`chromium` (through Playwright, `executable_path`) opens it `--runs` times: the time from
navigation to every chart drawn (an SVG in every chart; the 3-D map's plot), median of the runs.
The demo's own report is timed the same way beside it. The last line is one JSON object.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

DRAWN = (
    "() => Array.from(document.querySelectorAll('div.chart'))"
    ".every(c => c.querySelector('svg') || c.querySelector('pre.warn'))"
    " && Array.from(document.querySelectorAll('div.plot3d')).every(p => p.querySelector('canvas, .empty'))"
)


def render_seconds(path: Path, runs: int, chromium: str) -> tuple[list[float], int, list[str]]:
    """Seconds from navigation to every chart drawn, per run; the charts; console errors."""
    from playwright.sync_api import sync_playwright

    times, errors = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for _ in range(runs + 1):  # the first one warms the browser up
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            t = time.perf_counter()
            page.goto(path.as_uri(), wait_until="load")
            page.wait_for_function(DRAWN, timeout=600_000, polling=100)
            times.append(time.perf_counter() - t)
            n = page.eval_on_selector_all("div.chart", "cs => cs.length")
            errors.extend(
                page.eval_on_selector_all("div.chart pre.warn", "ws => ws.map(w => w.textContent)")
            )
            page.close()
        browser.close()
    return times[1:], n, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--models", type=int, default=10)
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--datasets", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()

    import scale

    from reasonlab.report import build

    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if not chromium:
        sys.exit("no chromium on the PATH (Debian: apt-get install chromium)")
    results = Path(a.results).resolve()
    if not (results / "report.html").exists():
        sys.exit(f"{results}: no report.html; run `make demo` first (or pass --results)")
    with tempfile.TemporaryDirectory(prefix="reasonlab-scale-") as tmp:
        out = Path(tmp)
        t = time.perf_counter()
        tables = scale.build(results, out, a.models, a.checkpoints, a.datasets)
        aggregate_s = time.perf_counter() - t
        t = time.perf_counter()
        build.build_report(tables, {"title": "scale"}, out / "report.html")
        build_s = time.perf_counter() - t
        size = (out / "report.html").stat().st_size
        big, n_big, err_big = render_seconds(out / "report.html", a.runs, chromium)
    demo, n_demo, err_demo = render_seconds(results / "report.html", a.runs, chromium)
    print(json.dumps({
        "study": f"{a.models} models x {a.checkpoints} checkpoints x {a.datasets} data sets",
        "report_bytes": size, "report_mb": round(size / 1e6, 2), "charts": n_big,
        "aggregate_seconds": round(aggregate_s, 1), "build_seconds": round(build_s, 1),
        "render_seconds": round(statistics.median(big), 2), "render_runs": [round(x, 2) for x in big],
        "demo_report_mb": round((results / "report.html").stat().st_size / 1e6, 2),
        "demo_charts": n_demo, "demo_render_seconds": round(statistics.median(demo), 2),
        "console_errors": err_big + err_demo,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
