# Seed 001's causal interventions (reasonlab.intervene): steering sweeps and ablations per model x
# checkpoint x spec, direction transfer between checkpoints, activation patching per checkpoint
# (reasonlab.patching), and their aggregation for the report.


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


rule transfer:
    input:
        unpack(get_transfer_inputs),
    output:
        table="results/transfer/{model}/{ckpt}/{spec}/{model2}/{ckpt2}.table.parquet",
        settings="results/transfer/{model}/{ckpt}/{spec}/{model2}/{ckpt2}.settings.parquet",
        record="results/compute/transfer/{model}/{ckpt}/{spec}/{model2}/{ckpt2}.json",
    log:
        "logs/transfer/{model}/{ckpt}/{spec}/{model2}/{ckpt2}.log",
    benchmark:
        "benchmarks/transfer/{model}/{ckpt}/{spec}/{model2}/{ckpt2}.tsv"
    conda:
        conda_env("core")
    threads: config["interventions"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        settings=get_transfer_settings,
        batch=speed_only(config["interventions"]["batch_size"]),
        dtype=compute_dtype("transfer"),
        compute=compute_placement("transfer"),
    shell:
        "{params.python:q} -m reasonlab transfer --log {log:q} --handle {input.handle:q}"
        " --data {input.data:q} --spec {wildcards.spec:q} --settings {params.settings:q}"
        " --chosen {input.chosen:q} --pt {input.pt:q}"
        " --table {output.table:q} --settings-table {output.settings:q}"
        " --batch-size {params.batch} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule patch:
    input:
        handle="results/models/{model}/{ckpt}.json",
        data="results/data/{dataset}.parquet",
    output:
        groups="results/patching/{model}/{ckpt}/{dataset}.groups.parquet",
        tokens="results/patching/{model}/{ckpt}/{dataset}.tokens.parquet",
        pairs="results/patching/{model}/{ckpt}/{dataset}.pairs.parquet",
        record="results/compute/patch/{model}/{ckpt}/{dataset}.json",
    log:
        "logs/patch/{model}/{ckpt}/{dataset}.log",
    benchmark:
        "benchmarks/patch/{model}/{ckpt}/{dataset}.tsv"
    conda:
        conda_env("core")
    threads: config["interventions"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        settings=PLAN.patch_settings() if PLAN.patch_jobs else "{}",
        batch=speed_only(config["interventions"]["patching"]["batch_size"]),
        dtype=compute_dtype("patch"),
        compute=compute_placement("patch"),
    shell:
        "{params.python:q} -m reasonlab patch --log {log:q} --handle {input.handle:q}"
        " --data {input.data:q} --settings {params.settings:q} --out-prefix"
        " results/patching/{wildcards.model}/{wildcards.ckpt}/{wildcards.dataset}"
        " --batch-size {params.batch} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule aggregate_interventions:
    input:
        settings=PLAN.intervene_jobs_arg()[1],
        patching=PLAN.patch_jobs_arg()[1],
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
        patch_jobs=PLAN.patch_jobs_arg()[0],
    shell:
        "{params.python:q} -m reasonlab aggregate-interventions --log {log:q} --jobs {params.jobs:q}"
        " --paths {input.settings:q} --patch-jobs {params.patch_jobs:q}"
        " --patch-paths {input.patching:q} --out-dir {params.out_dir}"


rule export_seed001_interventions:
    input:
        table="results/interventions/{model}/{ckpt}/{spec}.table.parquet",
        settings="results/interventions/{model}/{ckpt}/{spec}.settings.parquet",
    output:
        "results/export/seed001/{model}/{ckpt}/{spec}/intervention_results.json",
    log:
        "logs/export_seed001_interventions/{model}/{ckpt}/{spec}.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        python=python_of("core"),
    shell:
        "{params.python:q} -m reasonlab export-seed001-interventions --log {log:q}"
        " --table {input.table:q} --settings {input.settings:q} --output {output:q}"
