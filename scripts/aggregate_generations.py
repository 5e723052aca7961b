from reasonlab.generation_summary import GenJob, aggregate_generations
from reasonlab.logs import job_log

with job_log(snakemake.log[0], "aggregate_generations"):
    jobs = [
        GenJob(m, c, order, d, g)
        for (m, c, order, d), g in zip(snakemake.params.jobs, snakemake.input.graded, strict=True)
    ]
    aggregate_generations(jobs, dict(snakemake.output.items()))
