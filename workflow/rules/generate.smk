# Generation with vLLM (or transformers) in the gen environment, grading, accuracy across checkpoints.


rule generate:
    input:
        handle="results/models/{model}/{ckpt}.json",
        data="results/data/{dataset}.parquet",
    output:
        raw="results/generations/{model}/{ckpt}/{dataset}.raw.parquet",
        record="results/compute/generate/{model}/{ckpt}/{dataset}.json",
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
        python=python_of("gen"),
        options=GEN_OPTIONS,
        speed=speed_only(GEN_SPEED),
        dtype=compute_dtype("generate"),
        compute=compute_placement("generate"),
    shell:
        "{params.python:q} -m reasonlab generate --log {log:q} --handle {input.handle:q}"
        " --data {input.data:q} --output {output.raw:q} --threads {threads}"
        " --options {params.options:q} --speed {params.speed:q}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule grade:
    input:
        raw=rules.generate.output.raw,
        data="results/data/{dataset}.parquet",
    output:
        graded="results/generations/{model}/{ckpt}/{dataset}.parquet",
    log:
        "logs/grade/{model}/{ckpt}/{dataset}.log",
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        python=python_of("core"),
        format=get_dataset_format,
        start=config["generation"]["reasoning_start"] or "",
        end=config["generation"]["reasoning_end"] or "",
    shell:
        "{params.python:q} -m reasonlab grade --log {log:q} --raw {input.raw:q}"
        " --data {input.data:q} --output {output.graded:q} --format {params.format}"
        " --reasoning-start={params.start:q} --reasoning-end={params.end:q}"


rule aggregate_generations:
    input:
        graded=PLAN.gen_outputs(),
    output:
        **table_paths(report_generate.TABLES),
    log:
        "logs/aggregate/generations.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        out_dir=get_out_dir,
        jobs=PLAN.gen_job_args(),
    shell:
        "{params.python:q} -m reasonlab aggregate-generations --log {log:q} --jobs {params.jobs:q}"
        " --graded {input.graded:q} --out-dir {params.out_dir}"
