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
