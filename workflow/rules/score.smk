# Teacher-forced token scoring of text sets under every model x checkpoint, and its aggregation.


rule score:
    input:
        handle="results/models/{model}/{ckpt}.json",
        texts=get_textset_input,
    output:
        tokens="results/scores/{model}/{ckpt}/{textset}.tokens.parquet",
        sequences="results/scores/{model}/{ckpt}/{textset}.sequences.parquet",
    log:
        "logs/score/{model}/{ckpt}/{textset}.log",
    benchmark:
        "benchmarks/score/{model}/{ckpt}/{textset}.tsv"
    conda:
        CORE_CONDA
    threads: config["score"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        options=SCORE_OPTIONS,
        prompt=config["score"]["prompt"],
        system=config["score"]["system"],
    script:
        "../../scripts/score.py"


rule aggregate_scores:
    input:
        tokens=score_outputs("tokens"),
        sequences=score_outputs("sequences"),
    output:
        sequences="results/aggregate/score_sequences.parquet",
        checkpoints="results/aggregate/score_checkpoints.parquet",
        entropy_hist="results/aggregate/score_entropy_hist.parquet",
        steps="results/aggregate/score_steps.parquet",
        extremes="results/aggregate/score_extremes.parquet",
        by_type="results/aggregate/score_by_type.parquet",
        agreement="results/aggregate/score_agreement.parquet",
        detailed=score_detailed_output(),
    log:
        "logs/aggregate/scores.log",
    localrule: True
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        jobs=score_job_list(),
        sample_prompts=config["score"]["sample_prompts"],
        extremes=config["score"]["extremes"],
    script:
        "../../scripts/aggregate_scores.py"


if SCORE_JOBS:
    for _name in (
        "sequences",
        "checkpoints",
        "entropy_hist",
        "steps",
        "extremes",
        "by_type",
        "agreement",
    ):
        register_report_table(
            f"score_{_name}", getattr(rules.aggregate_scores.output, _name)
        )
