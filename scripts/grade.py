import polars as pl

from reasonlab.data import read_dataset
from reasonlab.grading import grade_table
from reasonlab.logs import job_log

with job_log(snakemake.log[0], "grade") as log:
    graded = grade_table(
        pl.read_parquet(snakemake.input.raw),
        read_dataset(snakemake.input.data),
        snakemake.params.format,
        snakemake.params.reasoning_start,
        snakemake.params.reasoning_end,
    )
    graded.write_parquet(snakemake.output.graded)
    log.info(
        "%d completions, %d correct, %d flagged",
        graded.height,
        graded["correct"].sum(),
        graded["grade_flag"].is_not_null().sum(),
    )
