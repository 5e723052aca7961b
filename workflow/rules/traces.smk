# The trace explorer (seed 000's analysis; reasonlab.steps, reasonlab.embed, reasonlab.tracemap):
# each checkpoint's own generations split into steps with their token entropies, embedded, mapped
# and clustered per group, and aggregated for the report.


rule trace_steps:
    input:
        unpack(get_step_inputs),
    output:
        steps="results/steps/{model}/{ckpt}/{textset}.parquet",
        summary="results/steps/{model}/{ckpt}/{textset}.json",
    log:
        "logs/trace_steps/{model}/{ckpt}/{textset}.log",
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        python=python_of("core"),
        settings=PLAN.step_settings(),
    shell:
        "{params.python:q} -m reasonlab trace-steps --log {log:q} --tokens {input.tokens:q}"
        " --sequences {input.sequences:q} --labels {input.labels:q} --settings {params.settings:q}"
        " --out {output.steps:q} --summary {output.summary:q}"


rule embed:
    input:
        unpack(get_embed_inputs),
    output:
        table="results/embeddings/{model}/{ckpt}/{dataset}.parquet",
        npy="results/embeddings/{model}/{ckpt}/{dataset}/{model}_embeddings.npy",
        results="results/embeddings/{model}/{ckpt}/{dataset}/{model}_results.json",
        record="results/compute/embed/{model}/{ckpt}/{dataset}.json",
    log:
        "logs/embed/{model}/{ckpt}/{dataset}.log",
    benchmark:
        "benchmarks/embed/{model}/{ckpt}/{dataset}.tsv"
    conda:
        conda_env("core")
    threads: config["embed"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        python=python_of("core"),
        settings=PLAN.embed_settings(),
        dtype=config["embed"]["dtype"] or "auto",
        batch=speed_only(config["embed"]["batch_size"]),
        compute=compute_placement("embed"),
    shell:
        "{params.python:q} -m reasonlab embed --log {log:q} --generations {input.generations:q}"
        " --steps {input.steps:q} --label {wildcards.model:q} --settings {params.settings:q}"
        " --table {output.table:q} --npy {output.npy:q} --results {output.results:q}"
        " --batch-size {params.batch} --threads {threads} --dtype {params.dtype}"
        " --compute {params.compute:q} --record {output.record:q}"


rule trace_map:
    input:
        get_map_inputs,
    output:
        points="results/traces/{group}/{dataset}.points.parquet",
        phrases="results/traces/{group}/{dataset}.phrases.parquet",
        clusters="results/traces/{group}/{dataset}.clusters.parquet",
        summary="results/traces/{group}/{dataset}.json",
    log:
        "logs/trace_map/{group}/{dataset}.log",
    benchmark:
        "benchmarks/trace_map/{group}/{dataset}.tsv"
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        python=python_of("core"),
        members=get_map_members,
        settings=PLAN.map_settings(),
    shell:
        "{params.python:q} -m reasonlab trace-map --log {log:q} --group {wildcards.group:q}"
        " --members {params.members:q} --settings {params.settings:q}"
        " --out-prefix results/traces/{wildcards.group}/{wildcards.dataset}"


rule aggregate_traces:
    input:
        PLAN.trace_jobs_arg()[1],
    output:
        **table_paths(report_traces.TABLES),
    log:
        "logs/aggregate/traces.log",
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
        jobs=PLAN.trace_jobs_arg()[0],
    shell:
        "{params.python:q} -m reasonlab aggregate-traces --log {log:q} --jobs {params.jobs:q}"
        " --paths {input:q} --out-dir {params.out_dir}"
