# One handle per model × checkpoint: where the weights are and how to load them.


rule resolve_model:
    input:
        unpack(get_model_inputs),
    output:
        handle="results/models/{model}/{ckpt}.json",
    log:
        "logs/resolve_model/{model}/{ckpt}.log",
    priority: 100
    localrule: True
    conda:
        conda_env("core")
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        python=python_of("core"),
        spec=get_model_spec,
        base=get_base_arg,
    shell:
        "{params.python:q} -m reasonlab resolve-model --log {log:q} --model {wildcards.model}"
        " --ckpt {wildcards.ckpt} --spec {params.spec:q} {params.base} --output {output.handle:q}"
