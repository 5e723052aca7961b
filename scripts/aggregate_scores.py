from reasonlab.logs import job_log
from reasonlab.score_summary import ScoreJob, aggregate_scores

with job_log(snakemake.log[0], "aggregate_scores"):
    i, o = snakemake.input, snakemake.output
    jobs = [
        ScoreJob(m, c, order, t, tok, seq)
        for (m, c, order, t), tok, seq in zip(
            snakemake.params.jobs, i.tokens, i.sequences, strict=True
        )
    ]
    outputs = {
        k: o[k]
        for k in (
            "sequences",
            "checkpoints",
            "entropy_hist",
            "steps",
            "extremes",
            "by_type",
            "agreement",
        )
    }
    if o.detailed:
        outputs["tokens"] = o.detailed
    aggregate_scores(
        jobs,
        outputs,
        sample_prompts=snakemake.params.sample_prompts,
        extremes=snakemake.params.extremes,
        detailed=bool(o.detailed),
    )
