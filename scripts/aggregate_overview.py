from reasonlab.logs import job_log
from reasonlab.overview import aggregate_overview

with job_log(snakemake.log[0], "aggregate_overview"):
    i, o = snakemake.input, snakemake.output
    aggregate_overview(
        i.handles, i.summaries, i.rejects, i.environments, o.models, o.datasets, o.environments
    )
