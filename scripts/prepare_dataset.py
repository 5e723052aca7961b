from reasonlab.data import prepare, write_prepared
from reasonlab.logs import job_log

with job_log(snakemake.log[0], "prepare_dataset") as log:
    name = snakemake.wildcards.dataset
    p = prepare(snakemake.params.spec, name, progress=True)
    if p.rejects:
        log.warning("%d row(s) rejected; all are in %s", len(p.rejects), snakemake.output.rejects)
    write_prepared(p, snakemake.output.table, snakemake.output.rejects, snakemake.output.summary)
    log.info("%s: %s", name, p.summary)
