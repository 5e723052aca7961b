# Teacher-forced token scoring of text sets under every model x checkpoint, and its aggregation.


rule score:
    input:
        handle="results/models/{model}/{ckpt}.json",
        texts=get_textset_input,
    output:
        tokens="results/scores/{model}/{ckpt}/{textset}.tokens.parquet",
        sequences="results/scores/{model}/{ckpt}/{textset}.sequences.parquet",
        record="results/compute/score/{model}/{ckpt}/{textset}.json",
    log:
        "logs/score/{model}/{ckpt}/{textset}.log",
    benchmark:
        "benchmarks/score/{model}/{ckpt}/{textset}.tsv"
    priority: 50
    conda:
        conda_env("core")
    threads: config["score"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        options=SCORE_OPTIONS,
        speed=speed_only(SCORE_SPEED),
        dtype=compute_dtype("score"),
        compute=compute_placement("score"),
        prompt=config["score"]["prompt"],
        system=config["score"]["system"] or "",
    shell:
        "{params.python:q} -m reasonlab score --log {log:q} --handle {input.handle:q}"
        " --texts {input.texts:q} --textset {wildcards.textset:q} --tokens {output.tokens:q}"
        " --sequences {output.sequences:q} --options {params.options:q} --speed {params.speed:q}"
        " --prompt {params.prompt:q} --system={params.system:q} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule aggregate_scores:
    input:
        tokens=PLAN.score_outputs("tokens"),
        sequences=PLAN.score_outputs("sequences"),
    output:
        **PLAN.score_tables(),
    log:
        "logs/aggregate/scores.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        python=python_of("core"),
        out_dir=get_out_dir,
        jobs=PLAN.score_job_args(),
        sample_prompts=config["score"]["sample_prompts"],
        extremes=config["score"]["extremes"],
        detailed="--detailed" if config["score"]["detailed_tokens"] else "",
    shell:
        "{params.python:q} -m reasonlab aggregate-scores --log {log:q} --jobs {params.jobs:q}"
        " --tokens {input.tokens:q} --sequences {input.sequences:q} --out-dir {params.out_dir}"
        " --sample-prompts {params.sample_prompts} --extremes {params.extremes} {params.detailed}"


rule export_seed002:
    input:
        **PLAN.seed002_inputs(),
    output:
        PLAN.seed002_outputs(),
    log:
        "logs/export_seed002/{dataset}.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        python=python_of("core"),
        names=PLAN.seed002_names,
        max_new_tokens=config["generation"]["max_new_tokens"],
        out_dir=get_out_dir,
    shell:
        "{params.python:q} -m reasonlab export-seed002 --log {log:q} --names {params.names:q}"
        " --tokens {input.tokens:q} --generations {input.generations:q}"
        " --handles {input.handles:q} --max-new-tokens {params.max_new_tokens}"
        " --out-dir {params.out_dir:q}"
