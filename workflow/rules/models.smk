# One handle per model × checkpoint: where the weights are and how to load them.


rule resolve_model:
    input:
        unpack(get_model_inputs),
    output:
        handle="results/models/{model}/{ckpt}.json",
    params:
        spec=get_model_spec,
    log:
        "logs/resolve_model/{model}/{ckpt}.log",
    localrule: True
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/resolve_model.py"
