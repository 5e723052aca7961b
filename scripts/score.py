from reasonlab.logs import job_log
from reasonlab.score import score_textset

with job_log(snakemake.log[0], "score"):
    score_textset(
        snakemake.input.handle,
        snakemake.input.texts,
        snakemake.output.tokens,
        snakemake.output.sequences,
        options=snakemake.params.options,
        prompt=snakemake.params.prompt,
        system=snakemake.params.system,
        threads=snakemake.threads,
        name=snakemake.wildcards.textset,
    )
