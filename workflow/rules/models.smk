# One handle per model × checkpoint: where the weights are and how to load them.


rule resolve_model:
    input:
        unpack(get_model_inputs),
    output:
        handle="results/models/{model}/{ckpt}.json",
    log:
        "logs/resolve_model/{model}/{ckpt}.log",
    localrule: True
    conda:
        CORE_CONDA
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        spec=get_model_spec,
    script:
        "../../scripts/resolve_model.py"
