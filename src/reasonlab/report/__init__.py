"""The report: one self-contained HTML file (Vega inlined; opens offline) built from small tidy tables.

One module per stage (`overview`, `generate`, `score`, `training`) holds that stage's aggregation
(per-job outputs -> tables `results/aggregate/<name>.parquet`, names declared once in its `TABLES`)
and its section (`KEY`, `TITLE`, `section(tables, context) -> blocks`). `build` lists the sections
in order and writes the file; `charts` draws the common chart shapes with selectors shared by a
section's charts; `html` is the leaf that renders blocks to HTML.
"""
