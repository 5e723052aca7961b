from reasonlab.logs import job_log
from reasonlab.synth import DemoSizes, write_demo_data

with job_log(snakemake.log[0], "build_demo_data") as log:
    counts = write_demo_data(
        dict(snakemake.output.items()),
        seed=snakemake.params.seed,
        sizes=DemoSizes(**snakemake.params.sizes),
    )
    log.info("wrote demo sets: %s", counts)
