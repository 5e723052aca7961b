import reasonlab
from reasonlab.logs import job_log
from reasonlab.report import build_report

with job_log(snakemake.log[0], "report") as log:
    context = {
        "title": snakemake.params.title,
        "config_hash": snakemake.params.config_hash,
        "version": reasonlab.__version__,
    }
    built = build_report(dict(snakemake.input.items()), context, snakemake.output[0])
    log.info("report sections: %s", built)
