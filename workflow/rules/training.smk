# Fine-tuning with LlamaFactory (seed 003): select the training rows, train, gather the curves.


rule select_training_data:
    input:
        unpack(get_selection_inputs),
    output:
        selection="results/training/{run}/selection.parquet",
        data="results/training/{run}/data/train.json",
        info="results/training/{run}/data/dataset_info.json",
    log:
        "logs/select_training_data/{run}.log",
    priority: 100
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        select=get_run_select,
        stage=get_run_stage,
        scores=get_scores_arg,
    shell:
        "{params.python:q} -m reasonlab select-training-data --log {log:q} --run {wildcards.run}"
        " --data {input.data:q} {params.scores} --select {params.select:q} --stage {params.stage}"
        " --selection {output.selection:q} --data-dir results/training/{wildcards.run}/data"


rule finetune:
    input:
        base=get_run_base_handle,
        data=rules.select_training_data.output.data,
        info=rules.select_training_data.output.info,
        template=LLAMAFACTORY_TEMPLATE,
    output:
        model=directory("results/training/{run}/output"),
        yaml="results/training/{run}/train.yaml",
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "benchmarks/finetune/{run}.tsv"
    priority: 100
    conda:
        conda_env("train")
    threads: get_run_threads
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        python=python_of("train"),
        settings=get_run_settings,
    shell:
        "{params.python:q} -m reasonlab finetune --log {log:q} --base {input.base:q}"
        " --data-dir results/training/{wildcards.run}/data --template {input.template:q}"
        " --output-dir {output.model:q} --yaml {output.yaml:q} --threads {threads}"
        " --settings {params.settings:q}"


rule aggregate_training:
    input:
        outputs=[PLAN.run_output(r) for r in PLAN.runs()],
        selections=expand("results/training/{run}/selection.parquet", run=PLAN.runs()),
        handles=PLAN.run_handles(),
    output:
        **table_paths(report_training.TABLES),
    log:
        "logs/aggregate/training.log",
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        python=python_of("core"),
        out_dir=get_out_dir,
        runs=PLAN.runs(),
    shell:
        "{params.python:q} -m reasonlab aggregate-training --log {log:q} --runs {params.runs:q}"
        " --outputs {input.outputs:q} --selections {input.selections:q}"
        " --handles {input.handles:q} --out-dir {params.out_dir}"
