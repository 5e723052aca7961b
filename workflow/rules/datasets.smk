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
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        spec=get_dataset_spec,
    script:
        "../../scripts/prepare_dataset.py"
