# Generation with vLLM (or transformers) in the gen environment, grading, accuracy across checkpoints.


rule generate:
    input:
        handle="results/models/{model}/{ckpt}.json",
        data="results/data/{dataset}.parquet",
    output:
        raw="results/generations/{model}/{ckpt}/{dataset}.raw.parquet",
    log:
        "logs/generate/{model}/{ckpt}/{dataset}.log",
    benchmark:
        "benchmarks/generate/{model}/{ckpt}/{dataset}.tsv"
    conda:
        conda_env("gen")
    threads: config["generation"]["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        python=get_gen_python,
        script=SCRIPTS / "generate.py",
        options=GEN_OPTIONS_JSON,
    shell:
        "{params.python:q} {params.script:q} --handle {input.handle:q} --data {input.data:q}"
        " --output {output.raw:q} --threads {threads} --options {params.options:q} > {log:q} 2>&1"


rule grade:
    input:
        raw=rules.generate.output.raw,
        data="results/data/{dataset}.parquet",
    output:
        graded="results/generations/{model}/{ckpt}/{dataset}.parquet",
    log:
        "logs/grade/{model}/{ckpt}/{dataset}.log",
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        format=get_dataset_format,
        reasoning_start=config["generation"]["reasoning_start"],
        reasoning_end=config["generation"]["reasoning_end"],
    script:
        "../../scripts/grade.py"


rule aggregate_generations:
    input:
        graded=gen_outputs(),
    output:
        accuracy="results/aggregate/gen_accuracy.parquet",
        lengths="results/aggregate/gen_lengths.parquet",
        traces="results/aggregate/gen_traces.parquet",
    log:
        "logs/aggregate/generations.log",
    localrule: True
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        jobs=gen_job_list(),
    script:
        "../../scripts/aggregate_generations.py"


if GEN_JOBS:
    for _name in ("accuracy", "lengths", "traces"):
        register_report_table(
            f"gen_{_name}", getattr(rules.aggregate_generations.output, _name)
        )
