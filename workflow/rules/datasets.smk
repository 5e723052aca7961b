# Any configured source -> one normalized table per dataset (plus its rejects and a summary).


rule prepare_dataset:
    input:
        unpack(get_dataset_inputs),
    output:
        table="results/data/{dataset}.parquet",
        rejects="results/data/{dataset}.rejects.jsonl",
        summary="results/data/{dataset}.summary.json",
    log:
        "logs/prepare_dataset/{dataset}.log",
    priority: 100
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        python=python_of("core"),
        spec=get_dataset_spec,
    shell:
        "{params.python:q} -m reasonlab prepare-dataset --log {log:q} --name {wildcards.dataset}"
        " --spec {params.spec:q} --table {output.table:q} --rejects {output.rejects:q}"
        " --summary {output.summary:q}"
