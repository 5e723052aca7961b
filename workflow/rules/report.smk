# The run overview's tables and the self-contained HTML report.


rule aggregate_overview:
    input:
        handles=PLAN.handles(),
        summaries=expand("results/data/{dataset}.summary.json", dataset=PLAN.datasets),
        rejects=expand("results/data/{dataset}.rejects.jsonl", dataset=PLAN.datasets),
        environments=expand("results/envs/{env}.json", env=ENVIRONMENTS),
        compute=PLAN.compute_records(),
    output:
        **table_paths(report_overview.TABLES),
    log:
        "logs/aggregate/overview.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        python=python_of("core"),
        out_dir=get_out_dir,
    shell:
        "{params.python:q} -m reasonlab aggregate-overview --log {log:q} --handles {input.handles:q}"
        " --summaries {input.summaries:q} --rejects {input.rejects:q}"
        " --environments {input.environments:q} --compute {input.compute:q}"
        " --out-dir {params.out_dir}"


rule report:
    input:
        unpack(get_report_tables),
    output:
        "results/report.html",
    log:
        "logs/report.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        title=config["report"]["title"],
        config_hash=CONFIG_HASH,
        shown=config["report"]["checkpoints_shown"],
    shell:
        "{params.python:q} -m reasonlab report --log {log:q} {input:q} --output {output:q}"
        " --title {params.title:q} --config-hash {params.config_hash}"
        " --checkpoints-shown {params.shown}"


rule figures:
    input:
        unpack(get_report_tables),
    output:
        "results/figures/index.json",
    log:
        "logs/figures.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        shown=config["report"]["checkpoints_shown"],
    shell:
        "{params.python:q} -m reasonlab figures --log {log:q} {input:q} --index {output:q}"
        " --checkpoints-shown {params.shown}"


rule export_seed003:
    input:
        by_type="results/aggregate/score_by_type.parquet",
        checkpoints="results/aggregate/training_checkpoints.parquet",
    output:
        [PLAN.seed003_output(p) for p in PLAN.seed003_pairs],
    log:
        "logs/export_seed003.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        python=python_of("core"),
        pairs=PLAN.seed003_pairs,
    shell:
        "{params.python:q} -m reasonlab export-seed003 --log {log:q} --by-type {input.by_type:q}"
        " --checkpoints {input.checkpoints:q} --pairs {params.pairs:q} --outputs {output:q}"
