# Residual-stream activations of prompt sets under every analysed checkpoint of the configured
# models, captured into the content-keyed store (reasonlab.activations).


rule capture_activations:
    input:
        handle="results/models/{model}/{ckpt}.json",
        texts=get_capture_input,
    output:
        index="results/activations/{model}/{ckpt}/{promptset}.index.parquet",
        meta="results/activations/{model}/{ckpt}/{promptset}.meta.json",
        record="results/compute/capture_activations/{model}/{ckpt}/{promptset}.json",
    log:
        "logs/capture_activations/{model}/{ckpt}/{promptset}.log",
    benchmark:
        "benchmarks/capture_activations/{model}/{ckpt}/{promptset}.tsv"
    conda:
        conda_env("core")
    threads: config["activations"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        promptset=get_capture_set,
        options=CAPTURE_OPTIONS,
        speed=speed_only(CAPTURE_SPEED),
        store=speed_only(config["activations"]["store"]),
        dtype=compute_dtype("capture_activations"),
        compute=compute_placement("capture_activations"),
    shell:
        "{params.python:q} -m reasonlab capture-activations --log {log:q} --handle {input.handle:q}"
        " --texts {input.texts:q} --promptset {wildcards.promptset:q} --set {params.promptset:q}"
        " --index {output.index:q} --meta {output.meta:q} --store {params.store:q}"
        " --options {params.options:q} --speed {params.speed:q} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule directions:
    input:
        unpack(get_direction_inputs),
    output:
        candidates="results/directions/{model}/{ckpt}/{contrast}/candidates.parquet",
        chosen="results/directions/{model}/{ckpt}/{contrast}/chosen.json",
        pt="results/directions/{model}/{ckpt}/{contrast}/reasoning_directions.pt",
        record="results/compute/directions/{model}/{ckpt}/{contrast}.json",
    log:
        "logs/directions/{model}/{ckpt}/{contrast}.log",
    benchmark:
        "benchmarks/directions/{model}/{ckpt}/{contrast}.tsv"
    conda:
        conda_env("core")
    threads: config["directions"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        contrast=get_direction_spec,
        options=DIRECTION_OPTIONS,
        speed=speed_only(DIRECTION_SPEED),
        dtype=compute_dtype("directions"),
        compute=compute_placement("directions"),
        out_dir=get_out_dir,
    shell:
        "{params.python:q} -m reasonlab directions --log {log:q} --handle {input.handle:q}"
        " --positive {input.positive:q} --negative {input.negative:q} --meta {input.meta:q}"
        " --contrast {wildcards.contrast:q} --spec {params.contrast:q} --out-dir {params.out_dir:q}"
        " --options {params.options:q} --speed {params.speed:q} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule probes:
    input:
        unpack(get_probe_inputs),
    output:
        table="results/probes/{model}/{ckpt}/probes.parquet",
        json="results/probes/{model}/{ckpt}/probe_accuracies.json",
    log:
        "logs/probes/{model}/{ckpt}.log",
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        python=python_of("core"),
        settings=PLAN.probe_settings() if PLAN.probe_jobs else "{}",
        sets=PLAN.probe_sets() if PLAN.probe_jobs else [],
    shell:
        "{params.python:q} -m reasonlab probes --log {log:q} --model {wildcards.model:q}"
        " --ckpt {wildcards.ckpt:q} --settings {params.settings:q} --sets {params.sets:q}"
        " --index {input.index:q} --meta {input.meta:q} --table {output.table:q} --json {output.json:q}"


rule lens:
    input:
        handle="results/models/{model}/{ckpt}.json",
        data="results/data/{dataset}.parquet",
    output:
        table="results/lens/{model}/{ckpt}/{dataset}.parquet",
        record="results/compute/lens/{model}/{ckpt}/{dataset}.json",
    log:
        "logs/lens/{model}/{ckpt}/{dataset}.log",
    benchmark:
        "benchmarks/lens/{model}/{ckpt}/{dataset}.tsv"
    conda:
        conda_env("core")
    threads: config["lens"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        python=python_of("core"),
        settings=PLAN.lens_settings() if PLAN.lens_jobs else "{}",
        dtype=compute_dtype("lens"),
        compute=compute_placement("lens"),
    shell:
        "{params.python:q} -m reasonlab lens --log {log:q} --handle {input.handle:q}"
        " --data {input.data:q} --dataset {wildcards.dataset:q} --settings {params.settings:q}"
        " --table {output.table:q} --threads {threads}"
        " --dtype {params.dtype} --compute {params.compute:q} --record {output.record:q}"


rule cka:
    input:
        unpack(get_cka_inputs),
    output:
        table="results/cka/{model}/{ckpt}/{model2}/{ckpt2}.parquet",
        json="results/cka/{model}/{ckpt}/{model2}/{ckpt2}.alignment_results.json",
    log:
        "logs/cka/{model}/{ckpt}/{model2}/{ckpt2}.log",
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    params:
        python=python_of("core"),
        position=config["cka"]["position"],
        debiased="--debiased" if config["cka"]["debiased"] else "",
    shell:
        "{params.python:q} -m reasonlab cka --log {log:q} --index-a {input.index_a:q}"
        " --meta-a {input.meta_a:q} --index-b {input.index_b:q} --meta-b {input.meta_b:q}"
        " --names {wildcards.model}/{wildcards.ckpt} {wildcards.model2}/{wildcards.ckpt2}"
        " --position {params.position:q} {params.debiased} --table {output.table:q} --json {output.json:q}"


rule aggregate_activations:
    input:
        PLAN.activation_inputs(),
    output:
        **PLAN.activation_tables(),
    log:
        "logs/aggregate/activations.log",
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
        jobs=PLAN.activation_jobs()[0],
        paths=PLAN.activation_jobs()[1],
    shell:
        "{params.python:q} -m reasonlab aggregate-activations --log {log:q} --jobs {params.jobs:q}"
        " --paths {params.paths:q} --out-dir {params.out_dir}"


rule export_seed001_alignment:
    input:
        **PLAN.seed001_alignment_inputs(),
    output:
        "results/export/seed001/{model}/{ckpt}/{model2}/{ckpt2}/alignment_results.json",
    log:
        "logs/export_seed001_alignment/{model}/{ckpt}/{model2}/{ckpt2}.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
    shell:
        "{params.python:q} -m reasonlab export-seed001-alignment --log {log:q}"
        " --table {input.table:q} --directions {input.directions:q} --output {output:q}"
