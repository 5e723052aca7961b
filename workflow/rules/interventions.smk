# Seed 001's causal interventions: steering sweeps and ablations per model x checkpoint x spec
# (reasonlab.intervene), and their aggregation for the report.


rule intervene:
    input:
        unpack(get_intervene_inputs),
    output:
        table="results/interventions/{model}/{ckpt}/{spec}.table.parquet",
        settings="results/interventions/{model}/{ckpt}/{spec}.settings.parquet",
        record="results/compute/intervene/{model}/{ckpt}/{spec}.json",
    log:
        "logs/intervene/{model}/{ckpt}/{spec}.log",
    benchmark:
        "benchmarks/intervene/{model}/{ckpt}/{spec}.tsv"
    conda:
        conda_env("core")
    threads: config["interventions"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        settings=get_intervene_settings,
        directions=get_direction_args,
        batch=speed_only(config["interventions"]["batch_size"]),
        dtype=compute_dtype("intervene"),
        compute=compute_placement("intervene"),
    shell:
        "{params.python:q} -m reasonlab intervene --log {log:q} --handle {input.handle:q}"
        " --data {input.data:q} --spec {wildcards.spec:q} --settings {params.settings:q}"
        " {params.directions} --table {output.table:q} --settings-table {output.settings:q}"
        " --batch-size {params.batch} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule aggregate_interventions:
    input:
        PLAN.intervene_jobs_arg()[1],
    output:
        **table_paths(report_interventions.TABLES),
    log:
        "logs/aggregate/interventions.log",
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
        jobs=PLAN.intervene_jobs_arg()[0],
    shell:
        "{params.python:q} -m reasonlab aggregate-interventions --log {log:q} --jobs {params.jobs:q}"
        " --paths {input:q} --out-dir {params.out_dir}"
