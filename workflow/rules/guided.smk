# Guided inference (seed 004; reasonlab.guided): a base checkpoint consulting an oracle checkpoint
# under each policy, its grid of (c, k, step) x budgets in one job with both models loaded once,
# and the aggregation for the report.


rule guide:
    input:
        unpack(get_guided_inputs),
    output:
        problems="results/guided/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.problems.parquet",
        cells="results/guided/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.cells.parquet",
        points="results/guided/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.points.parquet",
        record="results/compute/guide/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.json",
    log:
        "logs/guide/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.log",
    benchmark:
        "benchmarks/guide/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.tsv"
    conda:
        conda_env("core")
    threads: config["guided"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        python=python_of("core"),
        settings=get_guided_settings,
        backend=get_guided_backend,
        server=get_guided_server,
        batch=speed_only(config["guided"]["batch_size"]),
        dtype=compute_dtype("guide"),
        compute=compute_placement("guide"),
        prefix=lambda w: f"results/guided/{w.model}/{w.ckpt}/{w.model2}/{w.ckpt2}/{w.dataset}/{w.policy}",
    shell:
        "{params.python:q} -m reasonlab guide --log {log:q} --base {input.base:q}"
        " --oracle {input.oracle:q} --data {input.data:q} --policy {wildcards.policy}"
        " --settings {params.settings:q} --oracle-backend {params.backend}"
        " --server {params.server:q} --out-prefix {params.prefix:q}"
        " --batch-size {params.batch} --threads {threads} --dtype {params.dtype}"
        " --compute {params.compute:q} --record {output.record:q}"


rule aggregate_guided:
    input:
        PLAN.guided_jobs_arg()[1],
    output:
        **table_paths(report_guided.TABLES),
    log:
        "logs/aggregate/guided.log",
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
        jobs=PLAN.guided_jobs_arg()[0],
    shell:
        "{params.python:q} -m reasonlab aggregate-guided --log {log:q} --jobs {params.jobs:q}"
        " --paths {input:q} --out-dir {params.out_dir}"


rule export_seed004:
    input:
        "results/guided/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.problems.parquet",
    output:
        "results/export/seed004/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.jsonl",
    log:
        "logs/export_seed004/{model}/{ckpt}/{model2}/{ckpt2}/{dataset}/{policy}.log",
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
        "{params.python:q} -m reasonlab export-seed004 --log {log:q} --problems {input:q}"
        " --output {output:q}"
