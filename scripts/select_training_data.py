import polars as pl

from reasonlab.data import read_dataset
from reasonlab.logs import job_log
from reasonlab.training import select_rows, write_llamafactory_dataset

with job_log(snakemake.log[0], "select_training_data") as log:
    i, o, sel = snakemake.input, snakemake.output, snakemake.params.select
    scores = pl.read_parquet(i.scores) if hasattr(i, "scores") else None
    rows = select_rows(read_dataset(i.data), scores, sel["keep"], sel["n"], sel["seed"], sel["by"])
    rows.write_parquet(o.selection)
    n = write_llamafactory_dataset(
        rows.filter(pl.col("selected")), snakemake.params.stage, o.info.rsplit("/", 1)[0]
    )
    log.info("run %s: %d rows selected (%s)", snakemake.wildcards.run, n, sel)
