# Aggregated tables and the self-contained HTML report.


rule aggregate_overview:
    input:
        handles=all_handles(),
        summaries=expand("results/data/{dataset}.summary.json", dataset=DATASETS),
        rejects=expand("results/data/{dataset}.rejects.jsonl", dataset=DATASETS),
        environments=expand("results/envs/{env}.json", env=ENVIRONMENTS),
    output:
        models="results/aggregate/models.parquet",
        datasets="results/aggregate/datasets.parquet",
        environments="results/aggregate/environments.parquet",
    log:
        "logs/aggregate/overview.log",
    localrule: True
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/aggregate_overview.py"


register_report_table("models", rules.aggregate_overview.output.models)
register_report_table("datasets", rules.aggregate_overview.output.datasets)
register_report_table("environments", rules.aggregate_overview.output.environments)


rule report:
    input:
        unpack(get_report_tables),
    output:
        "results/report.html",
    log:
        "logs/report.log",
    localrule: True
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        title=config["report"]["title"],
        config_hash=CONFIG_HASH,
    script:
        "../../scripts/report.py"
