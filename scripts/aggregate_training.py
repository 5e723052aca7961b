from reasonlab.logs import job_log
from reasonlab.training import aggregate_training

with job_log(snakemake.log[0], "aggregate_training"):
    i, o = snakemake.input, snakemake.output
    aggregate_training(
        snakemake.params.runs,
        i.outputs,
        i.selections,
        i.handles,
        o.loss,
        o.checkpoints,
        o.selection,
    )
