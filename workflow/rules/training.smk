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
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        select=get_run_select,
        stage=get_run_stage,
    script:
        "../../scripts/select_training_data.py"


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
    conda:
        conda_env("train")
    threads: get_run_threads
    resources:
        mem_mb=8000,
        runtime=240,
    params:
        python=get_train_python,
        script=SCRIPTS / "finetune.py",
        settings=get_run_settings,
    shell:
        "{params.python:q} {params.script:q} --base {input.base:q} --data-dir"
        " results/training/{wildcards.run}/data --template {input.template:q}"
        " --output-dir {output.model:q} --yaml {output.yaml:q} --threads {threads}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule aggregate_training:
    input:
        outputs=expand("results/training/{run}/output", run=sorted(TRAINING)),
        selections=expand(
            "results/training/{run}/selection.parquet", run=sorted(TRAINING)
        ),
        handles=run_handles(),
    output:
        loss="results/aggregate/training_loss.parquet",
        checkpoints="results/aggregate/training_checkpoints.parquet",
        selection="results/aggregate/training_selection.parquet",
    log:
        "logs/aggregate/training.log",
    localrule: True
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        runs=sorted(TRAINING),
    script:
        "../../scripts/aggregate_training.py"


if TRAINING:
    for _name in ("loss", "checkpoints", "selection"):
        register_report_table(
            f"training_{_name}", getattr(rules.aggregate_training.output, _name)
        )
